"""Metrics move as mail flows: /metrics (Prometheus text) and /api/v1/stats agree."""

from __future__ import annotations

import base64
import smtplib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import users, wait_until
from tests.integration.adminapi import admin_of, delta, total, with_admin
from tests.integration.wire import Wire

MESSAGE = b"From: a@remote.example\r\nSubject: counted\r\n\r\n" + b"body line\r\n" * 200


@pytest.fixture(scope="module")
def shared(make_module_server):
    server = make_module_server(with_admin())
    return server, admin_of(server)


def _listener(server) -> str:
    return f"mx:[127.0.0.1]:{server.port}"


def test_a_message_shows_in_metrics_and_stats(shared):
    server, api = shared
    before = api.quiet()
    stats_before = api.stats()
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("counter.example")
        refused = client.sendmail(
            "a@remote.example", ["alice@test.example", "bob@test.example"], MESSAGE
        )
        assert refused == {}
    after = api.quiet()
    stats = api.stats()
    listener = _listener(server)
    assert delta(before, after, "geosmtp_messages_accepted_total") == 1
    assert delta(before, after, "geosmtp_recipients_total") == 2
    assert delta(before, after, "geosmtp_connections_total", listener=listener) == 1
    assert delta(before, after, "geosmtp_sessions_total", listener=listener, outcome="quit") == 1
    for verb, n in {"EHLO": 1, "MAIL": 1, "RCPT": 2, "DATA": 1, "QUIT": 1}.items():
        assert delta(before, after, "geosmtp_commands_total", verb=verb) == n, verb
    # 220 greeting, EHLO, MAIL, 2 x RCPT, 250 after the message, 221; 354 is 3xx.
    assert delta(before, after, "geosmtp_replies_total", **{"class": "2xx"}) == 7
    assert delta(before, after, "geosmtp_replies_total", **{"class": "3xx"}) == 1
    assert delta(before, after, "geosmtp_message_size_bytes_count") == 1
    assert delta(before, after, "geosmtp_message_size_bytes_sum") == len(MESSAGE)
    assert delta(before, after, "geosmtp_delivery_seconds_count") == 1
    assert 0 < delta(before, after, "geosmtp_delivery_seconds_sum") < 10
    assert delta(before, after, "geosmtp_session_duration_seconds_count") == 1
    assert delta(before, after, "geosmtp_received_bytes_total", listener=listener) > len(MESSAGE)
    assert delta(before, after, "geosmtp_sent_bytes_total", listener=listener) > 100
    # /stats sums the same counters.
    assert stats["messages"]["accepted"] - stats_before["messages"]["accepted"] == 1
    assert stats["messages"]["recipients"] - stats_before["messages"]["recipients"] == 2
    assert stats["connections"]["total"] - stats_before["connections"]["total"] == 1
    assert stats["bytes"]["received"] == total(after, "geosmtp_received_bytes_total")
    # And so does the Prometheus text.
    families = {f.name: f for f in text_string_to_metric_families(api.exposition())}
    (accepted,) = families["geosmtp_messages_accepted"].samples
    assert accepted.value == total(after, "geosmtp_messages_accepted_total") >= 1


def test_bytes_in_and_out_are_exact(shared):
    server, api = shared
    before = api.quiet()
    sent = b"EHLO bytes.example\r\nNOOP\r\nQUIT\r\n"
    with Wire.connect(server.host, server.port, greet=False) as w:
        w.send(sent)
        assert w.is_closed(timeout=10)
        got = w.buf
    assert got.startswith(b"220 ") and b"\r\n221 " in got, got
    after = api.quiet()
    listener = _listener(server)
    assert delta(before, after, "geosmtp_received_bytes_total", listener=listener) == len(sent)
    assert delta(before, after, "geosmtp_sent_bytes_total", listener=listener) == len(got)


def test_prometheus_output_parses(shared):
    server, api = shared
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("a@remote.example", ["alice@test.example"], MESSAGE)
    api.quiet()
    reply = api.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    expected = {
        "geosmtp_connections": "counter",
        "geosmtp_connections_current": "gauge",
        "geosmtp_connections_refused": "counter",
        "geosmtp_received_bytes": "counter",
        "geosmtp_sent_bytes": "counter",
        "geosmtp_sessions": "counter",
        "geosmtp_tls_sessions": "counter",
        "geosmtp_commands": "counter",
        "geosmtp_replies": "counter",
        "geosmtp_messages_accepted": "counter",
        "geosmtp_messages_rejected": "counter",
        "geosmtp_recipients": "counter",
        "geosmtp_auth": "counter",
        "geosmtp_message_size_bytes": "histogram",
        "geosmtp_session_duration_seconds": "histogram",
        "geosmtp_delivery_seconds": "histogram",
    }
    assert {name: families[name].type for name in expected} == expected
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]
    listener = _listener(server)
    outcomes = {
        s.labels["outcome"]
        for s in families["geosmtp_sessions"].samples
        if s.labels["listener"] == listener
    }
    assert {"quit", "lost", "timeout", "errors", "kicked"} <= outcomes
    buckets = [
        s for s in families["geosmtp_message_size_bytes"].samples if s.name.endswith("_bucket")
    ]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 1
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative


