"""The PROXY protocol on listeners (issue 22), behind a real HAProxy in TCP mode.

One server, one HAProxy: listeners with `proxy_protocol` for SMTP, implicit
TLS (HAProxy passes TLS through; geosmtp terminates it) and POP3, reached
through HAProxy's `send-proxy` (v1) and `send-proxy-v2` with the client's
socket bound to another loopback address (127.0.0.5, ...), which HAProxy
passes on in the header: that address, never HAProxy's 127.0.0.1, is the
one in `Received:`, the access log, the admin API's sessions, the relay
permission (`trusted_networks`), the per-client limits, the AUTH throttle
and SPF. A connection
without a header, with a malformed one, or from a balancer outside
`proxy_trusted` is closed before any greeting, with a log line.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, users, wait_until
from tests.integration.adminapi import AdminClient, with_admin
from tests.integration.dns_server import DNSMASQ, Zone, dns_server
from tests.integration.haproxy import require_haproxy, running_haproxy
from tests.integration.pop3_client import TIMEOUT, POP3Wire

PASSWORD = "proxy-secret"
HOST = "127.0.0.1"
#: The client addresses HAProxy passes on (any 127/8 address is the loopback's).
CLIENT, RELAYER, HOLDER, OTHER = "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    """A private dnsmasq with an SPF record that lets only 127.0.0.5 send for
    proxied.test, or None when dnsmasq is missing (the SPF test skips)."""
    if not Path(DNSMASQ).exists():
        yield None
        return
    zone = Zone(txt={"proxied.test": [f"v=spf1 ip4:{CLIENT} -all"]}, local=("test", "example"))
    with dns_server(zone, tmp_path_factory.mktemp("dns")) as server:
        yield server


@pytest.fixture(scope="module")
def setup(make_module_server, certs, dns):
    """The server and HAProxy's ports, by route name."""
    require_haproxy()
    ports = {name: free_port() for name in ("mx", "submissions", "pop3", "untrusted")}
    trusted = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1", "::1/128"]}
    overrides = with_admin(
        {
            "listeners": [
                # First, without PROXY: the fixture's readiness probe speaks SMTP.
                {"address": HOST, "port": free_port(), "role": "mx"},
                {"address": HOST, "port": ports["mx"], "role": "mx", **trusted},
                {"address": HOST, "port": ports["submissions"], "role": "submissions", **trusted},
                {"address": HOST, "port": ports["pop3"], "role": "pop3", **trusted},
                {
                    "address": HOST,
                    "port": ports["untrusted"],
                    "role": "mx",
                    "proxy_protocol": True,
                    "proxy_trusted": ["192.0.2.0/24"],
                },
            ],
            "tls": certs.tls_config,
            "users": users(alice=PASSWORD, bob=None),
            # One failed login and a client's password is not checked again.
            "auth": {"allow_plaintext": True, "max_failures": 1, "failure_delay": 0},
            "trusted_networks": [f"{RELAYER}/32"],
            "client_limits": {"max_connections": 2},
            "timeouts": {"proxy_header": 1},
        }
    )
    if dns is not None:  # SPF, recorded in Authentication-Results:
        overrides["auth_checks"] = {"enabled": True}
        overrides["dns"] = {"nameservers": [dns.nameserver], "timeout": 2}
    server = make_module_server(overrides)
    ports["admin"] = overrides["admin"]["port"]
    with running_haproxy() as hp:
        routes = {
            "mx v1": hp.route([(HOST, ports["mx"])], "send-proxy"),
            "mx v2": hp.route([(HOST, ports["mx"])], "send-proxy-v2"),
            "submissions v2": hp.route([(HOST, ports["submissions"])], "send-proxy-v2"),
            "pop3 v1": hp.route([(HOST, ports["pop3"])], "send-proxy"),
            "untrusted v2": hp.route([(HOST, ports["untrusted"])], "send-proxy-v2"),
        }
        hp.start()
        yield server, ports, routes


def via(routes: dict, route: str, source: str = CLIENT, timeout: float = 10) -> smtplib.SMTP:
    """An SMTP client from `source` through HAProxy's `route`."""
    return smtplib.SMTP(HOST, routes[route], timeout=timeout, source_address=(source, 0))


def access_line(server, needle: str) -> str:
    return wait_until(
        lambda: next((li for li in server.access_log().splitlines() if needle in li), None),
        what=f"access log line with {needle}",
    )


@pytest.mark.parametrize("route", ["mx v1", "mx v2"])
def test_smtp_through_haproxy_is_the_clients_in_received_and_the_access_log(setup, route, box):
    server, _, routes = setup
    msgid = f"<{box}@remote.example>"
    with via(routes, route) as client:
        client.ehlo("client.example")
        # The admin API's sessions (ctl sessions) show the header's client.
        api = AdminClient(HOST, setup[1]["admin"])
        (session,) = [s for s in api.sessions() if s["helo"] == "client.example" and s["peer"]]
        assert (session["peer"], session["port"]) == (CLIENT, client.sock.getsockname()[1])
        client.sendmail(
            "carol@remote.example", [f"{box}@test.example"], f"Message-ID: {msgid}\r\n\r\nhi\r\n"
        )
    (stored,) = wait_until(lambda: server.messages(box), what="the message")
    received = stored.read_bytes().split(b"\n\n", 1)[0]
    assert b"Received: from client.example ([127.0.0.5])" in received, received
    line = access_line(server, msgid)
    assert " client=127.0.0.5 " in line, line


