"""sd_notify: datagrams to a real AF_UNIX socket the test binds, as systemd does."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from geosmtp.server import notify as sd
from geosmtp.server.notify import READY, STOPPING, mainpid, notify, reloading, status


@pytest.fixture
def listener(tmp_path: Path, monkeypatch) -> Iterator[socket.socket]:
    """systemd's side: a datagram socket bound to a path, named in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_ready_reaches_a_path_socket(listener):
    assert notify(READY) is True
    assert listener.recv(4096) == b"READY=1"


def test_an_abstract_socket_is_named_with_an_at(monkeypatch):
    name = f"geosmtp-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(STOPPING) is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_several_states_in_one_datagram(listener):
    assert notify("\n".join([READY, status("up: 6 listeners"), mainpid()]))
    assert listener.recv(4096).decode().split("\n") == [
        "READY=1",
        "STATUS=up: 6 listeners",
        f"MAINPID={os.getpid()}",
    ]


def test_reloading_carries_the_monotonic_clock(listener):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify(reloading())
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = listener.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_one_line():
    assert status("queue:\n 3 messages\r\n") == "STATUS=queue: 3 messages"
    assert mainpid(1234) == "MAINPID=1234"


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_nothing_to_send_to_is_false(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify(READY) is False


def test_a_failed_send_is_false_never_an_exception(tmp_path, monkeypatch):
    # Nothing bound at the path (systemd went away), then a path with a NUL in it.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify(READY) is False
    monkeypatch.setattr(sd, "notify_address", lambda: "/bad\0path")
    assert notify(READY) is False


def test_a_full_socket_times_out_as_false(listener, monkeypatch):
    monkeypatch.setattr(sd, "SEND_TIMEOUT", 0.05)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    sent = 0
    while notify("STATUS=" + "x" * 2000):  # nobody reads: the queue fills
        sent += 1
        assert sent < 10_000, "the socket never filled"
    assert listener.recv(4096).startswith(b"STATUS=x")