def test_connections_current_follows_open_sessions(shared):
    server, api = shared
    api.quiet()
    listener = _listener(server)

    def current() -> float:
        return total(api.metrics(), "geosmtp_connections_current", listener=listener)

    with Wire.connect(server.host, server.port) as first:
        first.expect("EHLO one.example", 250)
        assert current() == 1
        with Wire.connect(server.host, server.port) as second:
            second.expect("EHLO two.example", 250)
            assert current() == 2
            assert api.stats()["connections"]["current"] == 2
            second.expect("QUIT", 221)
        wait_until(lambda: current() == 1, what="one session left")
    wait_until(lambda: current() == 0, what="no session left")


def test_sessions_by_outcome(make_server):
    server = make_server(with_admin({"timeouts": {"command": 1}, "limits": {"max_errors": 3}}))
    api = admin_of(server)
    before = api.quiet()
    with Wire.connect(server.host, server.port) as idle:  # times out
        idle.expect("EHLO idle.example", 250)
        with Wire.connect(server.host, server.port) as kicked:
            kicked.expect("NOOP", 250)
            (ident,) = [s["id"] for s in api.sessions() if s["helo"] is None]
            api.ok("DELETE", f"/api/v1/sessions/{ident}")
            assert kicked.reply()[0] == 421
        code, text = idle.reply(timeout=10)
        assert code == 421 and text.startswith("4.4.2"), text
    with Wire.connect(server.host, server.port) as errors:
        errors.send(b"BOGUS\r\n" * 3)
        assert [errors.reply()[0] for _ in range(4)] == [500, 500, 500, 421]
        assert errors.is_closed()
    with Wire.connect(server.host, server.port) as lost:
        lost.expect("EHLO lost.example", 250)
    after = api.quiet()
    listener = _listener(server)
    outcomes = {
        o: delta(before, after, "geosmtp_sessions_total", listener=listener, outcome=o)
        for o in ("quit", "timeout", "kicked", "errors", "lost", "shutdown")
    }
    assert outcomes == {"quit": 0, "timeout": 1, "kicked": 1, "errors": 1, "lost": 1, "shutdown": 0}
    assert delta(before, after, "geosmtp_commands_total", verb="UNKNOWN") == 3
    assert delta(before, after, "geosmtp_replies_total", **{"class": "5xx"}) == 3
    # 421 from the timeout, the kick and the error limit.
    assert delta(before, after, "geosmtp_replies_total", **{"class": "4xx"}) == 3
    assert delta(before, after, "geosmtp_session_duration_seconds_count") == 4


def test_refused_at_the_cap(make_server):
    server = make_server(with_admin({"max_clients": 1}))
    api = admin_of(server)
    before = api.quiet()
    with Wire.connect(server.host, server.port) as held:
        held.expect("EHLO held.example", 250)
        for _ in range(2):
            with Wire.connect(server.host, server.port, greet=False) as extra:
                assert extra.reply()[0] == 421
                assert extra.is_closed()
    after = api.quiet()
    listener = _listener(server)
    assert delta(before, after, "geosmtp_connections_refused_total", listener=listener) == 2
    assert delta(before, after, "geosmtp_connections_total", listener=listener) == 1
    assert api.stats()["connections"]["refused"] == 2


def test_auth_success_and_failure(make_server):
    server = make_server(
        with_admin(
            {
                "users": users(alice="right password"),
                "auth": {"allow_plaintext": True, "failure_delay": 0},
            }
        )
    )
    api = admin_of(server)
    before = api.quiet()

    def plain(user: str, password: str) -> str:
        return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()

    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO auth.example", 250)
        w.expect(plain("alice", "wrong password"), 535)
        assert api.sessions()[0]["user"] is None
        w.expect(plain("alice", "right password"), 235)
        (info,) = api.sessions()
        assert info["user"] == "alice"
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO auth.example", 250)
        w.expect(plain("nobody", "right password"), 535)
    after = api.quiet()
    assert delta(before, after, "geosmtp_auth_total", result="success") == 1
    assert delta(before, after, "geosmtp_auth_total", result="failure") == 2
    assert delta(before, after, "geosmtp_commands_total", verb="AUTH") == 3


def test_tls_sessions_counted(make_server, certs):
    server = make_server(with_admin({"tls": certs.tls_config}))
    api = admin_of(server)
    before = api.quiet()
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.starttls(context=certs.client_context())
        (info,) = api.sessions()
        assert info["tls"] is True
        assert client.noop()[0] == 250
    with smtplib.SMTP(server.host, server.port, timeout=10) as plain:
        assert plain.noop()[0] == 250
    after = api.quiet()
    listener = _listener(server)
    assert delta(before, after, "geosmtp_tls_sessions_total", listener=listener) == 1
    assert delta(before, after, "geosmtp_connections_total", listener=listener) == 2


def test_rejections_counted_by_stage(make_server):
    server = make_server(with_admin({"unknown_recipients": "reject", "users": users(alice=None)}))
    api = admin_of(server)
    before = api.quiet()
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO reject.example", 250)
        w.expect("MAIL FROM:<a@remote.example>", 250)
        code, _ = w.cmd("RCPT TO:<nobody@test.example>")
        assert code == 550
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("QUIT", 221)
    after = api.quiet()
    assert delta(before, after, "geosmtp_messages_rejected_total", stage="RCPT") == 1
    assert delta(before, after, "geosmtp_messages_accepted_total") == 0
    assert api.stats()["messages"]["rejected"] >= 1
