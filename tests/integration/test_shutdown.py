"""Graceful stop on SIGTERM: idle sessions get 421 4.3.2, mail in flight completes."""

from __future__ import annotations

import signal
import socket
import sys
import time

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


# A worker's first half second after its fork, as a busy machine stretches it:
# the child is still the master's copy (its signal handlers too) until it sets
# its own. Each worker's fork leaves a file in the server's folder (its cwd).
SLOW_FORK = """
import os, sys, time, traceback
fork, pause = os.fork, time.sleep  # before gevent patches them: the master's own
def slow_fork():
    worker = any(frame.name == "_spawn" for frame in traceback.extract_stack())
    pid = fork()
    if pid == 0 and worker:
        open(f"forked-{os.getpid()}", "w").close()
        pause(0.5)
    return pid
os.fork = slow_fork  # gevent keeps it as the original, which the master forks with
from geosmtp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_while_a_worker_starts_reaches_that_worker(make_server):
    """SIGTERM to the master just after a worker's fork: the worker stops as
    soon as it has started. It once went to the master's handler in the
    child, which only noted it there: the worker never heard of the stop and
    was killed after the grace period and 15 s more."""
    server = make_server(
        {"workers": 2, "timeouts": {"shutdown_grace": 0.2}},
        launcher=[sys.executable, "-c", SLOW_FORK],
    )
    # Worker 1 is forked once worker 0 is ready: stop while it is the copy.
    wait_until(lambda: len(list(server.root.glob("forked-*"))) == 2, what="the second fork")
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10
    log = server.server_log()
    assert "did not stop: killed" not in log, log[-3000:]
    assert log.count("ended: exit status 0") == 2, log[-3000:]  # both workers, each its own stop
