"""State the worker processes share: the open-connection count and the AUTH throttle.

The master makes one `SharedState` before it forks; every worker inherits the
memory (a memfd mapped `MAP_SHARED`, no file on disk) and the descriptor the
lock is taken on. A worker calls `bind(slot)` with the index the master gave
it, then counts its connections in its own slot; the cap is checked against
the sum of all slots, under the lock, so it is exact across the workers.

The lock is a POSIX record lock (`fcntl.lockf`, `F_SETLKW`) on the memfd. The
kernel drops it when its holder dies, however it dies: a worker killed with
SIGKILL inside a critical section never leaves the others waiting (a
`multiprocessing.Lock`, a semaphore in shared memory, would stay taken).
Record locks belong to the process, not to the descriptor, so the inherited
descriptor gives each worker a lock of its own, and a child does not inherit
a lock its parent holds. Two consequences: the lock is not reentrant within a
process (a second `lockf` by the holder succeeds at once and the first unlock
releases both), and closing *any* descriptor of the memfd in a process drops
that process's lock; each object keeps one descriptor and never dups it.
Within a worker only the hub's thread takes it, and nothing switches inside a
critical section (a few memory reads and writes, no I/O), so greenlets need
no lock of their own and blocking the thread on the lock is fine.

What a killed worker leaves behind: its slot still counts the connections it
had open (it never ran `closed()`), until the master calls `reset_slot` before
it gives the slot to a new worker; and its AUTH checks that were running stay
counted as running in the throttle until the client's record expires. A kill
in the middle of a change to the throttle's table is detected (a flag set for
the duration of every change) and the next process to take the lock starts
the table afresh: the failures it remembered are forgotten, once.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from ..auth import ThrottleRecord

_ALIGN = 64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _anonymous_file() -> int:
    """A descriptor of a file that exists only in memory (a memfd on Linux)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("geosmtp-shared", os.MFD_CLOEXEC)
    fd, path = tempfile.mkstemp(prefix="geosmtp-shared-")
    os.unlink(path)
    return fd


class SharedMemory:
    """`size` zeroed bytes shared with every process forked after this is made,
    and one lock on them that the kernel releases when its holder dies."""

    def __init__(self, size: int) -> None:
        self.fd = _anonymous_file()
        weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)  # MAP_SHARED, the default
        self.size = size

    def lock(self) -> None:
        """Wait for the lock (blocks the thread: critical sections are tiny)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def view(self, offset: int, fmt: str, count: int) -> memoryview:
        """`count` items of struct format `fmt` at `offset` (aligned to the item)."""
        return memoryview(self.map)[offset : offset + struct.calcsize(fmt) * count].cast(fmt)


class ConnectionCounter(Protocol):
    """What `Listeners` needs to cap the open connections."""

    def try_open(self, limit: int) -> bool:
        """Count one more connection if fewer than `limit` are open; whether it was."""
        ...

    def closed(self) -> None:
        """A connection counted by `try_open` ended."""
        ...

    def total(self) -> int:
        """Connections open now."""
        ...


class LocalConnections:
    """`ConnectionCounter` for a server that is one process."""

    def __init__(self) -> None:
        self.open = 0

    def try_open(self, limit: int) -> bool:
        if self.open >= limit:
            return False
        self.open += 1
        return True

    def closed(self) -> None:
        self.open -= 1

    def total(self) -> int:
        return self.open


class SharedState:
    """The connection count (one slot per worker) and the AUTH throttle's
    records, in memory the master makes before it forks the workers.

    A `ConnectionCounter` once a worker has called `bind(slot)`; give
    `throttle_records` to `auth.AuthThrottle(records=...)`. `max_tracked` is the
    number of clients the throttle remembers (fixed: the table is made here).
    """

    def __init__(self, slots: int, max_tracked: int = 100_000) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        counts_size = _aligned(8 * slots)
        self.memory = SharedMemory(counts_size + SharedThrottleRecords.size(max_tracked))
        self._counts = self.memory.view(0, "q", slots)
        self.throttle_records = SharedThrottleRecords(self.memory, counts_size, max_tracked)
        self.slot: int | None = None

    def bind(self, slot: int) -> None:
        """This process counts its connections in `slot` (once, after the fork)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in 0..{self.slots - 1}")
        self.slot = slot

    def try_open(self, limit: int) -> bool:
        """Under the lock: fewer than `limit` open in all the slots? Then count
        one more in this process's slot."""
        slot = self.slot
        if slot is None:
            raise RuntimeError("SharedState.bind(slot) was not called in this process")
        counts, fd = self._counts, self.memory.fd
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            if sum(counts) >= limit:
                return False
            counts[slot] += 1
            return True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def closed(self) -> None:
        """One connection counted in this process's slot ended."""
        fd = self.memory.fd
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            self._counts[self.slot] -= 1  # type: ignore[index]
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def total(self) -> int:
        """Connections open in all the workers."""
        with self.memory.locked():
            return sum(self._counts)

    def count(self, slot: int) -> int:
        """Connections counted in `slot`."""
        return self._counts[slot]

    def reset_slot(self, slot: int) -> None:
        """Zero a dead worker's slot before a new worker gets it: a worker
        killed with SIGKILL never took its connections off the count."""
        with self.memory.locked():
            self._counts[slot] = 0

    def close(self) -> None:
        """Unmap the memory in this process (the others keep theirs)."""
        self._counts.release()
        self.throttle_records.release()
        self.memory.map.close()


