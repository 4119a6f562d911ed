"""The client cap (421 4.7.0 at once) and the command/DATA timeouts (421 4.4.2)."""

from __future__ import annotations

import smtplib
import time

from tests.conftest import wait_until
from tests.integration.wire import Wire


def test_client_cap(make_server):
    server = make_server({"max_clients": 3})
    held = [Wire.connect(server.host, server.port) for _ in range(3)]
    try:
        extra = Wire.connect(server.host, server.port, timeout=5, greet=False)
        code, text = extra.reply()
        assert code == 421 and text.startswith("4.7.0"), text
        assert extra.is_closed(timeout=5)
        extra.close()
        # The three held sessions are still fully served.
        for i, w in enumerate(held):
            w.expect(f"EHLO held{i}.example", 250)
        held.pop().expect("QUIT", 221)

        # A freed slot is reused once the server has seen the close.
        def served() -> bool:
            w = Wire.connect(server.host, server.port, timeout=5, greet=False)
            code, _ = w.reply()
            if code != 220:
                w.close()
                return False
            held.append(w)
            return True

        wait_until(served, what="a free slot")
        held[-1].expect("EHLO again.example", 250)
    finally:
        for w in held:
            w.close()
    server.logged("too many connections")


def test_idle_client_gets_421_timeout(make_server):
    server = make_server({"timeouts": {"command": 0.3}})
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO idle.example", 250)
        started = time.monotonic()
        code, text = w.reply(timeout=10)
        assert code == 421 and text.startswith("4.4.2"), text
        assert 0.25 < time.monotonic() - started < 9
        assert w.is_closed(timeout=5)
    # Other clients are unaffected.
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.noop()[0] == 250


def test_data_block_timeout(make_server):
    server = make_server({"timeouts": {"data_block": 0.3}})
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO slow.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        w.send(b"Subject: slow\r\n\r\nsome of the body\r\n")
        code, text = w.reply(timeout=10)
        assert code == 421 and text.startswith("4.4.2"), text
        assert w.is_closed(timeout=5)
    wait_until(lambda: server.tmp_files() == [], what="spool removed")
    assert server.all_messages() == []


def test_data_total_timeout_for_a_trickling_client(make_server):
    server = make_server({"timeouts": {"data_total": 0.5, "data_block": 30}})
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO slow.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        deadline = time.monotonic() + 10
        reply = None
        while reply is None and time.monotonic() < deadline:
            try:
                w.send(b"x\r\n")
            except OSError:
                break
            try:
                reply = w.reply(timeout=0.2)
            except TimeoutError:
                continue
        assert reply is not None, "no reply while trickling"
        code, text = reply
        assert code == 421 and text.startswith("4.4.2"), text
    wait_until(lambda: server.tmp_files() == [], what="spool removed")
    assert server.all_messages() == []


def test_a_flood_over_the_cap_writes_one_line(make_server):
    """Each refused client once wrote a WARNING line: a stranger could fill
    the log at the rate it connects. One line a minute per worker now; the
    metric still counts each."""
    server = make_server({"max_clients": 2, "workers": 1})
    held = [Wire.connect(server.host, server.port) for _ in range(2)]
    try:
        for _ in range(20):
            extra = Wire.connect(server.host, server.port, timeout=5, greet=False)
            assert extra.reply()[0] == 421
            extra.close()
    finally:
        for w in held:
            w.close()
    wait_until(lambda: "refused [" in server.server_log(), what="the refusal line")
    lines = [li for li in server.server_log().splitlines() if "refused [" in li]
    assert len(lines) == 1, lines
    assert "too many connections" in lines[0]
