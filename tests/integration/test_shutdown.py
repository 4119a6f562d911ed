"""Graceful stop on SIGTERM: idle sessions get 421 4.3.2, mail in flight completes."""

from __future__ import annotations

import signal
import socket

from tests.conftest import wait_until
from tests.integration.wire import Wire


def _refused(host: str, port: int) -> bool:
    """True when a connection is refused, or accepted only to be told 421 and closed."""
    try:
        w = Wire.connect(host, port, timeout=2, greet=False)
    except OSError:
        return True
    with w:
        try:
            code, _ = w.reply(timeout=2)
        except (OSError, TimeoutError):
            return True
        return code == 421


def test_sigterm_closes_idle_sessions_with_421(make_server):
    server = make_server({"timeouts": {"shutdown_grace": 1}})
    with (
        Wire.connect(server.host, server.port) as idle,
        Wire.connect(server.host, server.port) as mid,
    ):
        idle.expect("EHLO idle.example", 250)
        mid.expect("EHLO mid.example", 250)
        mid.expect("MAIL FROM:<carol@remote.example>", 250)
        mid.expect("RCPT TO:<alice@test.example>", 250)
        mid.expect("DATA", 354)
        mid.send(b"Subject: never finished\r\n\r\nhalf a message\r\n")
        wait_until(lambda: server.tmp_files(), what="a spool file")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "signal received" in server.server_log(), what="signal logged")
        assert _refused(server.host, server.port)
        for w in (idle, mid):
            code, text = w.reply(timeout=10)
            assert code == 421 and text.startswith("4.3.2"), text
            assert w.is_closed(timeout=5)
        assert server.process.wait(timeout=20) == 0
    assert server.tmp_files() == []
    assert server.all_messages() == []


def test_message_in_flight_completes_within_grace(make_server):
    server = make_server({"timeouts": {"shutdown_grace": 3}})
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO busy.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect("RCPT TO:<bob@test.example>", 250)
        w.expect("DATA", 354)
        w.send(b"Subject: in flight\r\n\r\nfirst part\r\n")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "signal received" in server.server_log(), what="signal logged")
        # New clients are turned away while this one finishes.
        assert _refused(server.host, server.port)
        w.send(b"second part\r\n")
        w.expect(".", 250)
        # Once the grace period is over the session is told the server is going away.
        code, text = w.reply(timeout=15)
        assert code == 421 and text.startswith("4.3.2"), text
        assert w.is_closed(timeout=5)
    assert server.process.wait(timeout=20) == 0
    (path,) = server.messages("bob")
    assert path.read_bytes().endswith(b"\n\nfirst part\nsecond part\n")
    assert server.tmp_files() == []


def test_sigint_with_no_sessions_exits_0_and_stops_listening(make_server):
    server = make_server()
    assert server.stop(signal.SIGINT) == 0
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((server.host, server.port)) != 0
