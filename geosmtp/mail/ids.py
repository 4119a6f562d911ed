"""Message (queue) ids: unique across restarts and processes."""

from __future__ import annotations

import itertools
import os
import time
import zlib
from collections.abc import Iterator

_PREFIX: str  # set by _reseed, in every process
_counter: Iterator[int]


def _reseed() -> None:
    """A prefix of this process's own: its start time in microseconds and its pid
    (no two processes share a prefix; a forked worker takes a new one)."""
    global _PREFIX, _counter
    _PREFIX = f"{time.time_ns() // 1000:X}{os.getpid() & 0xFFFF:04X}"
    _counter = itertools.count(1)


_reseed()
os.register_at_fork(after_in_child=_reseed)

#: This process's share of the outbound queue: ids it makes fall in it.
_share = (0, 1)


def share_of(queue_id: str, shares: int) -> int:
    """Which of `shares` parts of the outbound queue an id belongs to."""
    return zlib.crc32(queue_id.encode()) % shares if shares > 1 else 0


def take_share(index: int, shares: int) -> None:
    """New ids belong to share `index` of `shares` (a worker's part of the queue)."""
    global _share
    _share = (index, shares)


def new_queue_id() -> str:
    """This process's prefix and a counter, in hex, in this process's share."""
    index, shares = _share
    queue_id = f"{_PREFIX}{next(_counter):06X}"
    while shares > 1 and zlib.crc32(queue_id.encode()) % shares != index:
        queue_id = f"{_PREFIX}{next(_counter):06X}"
    return queue_id
