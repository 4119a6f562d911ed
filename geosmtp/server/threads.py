"""Blocking work in the hub's threadpool, in the order it was asked for, safe
against an interrupted caller."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

import gevent
import gevent.event
from gevent.hub import Hub, Waiter

T = TypeVar("T")


class FairSlots:
    """The pool's slots (`threadpool.maxsize` jobs at once), given out first come,
    first served.

    `ThreadPool.spawn` waits for a slot on a gevent `Semaphore`, whose `acquire`
    takes a free count without looking at who already waits: a session whose
    final dot arrives just after a job ended gets that job's slot ahead of the
    sessions queued before it, and under load most do (87% of the trips at 100
    sessions; bench/README.md, "fair latency"), so the queued ones wait on, some
    for seconds. Here a freed slot goes to the longest waiter, and a newcomer
    queues behind the waiters; a killed waiter leaves the queue, or passes on the
    slot it was given.
    """

    def __init__(self, hub: Hub, size: int | None = None) -> None:
        self.hub = hub
        self._size = size  # None: as many as the hub's pool has threads
        self.busy = 0  # slots held (and handed to a waiter not yet resumed)
        self.waiting: deque[Waiter] = deque()

    @property
    def size(self) -> int:
        return self._size if self._size is not None else self.hub.threadpool.maxsize

    def acquire(self) -> None:
        if not self.waiting and self.busy < self.size:
            self.busy += 1
            return
        waiter: Waiter[None] = Waiter(self.hub)
        self.waiting.append(waiter)
        try:
            waiter.get()  # the slot is counted for us when release() hands it over
        except BaseException:
            try:
                self.waiting.remove(waiter)
            except ValueError:  # handed a slot already: pass it on
                self.release()
            raise

    def release(self) -> None:
        if self.waiting and self.busy <= self.size:
            # Straight to the next in line (busy stays as it is), so nobody else
            # can take it meanwhile. Waiter.switch runs in the hub.
            self.hub.loop.run_callback(self.waiting.popleft().switch, None)
        else:
            self.busy -= 1


def _slots(hub: Hub) -> FairSlots:
    slots = getattr(hub, "_geosmtp_slots", None)
    if slots is None:
        slots = hub._geosmtp_slots = FairSlots(hub)  # type: ignore[attr-defined]  # ours, on the hub
    return slots


def _caught(fn: Callable[..., T], args: tuple) -> tuple[T | None, Exception | None]:
    """`fn(*args)` in the thread: its result, or the exception it raised, handed
    to the caller to raise. Raised in the thread, gevent's pool would also log
    it as an "unhandled error" with a traceback, though the caller handles it
    (a full disk is a 452 and one log line, not a traceback per message)."""
    try:
        return fn(*args), None
    except Exception as exc:
        return None, exc


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the hub's threadpool (fsync, password hashing); its result.

    Callers get the pool's threads in the order they asked (`FairSlots`): no
    session's commit waits behind commits that came after it.

    A thread cannot be stopped. When the calling greenlet is interrupted while
    it waits (killed at a server stop, a `Timeout`), it goes on waiting until
    the thread is done and only then lets the exception through: its cleanup
    (unlinking what the thread linked, closing the descriptor it fsyncs) must
    never run while the thread still works on the same files.
    """
    hub = gevent.get_hub()
    slots = _slots(hub)
    slots.acquire()
    try:
        # Never waits on the pool's own semaphore while only in_thread uses the
        # pool: its slot was freed before our result was set.
        result = hub.threadpool.spawn(_caught, fn, args)
    except BaseException:
        slots.release()
        raise
    try:
        # _caught's pair: the value is fn's whenever there is no error.
        value, error = cast("tuple[T, Exception | None]", result.get())
        if error is not None:
            raise error
        return value
    except BaseException:
        while not result.ready():
            try:
                result.wait()
            except BaseException:  # a second kill: the thread still runs, so wait on
                continue
        raise
    finally:
        slots.release()


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