def key_hash(key: str) -> int:
    """A 64-bit hash of a throttle key, the same in every process (never 0)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


# The table's header: indexes into an array of int64.
_LIVE, _HEAD, _TAIL, _FREE, _UNUSED, _DIRTY = range(6)
_NONE = -1


class SharedThrottleRecords:
    """`auth.ThrottleRecords` in shared memory: a fixed table of `capacity` records.

    A key is its 64-bit `key_hash` (two keys with one hash would share a
    record: 1 in 2**64 per pair). An index of twice `capacity` slots, open
    addressing with linear probing and backward-shift deletion (no
    tombstones), points into an array of records; the records are on a
    doubly linked list from the least to the most recently seen, so that
    `touch` and the eviction of the least recently seen are O(1), as with
    the in-process `OrderedDict`. Every array is a column of its own
    (hashes, counts, ...), read and written through `memoryview`s.

    Every method but `locked` must be called inside `with records.locked():`.
    """

    def __init__(self, memory: SharedMemory, offset: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.memory = memory
        self.capacity = capacity
        slots = self._index_slots(capacity)
        self._mask = slots - 1
        views = []
        at = offset
        for fmt, count in self._layout(capacity):
            views.append(memory.view(at, fmt, count))
            at += _aligned(views[-1].nbytes)
        self._views = views
        (
            self._header,
            self._hash,
            self._count,
            self._pending,
            self._last,
            self._prev,
            self._next,
            self._index,
        ) = views
        with memory.locked():
            self._clear()

    @staticmethod
    def _index_slots(capacity: int) -> int:
        slots = 1
        while slots < 2 * capacity:
            slots *= 2
        return slots

    @classmethod
    def _layout(cls, capacity: int) -> list[tuple[str, int]]:
        return [
            ("q", 8),  # the header
            ("Q", capacity),  # key hash
            ("i", capacity),  # failures
            ("i", capacity),  # checks running
            ("d", capacity),  # when the latest failure or check was counted
            ("i", capacity),  # less recently seen (_NONE: this is the head)
            ("i", capacity),  # more recently seen (_NONE: the tail); next free when free
            ("i", cls._index_slots(capacity)),  # record + 1, 0: an empty slot
        ]

    @classmethod
    def size(cls, capacity: int) -> int:
        """Bytes of shared memory a table of `capacity` records takes."""
        return sum(_aligned(struct.calcsize(fmt) * n) for fmt, n in cls._layout(capacity))

    def release(self) -> None:
        for view in self._views:
            view.release()

    # ------------------------------------------------------------ the lock

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The lock, and a table in one piece: a process killed half-way
        through a change leaves `_DIRTY` set, and the next one clears the table."""
        memory, header = self.memory, self._header
        memory.lock()
        try:
            if header[_DIRTY]:
                self._clear()
            header[_DIRTY] = 1
            yield
            header[_DIRTY] = 0  # not on an exception: the table may be half-changed
        finally:
            memory.unlock()

    def _clear(self) -> None:
        header = self._header
        with self._index.cast("B") as raw:
            raw[:] = bytes(raw.nbytes)
        header[_LIVE] = 0
        header[_HEAD] = header[_TAIL] = header[_FREE] = _NONE
        header[_UNUSED] = 0  # records from here on were never used
        header[_DIRTY] = 0

    # ------------------------------------------------------- ThrottleRecords

    def __len__(self) -> int:
        return self._header[_LIVE]

    def get(self, key: str) -> ThrottleRecord | None:
        record = self._find(key_hash(key))[1]
        if record < 0:
            return None
        return ThrottleRecord(self._count[record], self._last[record], self._pending[record])

    def put(self, key: str, value: ThrottleRecord) -> None:
        """Write `key`'s record; a new key is the most recently seen, and the
        least recently seen is forgotten to make room for it."""
        h = key_hash(key)
        slot, record = self._find(h)
        if record < 0:
            if self._header[_LIVE] >= self.capacity:
                self._remove(self._header[_HEAD])
                slot = self._find(h)[0]  # the removal may have moved the probe chain
            record = self._allocate()
            self._hash[record] = h
            self._index[slot] = record + 1
            self._link_tail(record)
            self._header[_LIVE] += 1
        self._count[record] = value.count
        self._pending[record] = value.pending
        self._last[record] = value.last

    def touch(self, key: str) -> None:
        record = self._find(key_hash(key))[1]
        if record >= 0 and record != self._header[_TAIL]:
            self._unlink(record)
            self._link_tail(record)

    def delete(self, key: str) -> None:
        record = self._find(key_hash(key))[1]
        if record >= 0:
            self._remove(record)

    # ------------------------------------------------------------ the table

    def _find(self, h: int) -> tuple[int, int]:
        """(index slot, record): the record is -1 and the slot the empty one
        to put it in when `h` is not in the table."""
        index, hashes, mask = self._index, self._hash, self._mask
        slot = h & mask
        while True:
            entry = index[slot]
            if entry == 0:
                return slot, -1
            if hashes[entry - 1] == h:
                return slot, entry - 1
            slot = (slot + 1) & mask

    def _allocate(self) -> int:
        header = self._header
        record = header[_FREE]
        if record != _NONE:
            header[_FREE] = self._next[record]
            return record
        record = header[_UNUSED]
        header[_UNUSED] = record + 1
        return record

    def _remove(self, record: int) -> None:
        header = self._header
        slot = self._find(self._hash[record])[0]
        self._unlink(record)
        self._next[record] = header[_FREE]
        header[_FREE] = record
        header[_LIVE] -= 1
        # Backward-shift deletion: pull each later entry of the probe chain
        # into the hole unless its home slot lies cyclically in (hole, entry].
        index, hashes, mask = self._index, self._hash, self._mask
        hole = slot
        at = slot
        while True:
            at = (at + 1) & mask
            entry = index[at]
            if entry == 0:
                break
            home = hashes[entry - 1] & mask
            if (hole < at and hole < home <= at) or (hole > at and (home > hole or home <= at)):
                continue
            index[hole] = entry
            hole = at
        index[hole] = 0

    def _unlink(self, record: int) -> None:
        header, prev, next_ = self._header, self._prev, self._next
        before, after = prev[record], next_[record]
        if before == _NONE:
            header[_HEAD] = after
        else:
            next_[before] = after
        if after == _NONE:
            header[_TAIL] = before
        else:
            prev[after] = before

    def _link_tail(self, record: int) -> None:
        header = self._header
        tail = header[_TAIL]
        self._prev[record] = tail
        self._next[record] = _NONE
        if tail == _NONE:
            header[_HEAD] = record
        else:
            self._next[tail] = record
        header[_TAIL] = record
