"""A thousand clients connected at once, each sending one mail: every mail stored once."""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.wire import Wire

CLIENTS = 1000
WORKERS = 100
BOXES = 10


@pytest.fixture
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = CLIENTS + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _send_one(w: Wire, i: int) -> str:
    """One pipelined transaction on an open session; returns the 250 text."""
    w.send(
        b"EHLO load.example\r\n"
        b"MAIL FROM:<load@remote.example>\r\n"
        + f"RCPT TO:<user{i % BOXES}@test.example>\r\n".encode()
        + b"DATA\r\n"
    )
    codes = [w.reply()[0] for _ in range(4)]
    assert codes == [250, 250, 250, 354], (i, codes)
    code, text = w.cmd(f"Subject: load {i}\r\n\r\nload body {i:04d}\r\n.".encode())
    assert code == 250, (i, text)
    w.expect("QUIT", 221)
    w.close()
    return text


def test_thousand_concurrent_clients(make_server, enough_descriptors):
    server = make_server(
        {
            "max_clients": CLIENTS + 50,
            "log": {"dir": "logs", "level": "INFO"},
            # All from 127.0.0.1, and all open before any sends: no limit on one
            # address's connections, and no stress (the last waits its turn for
            # longer than stress.command_timeout).
            "client_limits": {"max_connections": 0},
            "stress": {"threshold": 0},
        }
    )
    started = time.monotonic()
    sessions: list[Wire] = []
    try:
        # All sessions open (greeted) at the same time before any mail is sent.
        for _ in range(CLIENTS):
            sessions.append(Wire.connect(server.host, server.port, timeout=20))
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            replies = list(pool.map(_send_one, sessions, range(CLIENTS), timeout=60))
    finally:
        for w in sessions:
            w.close()
    assert len(set(replies)) == CLIENTS  # a distinct queue id each

    stored = server.all_messages()
    assert len(stored) == CLIENTS
    bodies = sorted(p.read_bytes().rsplit(b"\n\n", 1)[1] for p in stored)
    assert bodies == sorted(f"load body {i:04d}\n".encode() for i in range(CLIENTS))
    for box in range(BOXES):
        assert len(server.messages(f"user{box}")) == CLIENTS // BOXES
    assert server.tmp_files() == []
    assert time.monotonic() - started < 60
