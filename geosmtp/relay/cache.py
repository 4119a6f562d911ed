"""Open SMTP connections kept for the next message to the same destination
(Postfix's `scache`, with its `smtp_connection_cache_time_limit` and
`smtp_connection_reuse_count_limit`).

A connection is put back after a transaction that ended well and left it
usable; the next delivery to the same key (address, port, TLS mode, HELO
name, AUTH identity, source address, and the TLS context and checked name)
takes it, and sends RSET before its transaction. A
connection idle for more than `idle_time` seconds, or that has carried
`reuse_limit` transactions, is closed: by a reaper greenlet while the cache
holds any, or at the latest when it would be taken. Connections are taken
newest first, so that the older ones go idle and are closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

import gevent


class Cacheable(Protocol):
    @property
    def transactions(self) -> int: ...  # transactions carried so far

    def close(self) -> None: ...


C = TypeVar("C", bound=Cacheable)


class ConnectionCache(Generic[C]):
    """Idle connections by key; `take()` one, `put()` it back, `close()` them all."""

    def __init__(
        self,
        reuse_limit: int = 100,
        idle_time: float = 2.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reuse_limit = reuse_limit
        self.idle_time = idle_time
        self.clock = clock
        #: key -> [(idle since, connection)], oldest first
        self._idle: dict[Hashable, list[tuple[float, C]]] = {}
        self._reaper: gevent.Greenlet[[], None] | None = None
        self._closed = False
        #: Connections taken again, and put back, since the start (for tests and metrics).
        self.reused = 0
        self.stored = 0

    @property
    def enabled(self) -> bool:
        return self.reuse_limit > 1 and self.idle_time > 0 and not self._closed

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    def take(self, key: Hashable) -> C | None:
        """The newest idle connection for `key` that is not stale, or None."""
        entries = self._idle.get(key)
        if not entries:
            return None
        since, conn = entries.pop()
        if not entries:
            del self._idle[key]
        if self.clock() - since <= self.idle_time:
            self.reused += 1
            return conn
        conn.close()  # stale: every older one is staler
        self._close_all(self._idle.pop(key, []))
        return None

    def put(self, key: Hashable, conn: C) -> bool:
        """Keep `conn` for `key`; False (the caller closes it) when it may not be kept:
        the cache is off or closed, or the connection carried its share."""
        if not self.enabled or conn.transactions >= self.reuse_limit:
            return False
        self._idle.setdefault(key, []).append((self.clock(), conn))
        self.stored += 1
        if self._reaper is None or self._reaper.dead:
            self._reaper = gevent.spawn(self._reap_while_any)
        return True

    def reap(self) -> int:
        """Close the connections idle for too long; how many."""
        now = self.clock()
        stale: list[C] = []
        for key in list(self._idle):
            entries = self._idle[key]
            kept = [(since, conn) for since, conn in entries if now - since <= self.idle_time]
            stale += [conn for since, conn in entries if now - since > self.idle_time]
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        self._close_all([(0.0, conn) for conn in stale])
        return len(stale)

    def close(self) -> None:
        """Close every idle connection and keep no more."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for entries in idle.values():
            self._close_all(entries)
        if self._reaper is not None and self._reaper is not gevent.getcurrent():
            self._reaper.kill(block=False)

    def _reap_while_any(self) -> None:
        while self._idle and not self._closed:
            gevent.sleep(self.idle_time / 2)
            self.reap()

    @staticmethod
    def _close_all(entries: list[tuple[float, C]]) -> None:
        for _, conn in entries:
            conn.close()
