"""Small probes shared by the servers and the peers: a free loopback port,
"does it greet?", and a process with all its descendants."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def greets(host: str, port: int, prefix: bytes, timeout: float = 2.0) -> bool:
    """Does a server on host:port send a first line starting with `prefix`
    (`220` for SMTP, `+OK` for POP3)? Then QUIT, which both understand."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(1024)
                if not chunk:
                    return False
                data += chunk
            s.sendall(b"QUIT\r\n")
            try:
                s.recv(1024)
            except OSError:
                pass
            return data.startswith(prefix)
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now (from /proc/PID/task/TID/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
    return out


def started(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot), to tell it from a later
    process with the same number; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> object:
    """Poll `predicate` until it is true (its value) or `timeout` (TimeoutError)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
