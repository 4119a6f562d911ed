"""Blocking work in the hub's threadpool, safe against an interrupted caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.event

T = TypeVar("T")


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the hub's threadpool (fsync, password hashing); its result.

    A thread cannot be stopped. When the calling greenlet is interrupted while
    it waits (killed at a server stop, a `Timeout`), it goes on waiting until
    the thread is done and only then lets the exception through: its cleanup
    (unlinking what the thread linked, closing the descriptor it fsyncs) must
    never run while the thread still works on the same files.
    """
    result = gevent.get_hub().threadpool.spawn(fn, *args)
    try:
        return result.get()
    except BaseException:
        while not result.ready():
            try:
                result.wait()
            except BaseException:  # a second kill: the thread still runs, so wait on
                continue
        raise


class Pulse:
    """Wakes every greenlet waiting on it, each time `pulse()` is called.

    (A `gevent.event.Event` set and cleared at once would wake only those that
    already run; each pulse here ends one Event and starts the next.)
    """

    def __init__(self) -> None:
        self._event = gevent.event.Event()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def pulse(self) -> None:
        event, self._event = self._event, gevent.event.Event()
        event.set()
