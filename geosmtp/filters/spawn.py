"""Starting a program without stopping the server, and reaping it.

`start(argv, env, fds)` runs glibc's `posix_spawn` (a vfork, then the exec)
in a thread of the hub's pool, through ctypes: the calling thread waits for
the child's exec, and ctypes lets go of the GIL meanwhile, so the server
goes on serving. (`os.posix_spawn` keeps the GIL through the exec: every
session stood still 1-3 ms per program on a loaded machine. `gevent.subprocess`
forks the whole server and runs Python in the child: 5 ms of the server's
CPU and 20-50 ms before the program starts.)

The child gets the three descriptors it is given as 0, 1 and 2, and nothing
else (every descriptor Python, gevent and libev open is close-on-exec); a
session and process group of its own; every signal at its default, none
blocked (glibc leaves its own two, 32 and 33, ignored; glibc programs set
them up themselves).

`wait(pid)` is its exit status, waited for cooperatively. Children are reaped
by libev (its SIGCHLD handler waits for any child); one child watcher for
every pid (`Reaper`) keeps each status until it is asked for, so a program
that ends before the thread that started it has even returned its pid is
not lost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import gevent
from gevent.event import AsyncResult

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
#: Room for glibc's opaque posix_spawn_file_actions_t (80 octets) and
#: posix_spawnattr_t (336), and sigset_t (128), with margin.
_OPAQUE = 1024
_SETSIGDEF, _SETSIGMASK, _SETSID = 0x04, 0x08, 0x80  # <spawn.h>

#: Ignored in Python (so in the server), back to their defaults in the program,
#: as subprocess's restore_signals does: a program writing to a closed pipe dies.
_DEFAULT_SIGNALS = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]
#: A status nobody asked for is kept this long (a child someone else started).
_KEEP_UNCLAIMED = 60.0


def _posix_spawn(path: bytes, argv: list[bytes], env: list[bytes], fds: Sequence[int]) -> int:
    """libc's posix_spawn (in a thread: the GIL is let go during the call); the
    pid, or minus the errno (a thread must not raise: gevent would log it)."""
    actions = ctypes.create_string_buffer(_OPAQUE)
    attr = ctypes.create_string_buffer(_OPAQUE)
    defaults = ctypes.create_string_buffer(_OPAQUE)
    mask = ctypes.create_string_buffer(_OPAQUE)
    _libc.posix_spawn_file_actions_init(actions)
    _libc.posix_spawnattr_init(attr)
    try:
        for target, fd in enumerate(fds):
            if _libc.posix_spawn_file_actions_adddup2(actions, fd, target):
                return -ctypes.get_errno() or -1
        _libc.sigemptyset(defaults)
        for sig in _DEFAULT_SIGNALS:
            _libc.sigaddset(defaults, int(sig))
        _libc.sigemptyset(mask)
        _libc.posix_spawnattr_setsigdefault(attr, defaults)
        _libc.posix_spawnattr_setsigmask(attr, mask)
        _libc.posix_spawnattr_setflags(attr, ctypes.c_short(_SETSIGDEF | _SETSIGMASK | _SETSID))
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        c_env = (ctypes.c_char_p * (len(env) + 1))(*env, None)
        pid = ctypes.c_int()
        error = _libc.posix_spawn(ctypes.byref(pid), path, actions, attr, c_argv, c_env)
        return -error if error else pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attr)


class Reaper:
    """Every child's exit status, from one libev child watcher on all pids."""

    def __init__(self) -> None:
        loop = gevent.get_hub().loop
        loop.install_sigchld()
        self._ended: dict[int, tuple[int, float]] = {}
        self._waiting: dict[int, AsyncResult[int]] = {}
        self._watcher = loop.child(0, False)  # 0: any child
        self._watcher.start(self._on_child)

    def _on_child(self) -> None:
        pid, status = self._watcher.rpid, self._watcher.rstatus
        if pid is None:  # a watcher that fired has a pid: never so
            return
        waiter = self._waiting.pop(pid, None)
        if waiter is not None:
            waiter.set(status)
            return
        now = time.monotonic()
        self._ended[pid] = (status, now)
        if len(self._ended) > 64:  # children of others (gevent.subprocess) pile up
            for old in [p for p, (_, t) in self._ended.items() if now - t > _KEEP_UNCLAIMED]:
                del self._ended[old]

    def wait(self, pid: int) -> int:
        """The wait status of child `pid` once it has ended (cooperative)."""
        ended = self._ended.pop(pid, None)
        if ended is not None:
            return ended[0]
        waiter: AsyncResult[int] = self._waiting.setdefault(pid, AsyncResult())
        try:
            return cast(int, waiter.get())  # `_on_child` sets a status, never None
        except BaseException:
            if not waiter.ready():
                self._waiting.pop(pid, None)  # asked again later: it will be in _ended
            raise


_reaper: Reaper | None = None


def reaper() -> Reaper:
    global _reaper
    if _reaper is None:
        _reaper = Reaper()
    return _reaper


def start(argv: Sequence[str], env: Mapping[str, str], fds: Sequence[int]) -> int:
    """Start `argv` (`argv[0]` a path) with `fds` as its 0, 1, 2; its pid.
    OSError when it cannot be started (no such file, not executable).

    `fds` (the program's ends of its pipes) are closed here once the child
    has them, whatever happens: never earlier, or another file could take
    their numbers before the child's dup2. Interrupted (the caller's greenlet
    killed), the program is killed and reaped once it has started, and the
    interruption goes on."""
    reaper()  # watching before any child can end
    fds = _above_stdio(fds)
    path = os.fsencode(argv[0])
    c_argv = [os.fsencode(a) for a in argv]
    c_env = [os.fsencode(f"{k}={v}") for k, v in env.items()]
    pending = gevent.get_hub().threadpool.spawn(_posix_spawn, path, c_argv, c_env, list(fds))
    try:
        result = cast(int, pending.get())  # `_posix_spawn`'s pid or -errno
    except BaseException:
        gevent.spawn(_abandon, pending, fds)
        raise
    _close_all(fds)
    if result < 0:
        raise OSError(-result, os.strerror(-result), argv[0])
    return result


def _above_stdio(fds: Sequence[int]) -> list[int]:
    """`fds` with any below 3 moved above (a server started with 0, 1 or 2
    closed gets pipes there): else a dup2 onto 0, 1 or 2 could overwrite
    one of them before it is itself dup2'd."""
    out = []
    for fd in fds:
        if fd < 3:
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = moved
        out.append(fd)
    return out


def _abandon(pending: Any, fds: Sequence[int]) -> None:
    try:
        result = pending.get()
    finally:
        _close_all(fds)
    if result > 0:
        kill_group(result)
        reaper().wait(result)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def kill_group(pid: int) -> None:
    """SIGKILL to the process group `pid` leads (the program and whatever it
    started in it). While a process of the group lives no other group can
    take its id; once none does, the kill finds nothing."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