def test_implicit_tls_through_haproxy(setup, certs, box):
    """HAProxy passes TLS through: the header comes in clear, then geosmtp's handshake."""
    server, _, routes = setup
    context = certs.client_context()
    with smtplib.SMTP_SSL(
        HOST, routes["submissions v2"], timeout=10, context=context, source_address=(CLIENT, 0)
    ) as client:
        client.ehlo("tls.example")
        assert client.login("alice", PASSWORD)[0] == 235
        client.sendmail("alice@test.example", [f"{box}@test.example"], b"\r\nover TLS\r\n")
    (stored,) = wait_until(lambda: server.messages(box), what="the message")
    head = stored.read_bytes().split(b"\n\n", 1)[0]
    assert b"Received: from tls.example ([127.0.0.5])" in head, head
    assert b"with ESMTPSA" in head, head


def test_pop3_through_haproxy(setup):
    server, _, routes = setup
    # poplib takes no source address: the raw client, on a socket from CLIENT.
    sock = socket.create_connection(
        (HOST, routes["pop3 v1"]), timeout=10, source_address=(CLIENT, 0)
    )
    with POP3Wire(sock, TIMEOUT) as pop:
        assert pop.line().startswith(b"+OK")  # the greeting
        assert pop.cmd("USER alice").startswith(b"+OK")
        assert pop.cmd(f"PASS {PASSWORD}").startswith(b"+OK")
        assert pop.cmd("STAT").startswith(b"+OK")
        assert pop.cmd("QUIT").startswith(b"+OK")
    line = access_line(server, "proto=pop3 ")
    assert "client=127.0.0.5" in line, line
    assert "client=127.0.0.1" not in server.access_log().split("proto=pop3", 1)[1]


def test_relay_permission_is_the_headers_clients(setup):
    """trusted_networks holds 127.0.0.6: it may relay through HAProxy, and
    127.0.0.5 through the same HAProxy (the same socket peer) may not."""
    _, _, routes = setup
    with via(routes, "mx v2", RELAYER) as client:
        client.ehlo("relayer.example")
        client.mail("r@test.example")
        assert client.rcpt("someone@elsewhere.example")[0] == 250
        client.rset()
    with via(routes, "mx v2", CLIENT) as client:
        client.ehlo("client.example")
        client.mail("c@remote.example")
        code, text = client.rcpt("someone@elsewhere.example")
        assert (code, text[:5]) == (550, b"5.7.1"), text


def test_per_client_connection_limit_counts_the_headers_client(setup):
    """client_limits.max_connections 2: a third connection from 127.0.0.7 gets
    421 4.7.0 while one from 127.0.0.8 through the same HAProxy is served."""
    _, _, routes = setup
    held = [via(routes, "mx v1", HOLDER) for _ in range(2)]
    try:
        with socket.create_connection(
            (HOST, routes["mx v1"]), timeout=10, source_address=(HOLDER, 0)
        ) as third:
            reply = third.recv(1024)
            assert reply.startswith(b"421 4.7.0"), reply
        with via(routes, "mx v1", OTHER) as other:
            assert other.noop()[0] == 250
    finally:
        for client in held:
            client.close()


def closed_before_greeting(sock: socket.socket) -> bool:
    """The server closed `sock` without sending a single octet."""
    sock.settimeout(10)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_a_direct_connection_without_a_header_is_closed_before_any_greeting(setup):
    server, ports, _ = setup
    # A client that waits for the greeting: closed after timeouts.proxy_header.
    with socket.create_connection((HOST, ports["mx"]), timeout=10) as silent:
        assert closed_before_greeting(silent)
    server.logged("no header in time")
    # A client that talks: closed at its first octet.
    with socket.create_connection((HOST, ports["mx"]), timeout=10) as talker:
        talker.sendall(b"EHLO direct.example\r\n")
        assert closed_before_greeting(talker)
    server.logged("not a PROXY header")
    # A TLS client on the implicit-TLS listener: the same.
    raw = socket.create_connection((HOST, ports["submissions"]), timeout=10)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(raw, server_hostname="mx.test.example")
    raw.close()


