"""Telling systemd how the server is doing (sd_notify(3)), without libsystemd.

systemd passes a `Type=notify` service the address of a datagram socket in
`$NOTIFY_SOCKET`: a path, or an abstract socket name when it starts with
`@`. A state is one datagram of newline-separated `KEY=value` lines. The
master sends `READY` once its listeners are bound and every worker serves,
its share of the queue loaded (systemd then starts what waits for geosmtp),
`reloading()` on SIGHUP and `READY` when the reload is done, `STOPPING` when
a stop begins, and may add a `status()` line for `systemctl status`.

`notify()` never raises and logs nothing: outside systemd, or when systemd is
gone, it returns False and the server goes on as before. With the unit's
`NotifyAccess=main` (the default for `Type=notify`) only the master's
datagrams count; a worker's or a filter program's are ignored by systemd.
"""

from __future__ import annotations

import os
import socket
import time

READY = "READY=1"
STOPPING = "STOPPING=1"
#: Seconds a datagram may wait for room in systemd's socket before it is given up.
SEND_TIMEOUT = 1.0


def reloading() -> str:
    """`RELOADING=1` with the `MONOTONIC_USEC` that systemd 253 and later ask
    for (`Type=notify-reload` requires it; `Type=notify` accepts it). Send it
    when a reload starts, then `READY` when the new configuration is in use."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={usec}"


def status(text: str) -> str:
    """`STATUS=<text>`, the line `systemctl status` shows (kept to one line)."""
    return "STATUS=" + " ".join(text.split())


def mainpid(pid: int | None = None) -> str:
    """`MAINPID=<pid>`: which process systemd should watch (this one by default)."""
    return f"MAINPID={os.getpid() if pid is None else pid}"


def notify_address(value: str | None = None) -> str | None:
    """The socket address in `$NOTIFY_SOCKET` (or `value`) as `socket` wants it:
    an absolute path, or `@name` as the abstract name `\\0name`. None when it is
    unset or empty, or of a kind not handled here (systemd 254's `vsock:`)."""
    if value is None:
        value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str) -> bool:
    """Send `state` (`READY`, `STOPPING`, `reloading()`, `status(...)`, several
    joined with newlines) to `$NOTIFY_SOCKET`. True when it was sent; False when
    there is no socket to send to or the send failed (never raises)."""
    address = notify_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8"), address)
    except (OSError, ValueError):  # ValueError: a NUL inside the path
        return False
    return True
