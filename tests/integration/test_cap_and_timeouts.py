"""The client cap (421 4.7.0 at once) and the command/DATA timeouts (421 4.4.2)."""

from __future__ import annotations

import re
import smtplib
import socket
import time

from geosmtp.server.listeners import PROXY_LOG_BURST, PROXY_LOG_INTERVAL
from tests.conftest import free_port, wait_until
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


def test_a_flood_of_connections_without_a_proxy_header_writes_a_bounded_number_of_lines(
    make_server,
):
    """A connection closed on a proxy_protocol listener (no PROXY header) is
    a WARNING line; a stranger connecting in a loop gets the burst of lines
    (listeners.PROXY_LOG_BURST), then one every PROXY_LOG_INTERVAL seconds
    that counts those held back in between; another reason's lines have a
    budget of their own."""
    proxied, untrusted = free_port(), free_port()
    server = make_server(
        {
            "workers": 1,
            "listeners": [
                {"address": "127.0.0.1", "port": free_port(), "role": "mx"},
                {
                    "address": "127.0.0.1",
                    "port": proxied,
                    "role": "mx",
                    "proxy_protocol": True,
                    "proxy_trusted": ["127.0.0.1"],
                },
                {
                    "address": "127.0.0.1",
                    "port": untrusted,
                    "role": "mx",
                    "proxy_protocol": True,
                    "proxy_trusted": ["192.0.2.0/24"],
                },
            ],
        }
    )

    def stranger(port: int = proxied) -> None:
        with socket.create_connection((server.host, port), timeout=5) as sock:
            sock.sendall(b"EHLO stranger.example\r\n")
            try:
                assert sock.recv(1024) == b""  # closed before any greeting
            except ConnectionResetError:
                pass  # closed with the EHLO unread

    def lines() -> list[str]:
        return [li for li in server.server_log().splitlines() if "proxy: closed [" in li]

    flood = 4 * PROXY_LOG_BURST
    started = time.monotonic()
    for _ in range(flood):
        stranger()
    assert time.monotonic() - started < PROXY_LOG_INTERVAL  # else a line more is due

    def counted() -> str | None:
        found = [li for li in lines() if "more since the last such line" in li]
        if not found:
            stranger()  # one more, which writes the line once the interval is over
        return found[0] if found else None

    last = wait_until(counted, timeout=3 * PROXY_LOG_INTERVAL, interval=0.5, what="the count")
    written = lines()
    assert all("not a PROXY header" in li for li in written)
    assert written.index(last) == PROXY_LOG_BURST  # the burst, then this one
    held = int(re.search(r"\(and (\d+) more since", last)[1])  # type: ignore[index]
    assert held >= flood - PROXY_LOG_BURST
    # Each reason has its own budget: the flood of one hides no other.
    stranger(untrusted)
    wait_until(
        lambda: any("not in proxy_trusted" in li for li in lines()), what="the other reason's line"
    )