def test_a_malformed_header_is_closed_before_any_greeting(setup):
    server, ports, _ = setup
    with socket.create_connection((HOST, ports["mx"]), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.999 127.0.0.1 1234 25\r\nEHLO x\r\n")
        assert closed_before_greeting(sock)
    server.logged("bad address '127.0.0.999'")


def test_the_protocols_bytes_after_the_header_reach_the_session(setup):
    """Sent in one write with the header, the client's first command is the
    session's (the header's octets, and only those, are taken)."""
    _, ports, _ = setup
    with socket.create_connection((HOST, ports["pop3"]), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 4000 110\r\nQUIT\r\n")
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(1024)
            assert chunk, data
            data += chunk
    greeting, reply = data.split(b"\r\n")[:2]
    assert greeting.startswith(b"+OK") and reply.startswith(b"+OK"), data


def test_a_balancer_outside_proxy_trusted_is_closed_before_any_greeting(setup):
    server, _, routes = setup
    with socket.create_connection(
        (HOST, routes["untrusted v2"]), timeout=10, source_address=(CLIENT, 0)
    ) as sock:
        assert closed_before_greeting(sock)
    server.logged("not in proxy_trusted")


def pop3_login(routes: dict, source: str, password: str) -> bytes:
    """USER and PASS over POP3 from `source` through HAProxy; PASS's reply."""
    sock = socket.create_connection(
        (HOST, routes["pop3 v1"]), timeout=10, source_address=(source, 0)
    )
    with POP3Wire(sock, TIMEOUT) as pop:
        assert pop.line().startswith(b"+OK")
        assert pop.cmd("USER alice").startswith(b"+OK")
        return pop.cmd(f"PASS {password}")


def test_the_auth_throttle_counts_the_headers_client(setup):
    """auth.max_failures 1: after one failure from 127.0.0.10 its right password
    is refused too, while 127.0.0.11 through the same HAProxy logs in."""
    _, _, routes = setup
    assert pop3_login(routes, "127.0.0.10", "wrong").startswith(b"-ERR")
    assert pop3_login(routes, "127.0.0.10", PASSWORD).startswith(b"-ERR")
    assert pop3_login(routes, "127.0.0.11", PASSWORD).startswith(b"+OK")


def test_spf_checks_the_headers_client(setup, dns, box):
    """proxied.test's SPF record allows 127.0.0.5 only: mail from it through
    HAProxy (whose own address is 127.0.0.1) passes, from 127.0.0.8 fails."""
    if dns is None:
        pytest.skip(f"dnsmasq is not installed ({DNSMASQ}): apt-get install dnsmasq-base")
    server, _, routes = setup
    for source in (CLIENT, OTHER):
        with via(routes, "mx v2", source) as client:
            client.sendmail(
                "a@proxied.test", [f"{box}@test.example"], f"Subject: {source}\r\n\r\nhi\r\n"
            )
    stored = wait_until(lambda: len(m := server.messages(box)) == 2 and m, what="2 messages")
    heads = {}
    for path in stored:
        head = path.read_bytes().split(b"\n\n", 1)[0].decode()
        heads[head.split("Subject: ", 1)[1].split("\n", 1)[0]] = head
    assert "spf=pass smtp.mailfrom=a@proxied.test" in heads[CLIENT], heads[CLIENT]
    assert f"spf=fail ({OTHER} is not allowed" in heads[OTHER], heads[OTHER]


def proxy_refusals(api: AdminClient, port: int) -> dict[str, float]:
    """geosmtp_proxy_refusals_total of the listener on `port`, by reason."""
    out = {}
    for family in text_string_to_metric_families(api.exposition()):
        for sample in family.samples:
            if sample.name == "geosmtp_proxy_refusals_total" and sample.labels["listener"].endswith(
                f":{port}"
            ):
                out[sample.labels["reason"]] = sample.value
    return out


def test_every_connection_closed_for_its_header_is_counted_by_reason(setup):
    """The metric counts each closed connection (the log lines are limited),
    by reason; every reason shows from the start."""
    _, ports, routes = setup
    api = AdminClient(HOST, ports["admin"])
    before = proxy_refusals(api, ports["mx"])
    assert set(before) == {"untrusted", "malformed", "timeout", "error"}
    untrusted_before = proxy_refusals(api, ports["untrusted"]).get("untrusted", 0)
    with socket.create_connection((HOST, ports["mx"]), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.999 127.0.0.1 1234 25\r\n")
        assert closed_before_greeting(sock)
    with socket.create_connection((HOST, ports["mx"]), timeout=10) as silent:
        assert closed_before_greeting(silent)  # after timeouts.proxy_header
    with socket.create_connection(
        (HOST, routes["untrusted v2"]), timeout=10, source_address=(CLIENT, 0)
    ) as sock:
        assert closed_before_greeting(sock)

    def counted() -> bool:
        after = proxy_refusals(api, ports["mx"])
        return (
            after["malformed"] == before["malformed"] + 1
            and after["timeout"] == before["timeout"] + 1
            and proxy_refusals(api, ports["untrusted"]).get("untrusted", 0) == untrusted_before + 1
        )

    wait_until(counted, what="the three refusals counted")
    assert proxy_refusals(api, ports["mx"])["untrusted"] == before["untrusted"]
