"""MX resolution (geosmtp.relay.mx) against a real DNS server: a private dnsmasq
on a loopback port (tests/integration/dns_server.py), plus nameservers that time
out or answer SERVFAIL."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("dns", reason="dnspython is not installed")

from geosmtp.relay.mx import (
    DNSPermanentError,
    DNSTemporaryError,
    Host,
    Resolver,
)
from tests.integration.dns_server import (
    Zone,
    dns_server,
    servfail_nameserver,
    silent_nameserver,
)

ZONE = Zone(
    mx={
        # listed out of order: the resolver sorts by preference
        "two.test": [(20, "mx2.two.test"), (10, "mx1.two.test")],
        "nullmx.test": [(0, ".")],
        "equal.test": [(10, "a.equal.test"), (10, "b.equal.test"), (10, "c.equal.test")],
        "halfbroken.test": [(10, "missing.halfbroken.test"), (20, "ok.halfbroken.test")],
        "allbroken.test": [(10, "missing1.allbroken.test"), (20, "missing2.allbroken.test")],
        "xn--bcher-kva.test": [(5, "mx.xn--bcher-kva.test")],
        "viacname.test": [(5, "alias.viacname.test")],
        # a malformed mixture: "." beside a real MX (RFC 7505 §3 forbids it)
        "mixednull.test": [(0, "."), (10, "mx1.two.test")],
    },
    hosts={
        "mx1.two.test": ["127.0.0.2"],
        "mx2.two.test": ["127.0.0.3", "::1"],
        "nomx.test": ["127.0.0.4"],
        "a.equal.test": ["127.0.0.11"],
        "b.equal.test": ["127.0.0.12"],
        "c.equal.test": ["127.0.0.13"],
        "ok.halfbroken.test": ["127.0.0.5"],
        "mx.xn--bcher-kva.test": ["127.0.0.6"],
        "target.viacname.test": ["127.0.0.7"],
        "v6only.test": ["::1"],
    },
    txt={"txtonly.test": ["v=spf1 -all"]},
    cname={"alias.viacname.test": "target.viacname.test"},
)


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    with dns_server(ZONE, tmp_path_factory.mktemp("dns")) as server:
        yield server


@pytest.fixture
def resolver(dns) -> Resolver:
    return Resolver([dns.nameserver], timeout=3)


def test_mx_hosts_by_preference_each_with_ipv4_then_ipv6(resolver):
    assert resolver.resolve_mx("two.test") == [
        Host("mx1.two.test", ("127.0.0.2",), 10),
        Host("mx2.two.test", ("127.0.0.3", "::1"), 20),
    ]


def test_ipv6_first_when_asked(dns):
    hosts = Resolver([dns.nameserver], timeout=3, prefer_ipv6=True).resolve_mx("two.test")
    assert [h.addresses for h in hosts] == [("127.0.0.2",), ("::1", "127.0.0.3")]


def test_domain_names_are_case_insensitive_and_may_end_with_a_dot(resolver):
    assert [h.name for h in resolver.resolve_mx("TWO.Test.")] == ["mx1.two.test", "mx2.two.test"]


def test_equal_preferences_are_shuffled_by_the_given_random(dns):
    class Reverse(random.Random):
        def shuffle(self, x):  # type: ignore[override]
            x.reverse()

    names = [h.name for h in Resolver([dns.nameserver], rng=Reverse()).resolve_mx("equal.test")]
    assert names == ["c.equal.test", "b.equal.test", "a.equal.test"]

    def order(seed: int) -> list[str]:
        hosts = Resolver([dns.nameserver], rng=random.Random(seed)).resolve_mx("equal.test")
        return [h.name for h in hosts]

    # the same seed, the same order (whatever order the DNS answer came in)
    assert order(7) == order(7) == order(7)
    every_order = set(itertools.permutations(["a.equal.test", "b.equal.test", "c.equal.test"]))
    assert {tuple(order(seed)) for seed in range(40)} == every_order


def test_no_mx_is_the_implicit_mx_of_the_domain_itself(resolver):
    assert resolver.resolve_mx("nomx.test") == [Host("nomx.test", ("127.0.0.4",), 0)]


def test_implicit_mx_with_ipv6_only(resolver):
    assert resolver.resolve_mx("v6only.test") == [Host("v6only.test", ("::1",), 0)]


def test_null_mx_is_a_permanent_failure(resolver):
    with pytest.raises(DNSPermanentError) as info:
        resolver.resolve_mx("nullmx.test")
    assert info.value.status == "5.1.10"
    assert "null MX" in str(info.value) and "nullmx.test" in str(info.value)
    assert info.value.diagnostic.startswith("x-geosmtp; nullmx.test")
    assert not info.value.temporary


def test_a_null_mx_beside_real_mx_records_is_skipped(resolver):
    assert resolver.resolve_mx("mixednull.test") == [Host("mx1.two.test", ("127.0.0.2",), 10)]


def test_nxdomain_is_a_permanent_failure(resolver):
    with pytest.raises(DNSPermanentError) as info:
        resolver.resolve_mx("nope.test")
    assert info.value.status == "5.1.2"
    assert "NXDOMAIN" in str(info.value)


def test_a_name_with_neither_mx_nor_address_is_a_permanent_failure(resolver):
    with pytest.raises(DNSPermanentError) as info:
        resolver.resolve_mx("txtonly.test")
    assert info.value.status == "5.4.4"
    assert "no MX and no address" in str(info.value)


def test_an_mx_host_without_address_is_skipped(resolver):
    assert resolver.resolve_mx("halfbroken.test") == [
        Host("ok.halfbroken.test", ("127.0.0.5",), 20)
    ]


def test_mx_hosts_none_of_which_has_an_address_is_a_permanent_failure(resolver):
    with pytest.raises(DNSPermanentError) as info:
        resolver.resolve_mx("allbroken.test")
    assert info.value.status == "5.4.4"  # the domain exists; its MX hosts do not
    assert "no MX host of allbroken.test has an address" in str(info.value)


def test_an_mx_host_behind_a_cname_is_followed(resolver):
    assert resolver.resolve_mx("viacname.test") == [Host("alias.viacname.test", ("127.0.0.7",), 5)]


def test_internationalised_domain_is_looked_up_by_its_a_label(resolver, dns):
    assert resolver.resolve_mx("bücher.test") == [Host("mx.xn--bcher-kva.test", ("127.0.0.6",), 5)]
    assert "query[MX] xn--bcher-kva.test" in dns.log()


def test_address_literals_need_no_dns(resolver):
    assert resolver.resolve_mx("[127.0.0.9]") == [Host("[127.0.0.9]", ("127.0.0.9",))]
    assert resolver.resolve_mx("[IPv6:::1]") == [Host("[IPv6:::1]", ("::1",))]


def test_resolve_host_for_a_smarthost(resolver):
    assert resolver.resolve_host("mx2.two.test") == Host("mx2.two.test", ("127.0.0.3", "::1"))
    assert resolver.resolve_host("127.0.0.8") == Host("127.0.0.8", ("127.0.0.8",))
    with pytest.raises(DNSPermanentError):
        resolver.resolve_host("nope.test")


def test_a_refusing_nameserver_is_a_temporary_failure(resolver):
    # dnsmasq has no upstream: names outside its zone are REFUSED
    with pytest.raises(DNSTemporaryError) as info:
        resolver.resolve_mx("example.org")
    assert info.value.status == "4.4.3"
    assert "REFUSED" in str(info.value)
    assert info.value.temporary


def test_servfail_is_a_temporary_failure():
    with servfail_nameserver() as ns, pytest.raises(DNSTemporaryError) as info:
        Resolver([ns], timeout=3).resolve_mx("two.test")
    # The nameserver as the config writes it, its port once ("Do53:...@port:port" was).
    assert str(info.value) == (
        "DNS lookup of two.test MX failed: no nameserver answered it"
        f" (SERVFAIL or REFUSED: {ns} SERVFAIL)"
    )
    assert info.value.status == "4.4.3"


def test_a_nameserver_that_never_answers_is_a_temporary_failure():
    with silent_nameserver() as ns, pytest.raises(DNSTemporaryError) as info:
        Resolver([ns], timeout=0.5).resolve_mx("two.test")
    assert "timed out" in str(info.value)
    assert ns in str(info.value)


def test_the_second_nameserver_answers_when_the_first_is_broken(dns):
    with servfail_nameserver() as broken:
        hosts = Resolver([broken, dns.nameserver], timeout=3).resolve_mx("two.test")
    assert [h.name for h in hosts] == ["mx1.two.test", "mx2.two.test"]


def test_gevent_monkey_patched_lookups_cooperate(dns):
    """Under `patch_all()` (as the CLI runs), a lookup that waits on a silent
    nameserver lets other greenlets run, and lookups through dnsmasq work."""
    script = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import json, sys, gevent
        from geosmtp.relay.mx import Resolver, DNSTemporaryError
        from tests.integration.dns_server import silent_nameserver

        ticks = []
        def ticker():
            for i in range(100):
                ticks.append(i)
                gevent.sleep(0.01)

        def stuck(ns):
            try:
                Resolver([ns], timeout=0.6).resolve_mx("two.test")
            except DNSTemporaryError as exc:
                return str(exc)

        with silent_nameserver() as ns:
            t = gevent.spawn(ticker)
            slow = gevent.spawn(stuck, ns)
            fast = [gevent.spawn(Resolver([sys.argv[1]]).resolve_mx, "two.test") for _ in range(5)]
            gevent.joinall([slow, *fast], timeout=10)
            t.kill()
        print(json.dumps({
            "slow": slow.value,
            "ticks_while_stuck": len(ticks),
            "fast": [[h.name for h in g.value] for g in fast],
        }))
        """
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script, dns.nameserver],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "timed out" in result["slow"]
    assert result["ticks_while_stuck"] >= 20  # the hub ran while DNS waited (blocked: 1 or 2)
    assert result["fast"] == [["mx1.two.test", "mx2.two.test"]] * 5
