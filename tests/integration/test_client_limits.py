"""Per-client limits (client_limits:, across workers) and the stress timeout (stress:)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

from tests.conftest import listeners, wait_until
from tests.integration.adminapi import admin_of, with_admin
from tests.integration.wire import Wire

#: The client address of the tests that count connections: not the one the
#: test harness probed the server from (127.0.0.1) before the test began.
CLIENT = "127.0.0.2"


def connect(server, source: str = CLIENT, greet: bool = True) -> Wire:
    sock = socket.create_connection((server.host, server.port), 5, source_address=(source, 0))
    w = Wire(sock, 5)
    if greet:
        code, text = w.reply()
        assert code == 220, (code, text)
    return w


def refused(server, port: int | None = None) -> tuple[int, str]:
    """Connect and read the one reply of a client refused at once (then closed)."""
    w = Wire.connect(server.host, port or server.port, timeout=5, greet=False)
    try:
        code, text = w.reply()
        assert w.is_closed(timeout=5)
        return code, text
    finally:
        w.close()


def logged_once(server, text: str) -> bool:
    """`text` is in the server's log exactly once (the log comes through the
    master: wait for it to appear)."""
    wait_until(lambda: text in server.server_log(), what=f"{text!r} in the log")
    return server.server_log().count(text) == 1


def limits(**client_limits) -> dict:
    return {"client_limits": client_limits}


def test_open_connections_per_address_are_exact_across_two_workers(make_server):
    # A socket per worker (SO_REUSEPORT): the kernel spreads the connections
    # over both by a hash of their ports (with one shared socket one worker
    # may take them all).
    overrides = {"workers": 2, "reuse_port": True, **limits(max_connections=3)}
    server = make_server(with_admin(overrides))
    api = admin_of(server)
    held: list[Wire] = []
    pids: set[str] = set()
    try:
        for round_ in range(8):  # bounded: a place freed, taken again, one more refused
            while len(held) < 3:
                w = Wire.connect(server.host, server.port)
                w.expect(f"EHLO r{round_}.example", 250)
                held.append(w)
            code, text = refused(server)
            assert code == 421 and text.startswith("4.7.0"), text
            assert "too many connections from your address" in text
            pids |= {s["id"][:6] for s in api.sessions()}
            held.pop(round_ % 3).expect("QUIT", 221)
            wait_until(lambda: len(api.sessions()) == 2, what="the quit session gone")
        # The three held sessions are still served.
        for w in held:
            w.expect("NOOP", 250)
    finally:
        for w in held:
            w.close()
    assert len(pids) == 2, f"sessions were all in one worker: {pids}"
    metrics = api.quiet()
    assert metrics["geosmtp_client_limit_refusals_total"]["limit=connections"] == 8
    # Logged once per client and window, not once per refusal.
    assert logged_once(server, "is over client_limits.max_connections")


def test_trusted_networks_are_exempt(make_server):
    server = make_server(
        {"trusted_networks": ["127.0.0.1/32"], **limits(max_connections=1, max_errors=1)}
    )
    held = [Wire.connect(server.host, server.port) for _ in range(3)]
    try:
        for w in held:
            w.expect("NOSUCHCOMMAND", 500)
            w.expect("NOOP", 250)
    finally:
        for w in held:
            w.close()


def test_connection_rate_per_minute(make_server):
    server = make_server(limits(connection_rate=3))
    for _ in range(3):
        with connect(server) as w:
            w.expect("QUIT", 221)
    with connect(server, greet=False) as w:
        code, text = w.reply()
        assert code == 421 and text.startswith("4.7.0") and "in a minute" in text, text
        assert w.is_closed()
    with connect(server, greet=False) as w:
        assert w.reply()[0] == 421
    with connect(server, "127.0.0.3") as w:  # another address has its own count
        w.expect("QUIT", 221)
    assert logged_once(server, "is over client_limits.connection_rate")


def test_messages_per_minute_get_450_and_the_session_goes_on(make_server):
    server = make_server(limits(message_rate=2))
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        for i in range(2):
            w.expect("MAIL FROM:<a@remote.example>", 250)
            w.expect("RCPT TO:<alice@test.example>", 250)
            w.expect("DATA", 354)
            w.expect(f"Subject: {i}\r\n\r\nbody\r\n.", 250)
        code, text = w.cmd("MAIL FROM:<a@remote.example>")
        assert code == 450 and text.startswith("4.7.1") and "messages" in text, text
        w.expect("NOOP", 250)  # the session goes on
    # Across sessions too.
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        assert w.cmd("MAIL FROM:<a@remote.example>")[0] == 450
        w.expect("QUIT", 221)
    assert len(server.messages("alice")) == 2


def test_recipients_per_minute_get_450(make_server):
    server = make_server(limits(recipient_rate=3))
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<a@remote.example>", 250)
        for _ in range(3):
            w.expect("RCPT TO:<alice@test.example>", 250)
        code, text = w.cmd("RCPT TO:<bob@test.example>")
        assert code == 450 and text.startswith("4.7.1") and "recipients" in text, text
        w.expect("DATA", 354)  # the recipients accepted still get the message
        w.expect("Subject: x\r\n\r\nbody\r\n.", 250)
    assert len(server.messages("alice")) == 1 and server.messages("bob") == []
    assert logged_once(server, "is over client_limits.recipient_rate")


def test_the_error_budget_is_per_address_over_sessions(make_server):
    server = make_server(limits(max_errors=5))  # limits.max_errors (per session) is 20
    with Wire.connect(server.host, server.port) as w:
        for _ in range(3):
            w.expect("BOGUS", 500)
        w.expect("QUIT", 221)
    with Wire.connect(server.host, server.port) as w:
        w.expect("BOGUS", 500)
        w.send(b"BOGUS\r\n")  # the fifth error of this address
        assert w.reply()[0] == 500
        code, text = w.reply()
        assert code == 421 and text.startswith("4.7.0") and "errors from your address" in text
        assert w.is_closed()
    code, text = refused(server)  # and at connect, until the window ends
    assert code == 421 and "errors from your address" in text, text
    assert logged_once(server, "is over client_limits.max_errors")


def test_pop3_is_held_to_the_open_connections_per_address(make_server):
    server = make_server({"listeners": listeners("mx", "pop3"), **limits(max_connections=2)})
    pop3 = server.ports["pop3"]
    held = [Wire.connect(server.host, pop3, greet=False) for _ in range(2)]
    try:
        for w in held:
            assert w._line(time.monotonic() + 5).startswith(b"+OK")
        w = Wire.connect(server.host, pop3, timeout=5, greet=False)
        line = w._line(time.monotonic() + 5)
        assert line.startswith(b"-ERR [SYS/TEMP]") and b"from your address" in line, line
        w.close()
        # SMTP and POP3 count together: the address has two open.
        assert refused(server)[0] == 421
    finally:
        for w in held:
            w.close()


def test_under_stress_idle_clients_are_timed_out_and_a_new_one_is_served(make_server):
    server = make_server(
        with_admin(
            {
                "max_clients": 10,
                "timeouts": {"command": 300},
                "stress": {"threshold": 80, "command_timeout": 1},
                **limits(max_connections=20),
            }
        )
    )
    api = admin_of(server)
    started = time.monotonic()
    idle = [Wire.connect(server.host, server.port) for _ in range(10)]
    try:
        assert refused(server)[0] == 421  # every slot is taken
        for w in idle:  # each is closed with a timeout reply, far sooner than 300 s
            code, text = w.reply(timeout=10)
            assert code == 421 and text.startswith("4.4.2"), text
            assert w.is_closed()
        assert time.monotonic() - started < 10
    finally:
        for w in idle:
            w.close()

    def served() -> bool:
        w = Wire.connect(server.host, server.port, timeout=5, greet=False)
        with w:
            return w.reply()[0] == 220

    wait_until(served, what="a new client served")
    wait_until(lambda: "stress over" in server.server_log(), what="the end of stress logged")
    log = server.server_log()
    assert len(re.findall(r"stress: \d+ of max_clients 10", log)) == 1
    # Every worker looks at the load on its own (each within STRESS_CHECK).
    wait_until(lambda: api.metrics()["geosmtp_stress"] == 0, what="the gauge back at 0")


def test_a_worker_killed_with_connections_open_does_not_hold_them_for_good(make_server):
    server = make_server({"workers": 1, **limits(max_connections=2)})
    held = [connect(server) for _ in range(2)]
    with connect(server, greet=False) as w:
        assert w.reply()[0] == 421
    old = server.worker
    os.kill(old, signal.SIGKILL)
    for w in held:
        assert w.is_closed()
        w.close()
    wait_until(lambda: server.workers() not in ([], [old]), what="a new worker")
    # Nobody holds a connection now: the address may open two again.
    held = [connect(server) for _ in range(2)]
    try:
        with connect(server, greet=False) as w:
            assert w.reply()[0] == 421
    finally:
        for w in held:
            w.close()


def test_errors_of_a_session_its_own_limit_ended_count_too(make_server):
    # One write of bad commands: the session's own limit (limits.max_errors)
    # ends it in the middle of the batch; those errors still count.
    server = make_server({"limits": {"max_errors": 10}, **limits(max_errors=10)})
    with Wire.connect(server.host, server.port) as w:
        w.send(b"BOGUS\r\n" * 10)
        codes = [w.reply()[0] for _ in range(11)]
        assert codes == [500] * 10 + [421]
        assert w.is_closed()

    def refused_at_connect() -> bool:
        with Wire.connect(server.host, server.port, greet=False) as w:
            code, text = w.reply()
        assert code in (220, 421), text
        return code == 421 and "errors from your address" in text

    # The count is added as the session ends, a moment after its last reply.
    wait_until(refused_at_connect, what="the address refused")


def test_by_default_an_address_may_hold_fifty_connections(make_server):
    server = make_server()  # no client_limits section: the defaults
    held: list[Wire] = []
    try:
        for _ in range(50):
            held.append(connect(server))
        with connect(server, greet=False) as w:
            code, text = w.reply()
            assert code == 421 and "from your address" in text, text
        with connect(server, "127.0.0.3") as w:  # another address is served
            w.expect("QUIT", 221)
    finally:
        for w in held:
            w.close()
