"""geosmtp.relay.mx without a network: nameserver specs, address literals, bad names.
(Lookups against a real DNS server: tests/integration/test_mx_resolution.py.)"""

from __future__ import annotations

import pytest

pytest.importorskip("dns", reason="dnspython is not installed")

from geosmtp.dns import _nameserver, parse_nameserver
from geosmtp.relay.mx import (
    DNSPermanentError,
    Resolver,
    address_literal,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 10.0.0.1:53 ", ("10.0.0.1", 53)),
        ("::1", ("::1", 53)),
        ("2001:db8::1", ("2001:db8::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_nameserver_specs(spec, expected):
    assert parse_nameserver(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "dns.example", "dns.example:53", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
     "127.0.0.1:x", "[::1", "[::1]5353", "[::1]:", "300.1.1.1"],
)  # fmt: skip
def test_bad_nameserver_specs(spec):
    with pytest.raises(ValueError):
        parse_nameserver(spec)


def test_resolver_takes_nameservers_with_ports():
    r = Resolver(["127.0.0.1:5353", "::1", "[::1]:54"], timeout=1)
    assert r.nameservers == ["127.0.0.1:5353", "[::1]:53", "[::1]:54"]


@pytest.mark.parametrize("bad", [[], "127.0.0.1"])
def test_resolver_refuses_nameservers_that_are_no_list(bad):
    with pytest.raises((ValueError, TypeError)):
        Resolver(bad)


def test_resolver_refuses_a_timeout_of_zero():
    with pytest.raises(ValueError):
        Resolver(["127.0.0.1"], timeout=0)


@pytest.mark.parametrize(
    ("domain", "address"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("[ipv6:::1]", "::1"),
        ("[2001:db8::1]", None),  # an IPv6 literal needs its tag (RFC 5321 §4.1.3)
        ("[IPv6:192.0.2.1]", None),
        ("[300.1.1.1]", None),
        ("example.org", None),
        ("[example.org]", None),
    ],
)
def test_address_literals(domain, address):
    assert address_literal(domain) == address


@pytest.mark.parametrize("domain", ["", ".", "a..b", "x" * 64 + ".test", "bad\u200d.test"])
def test_names_that_cannot_be_looked_up_are_permanent_failures(domain):
    # The nameserver is never asked (port 9 is discard): the name fails first.
    with pytest.raises(DNSPermanentError) as info:
        Resolver(["127.0.0.1:9"], timeout=0.2).resolve_mx(domain)
    assert info.value.status == "5.1.2"


@pytest.mark.parametrize(
    ("name", "port", "expected", "address"),
    [
        ("Do53:127.0.0.1@5353", 5353, "127.0.0.1:5353", "127.0.0.1"),  # the port in the name
        ("Do53:::1@53", 53, "[::1]:53", "::1"),
        ("127.0.0.1", 53, "127.0.0.1:53", "127.0.0.1"),
    ],
)
def test_a_nameserver_in_a_failure_is_named_as_the_config_names_it(name, port, expected, address):
    assert _nameserver(name, port) == expected
    assert parse_nameserver(expected) == (address, port)
