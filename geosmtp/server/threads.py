"""Blocking work in the hub's threadpool, safe against an interrupted caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent

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
