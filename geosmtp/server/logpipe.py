"""Workers' log lines, through a pipe each, written by the master.

The master is the one writer of `log.txt` and `access.log`: it alone rotates
them and applies the retention, so N processes never rename a file under one
another or write into a file that was rotated away. A worker's loguru sinks
format each line as the master's would and write it, framed, into its own
pipe (one writer per pipe: frames never interleave, and a worker killed in
the middle of a frame only cuts its own pipe's last frame, which the master
drops with the pipe).

A frame is one kind octet (`S` server log, `A` access log), four octets of
length (big-endian), then the text in UTF-8.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable

from gevent import monkey
from loguru import logger

from ..config import Log
from ..logs import ACCESS_LEVEL

_HEADER = struct.Struct(">cI")
#: Linux's F_SETPIPE_SZ: a pipe of 1 MiB holds seconds of lines, so a worker
#: never waits on the master while it is busy (a reload, a fork).
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20

SERVER, ACCESS = b"S", b"A"

#: gevent's `os.close` defers the close to its loop's next turn after a fork,
#: and the master runs no loop.
_close = monkey.get_original("os", "close")


def pipe() -> tuple[int, int]:
    """A log pipe (read end for the master, write end for a worker)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # pragma: no cover - an unprivileged size cap: the default is enough
        pass
    os.set_blocking(r, False)
    return r, w


def _writer(fd: int, kind: bytes) -> Callable[[str], None]:
    def write(message: str) -> None:
        data = message.encode("utf-8", "replace")
        view = memoryview(_HEADER.pack(kind, len(data)) + data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except InterruptedError:
                continue
            except OSError:  # the master is gone: the worker is about to die with it
                return

    return write


def forward(fd: int, log: Log) -> None:
    """In a worker: send every log line to the master through `fd`."""
    from ..logs import add_sinks, escape_message

    logger.remove()
    logger.configure(patcher=escape_message)
    add_sinks(_writer(fd, SERVER), _writer(fd, ACCESS), log.level)


class Reader:
    """The master's end of one worker's pipe: reads what is there, writes whole frames."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def read(self) -> bool:
        """Read what the pipe holds and write the whole frames; False at its end."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                self._write_frames()
                return False
            self._buffer += chunk
            if len(chunk) < 1 << 16:
                break
        self._write_frames()
        return True

    def _write_frames(self) -> None:
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + length
            if end > len(buffer):
                break
            text = buffer[start + _HEADER.size : end].decode("utf-8", "replace")
            write_forwarded(kind, text)
            start = end
        del buffer[:start]

    def close(self) -> None:
        _close(self.fd)


_server = logger.bind(forwarded=True)
_access = logger.bind(forwarded=True, access=True)


def write_forwarded(kind: bytes, text: str) -> None:
    """A worker's line into the master's sinks, as the worker formatted it."""
    if kind == ACCESS:
        _access.opt(raw=True).log(ACCESS_LEVEL, text)
    else:
        _server.opt(raw=True).log("CRITICAL", text)
