"""State the workers share: the open-connection count, the AUTH throttle, per-client limits.

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
the table afresh: the failures it remembered are forgotten, once. The same
holds for the per-client table (`SharedClientTable`); and since it cannot
know which clients a dead worker's connections were, the master sets every
client's open count to 0 when a worker dies with connections open
(`forget_open`): for a while clients may be undercounted, never counted for
connections nobody holds.
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
from dataclasses import dataclass
from typing import Any, Protocol

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

    def view(self, offset: int, fmt: str, count: int) -> memoryview[Any]:
        """`count` items of struct format `fmt` at `offset` (aligned to the item)."""
        whole = memoryview(self.map)[offset : offset + struct.calcsize(fmt) * count]
        return whole.cast(fmt)  # type: ignore[call-overload]  # typeshed takes literal formats only


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

    def mark_stress(self, on: bool) -> bool:
        """Record whether the server is under stress; whether that changed it."""
        ...


class LocalConnections:
    """`ConnectionCounter` for a server that is one process."""

    def __init__(self) -> None:
        self.open = 0
        self.stress = False

    def mark_stress(self, on: bool) -> bool:
        changed, self.stress = self.stress != on, on
        return changed

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
    """The connection count (one slot per worker), whether the server is under
    stress, the AUTH throttle's records and the per-client counters, in
    memory the master makes before it forks the workers.

    A `ConnectionCounter` once a worker has called `bind(slot)`; give
    `throttle_records` to `auth.AuthThrottle(records=...)`; `clients` is the
    `SharedClientTable` of the per-client limits. `max_tracked` is the number
    of clients the throttle remembers, `clients_tracked` the number the
    client table does (fixed: the tables are made here).

    The count costs about 5 µs per connection (open and close: four `lockf`
    system calls), against 0.16 µs for the one-process counter: at 1,000
    connections a second, half a percent of a core.
    """

    def __init__(
        self, slots: int, max_tracked: int = 100_000, clients_tracked: int = 100_000
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        counts_size = _aligned(8 * slots) + _ALIGN  # the counts, then the stress flag
        throttle_size = SharedThrottleRecords.size(max_tracked)
        self.memory = SharedMemory(
            counts_size + throttle_size + SharedClientTable.size(clients_tracked)
        )
        self._counts = self.memory.view(0, "q", slots)
        self._stress = self.memory.view(counts_size - _ALIGN, "q", 1)
        self.throttle_records = SharedThrottleRecords(self.memory, counts_size, max_tracked)
        self.clients = SharedClientTable(self.memory, counts_size + throttle_size, clients_tracked)
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
            self._counts[self.slot] -= 1  # type: ignore[index]  # bound: try_open() counted it
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

    def mark_stress(self, on: bool) -> bool:
        """Record whether the server is under stress; whether that is a change
        (so that one worker, not each, logs it)."""
        with self.memory.locked():
            if bool(self._stress[0]) == on:
                return False
            self._stress[0] = int(on)
            return True

    def close(self) -> None:
        """Unmap the memory in this process (the others keep theirs)."""
        self._counts.release()
        self._stress.release()
        self.throttle_records.release()
        self.clients.release()
        self.memory.map.close()


def key_hash(key: str) -> int:
    """A 64-bit hash of a throttle key, the same in every process (never 0)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


# A table's header: indexes into an array of int64.
_LIVE, _HEAD, _TAIL, _FREE, _UNUSED, _DIRTY = range(6)
_NONE = -1


class _TableLock:
    """`_SharedTable.locked()`: a context manager of its own rather than a
    generator's (it is on the path of every connection, MAIL and RCPT)."""

    __slots__ = ("fd", "table")

    def __init__(self, table: _SharedTable) -> None:
        self.table = table
        self.fd = table.memory.fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            header = self.table._header
            if header[_DIRTY]:
                self.table._clear()
            header[_DIRTY] = 1
        except BaseException:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:  # not on an exception: the table may be half-changed
            self.table._header[_DIRTY] = 0
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


class _SharedTable:
    """A fixed table of `capacity` records in shared memory, found by a 64-bit hash.

    An index of twice `capacity` slots, open addressing with linear probing
    and backward-shift deletion (no tombstones), points into an array of
    records; the records on a doubly linked list from the least to the most
    recently seen, so that a touch and the eviction of the least recently
    seen are O(1). Every array is a column of its own (hashes, counts, ...),
    read and written through `memoryview`s; a subclass names its own
    columns (`COLUMNS`, struct formats, after the key hash).

    A kill half-way through a change leaves `_DIRTY` set: the next process
    to take the lock (`locked`) starts the table afresh.
    """

    #: The struct format of each of the subclass's columns, in order.
    COLUMNS: tuple[str, ...] = ()

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
        self._header, self._hash, *self._columns, self._prev, self._next, self._index = views
        self._lock = _TableLock(self)
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
            *((fmt, capacity) for fmt in cls.COLUMNS),
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

    def locked(self) -> _TableLock:
        """The lock, and a table in one piece: a process killed half-way
        through a change leaves `_DIRTY` set, and the next one clears the table."""
        return self._lock

    def _clear(self) -> None:
        header = self._header
        with self._index.cast("B") as raw:
            raw[:] = bytes(raw.nbytes)
        header[_LIVE] = 0
        header[_HEAD] = header[_TAIL] = header[_FREE] = _NONE
        header[_UNUSED] = 0  # records from here on were never used
        header[_DIRTY] = 0

    def __len__(self) -> int:
        return self._header[_LIVE]

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

    def _add(self, h: int, slot: int) -> int:
        """A new record for `h` (not in the table; `slot` from `_find`), the most
        recently seen. When the table is full the least recently seen record
        on the list is forgotten to make room; -1 when the list is empty (every
        record is held off it, see `SharedClientTable`)."""
        header = self._header
        if header[_LIVE] >= self.capacity:
            if header[_HEAD] == _NONE:
                return -1
            self._remove(header[_HEAD])
            slot = self._find(h)[0]  # the removal may have moved the probe chain
        record = header[_FREE]
        if record != _NONE:
            header[_FREE] = self._next[record]
        else:
            record = header[_UNUSED]
            header[_UNUSED] = record + 1
        self._hash[record] = h
        self._index[slot] = record + 1
        self._link_tail(record)
        header[_LIVE] += 1
        return record

    def _remove(self, record: int) -> None:
        """Forget `record` (which is on the list)."""
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
        self._hash[record] = 0  # a free record (key hashes are never 0)

    def _touch(self, record: int) -> None:
        """`record` (on the list) is now the most recently seen."""
        if record != self._header[_TAIL]:
            self._unlink(record)
            self._link_tail(record)

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


class SharedThrottleRecords(_SharedTable):
    """`auth.ThrottleRecords` in shared memory: a fixed table of `capacity` records.

    A key is its 64-bit `key_hash` (two keys with one hash would share a
    record: 1 in 2**64 per pair); the least recently seen record is forgotten
    to make room for a new one, as with the in-process `OrderedDict`.

    Every method but `locked` must be called inside `with records.locked():`.
    """

    COLUMNS = (
        "i",  # failures
        "i",  # checks running
        "d",  # when the latest failure or check was counted
    )

    def __init__(self, memory: SharedMemory, offset: int, capacity: int) -> None:
        super().__init__(memory, offset, capacity)
        self._count, self._pending, self._last = self._columns

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
            record = self._add(h, slot)
        self._count[record] = value.count
        self._pending[record] = value.pending
        self._last[record] = value.last

    def touch(self, key: str) -> None:
        record = self._find(key_hash(key))[1]
        if record >= 0:
            self._touch(record)

    def delete(self, key: str) -> None:
        record = self._find(key_hash(key))[1]
        if record >= 0:
            self._remove(record)


#: The limits `SharedClientTable` counts against; each is also the bit of
#: the record's `logged` mask that says its refusal was logged in the window.
CONNECTIONS = "connections"
CONNECTION_RATE = "connection_rate"
MESSAGE_RATE = "message_rate"
RECIPIENT_RATE = "recipient_rate"
ERRORS = "errors"
_BIT = {CONNECTIONS: 1, CONNECTION_RATE: 2, MESSAGE_RATE: 4, RECIPIENT_RATE: 8, ERRORS: 16}
_MINUTE_BITS = 1 | 2 | 4 | 8
#: Seconds of one rate window ("per minute"), as Postfix's anvil_rate_time_unit.
RATE_WINDOW = 60.0


@dataclass(frozen=True)
class ClientCounts:
    """What `SharedClientTable` holds for one client (for tests and the docs)."""

    connections: int  # open now
    connection_rate: int  # connections begun in this minute's window
    messages: int  # MAIL FROM in this minute's window
    recipients: int  # RCPT TO in this minute's window
    errors: int  # error replies in this error window


class SharedClientTable(_SharedTable):
    """Per-client counters in shared memory, in the spirit of Postfix's anvil:
    open connections, connections, messages and recipients per minute, and
    error replies per error window, by the 64-bit hash of `auth.throttle_key`
    (an IPv4 address, an IPv6 /64).

    Each method takes the lock for its whole check-and-count, so the limits
    are exact across the workers. A rate window is fixed: it starts at the
    client's first event after the last one ended (anvil's time unit).

    Bounded: `capacity` records. A record with open connections is held off
    the least-recently-seen list, so it is never evicted: the count of open
    connections cannot be reset by anyone else's traffic. The others are
    evicted least recently seen first (each event touches its record), so to
    make the table forget a client's rates or errors, a stranger must make
    `capacity` connections from as many other addresses (IPv4 addresses or
    IPv6 /64s) in the time that client is quiet. When every record holds
    open connections (more clients than `capacity` connected at once), a
    new client is not counted (`connect` admits it untracked) rather than
    anyone being forgotten.
    """

    COLUMNS = (
        "i",  # connections open
        "d",  # when the minute's window began
        "i",  # connections begun in it
        "i",  # messages (MAIL FROM) in it
        "i",  # recipients (RCPT TO) in it
        "d",  # when the error window began
        "i",  # errors in it
        "i",  # limits whose refusal was logged in their window (bits)
    )

    def __init__(self, memory: SharedMemory, offset: int, capacity: int) -> None:
        super().__init__(memory, offset, capacity)
        (
            self._open,
            self._start,
            self._connects,
            self._messages,
            self._recipients,
            self._error_start,
            self._errors,
            self._logged,
        ) = self._columns

    @classmethod
    def private(cls, capacity: int) -> SharedClientTable:
        """A table in memory of its own (a server that is one process)."""
        return cls(SharedMemory(cls.size(capacity)), 0, capacity)

    # ------------------------------------------------------------ the records

    def _record(self, h: int, now: float, error_window: float | None) -> int:
        """`h`'s record, made if new, its windows rolled on to `now` (the error
        window only when `error_window` is given), touched; -1 when there is
        no room (every record holds open connections)."""
        slot, record = self._find(h)
        if record < 0:
            record = self._add(h, slot)
            if record < 0:
                return -1
            self._open[record] = 0
            self._start[record] = now
            self._connects[record] = self._messages[record] = self._recipients[record] = 0
            self._error_start[record] = now
            self._errors[record] = 0
            self._logged[record] = 0
            return record
        if now - self._start[record] >= RATE_WINDOW:
            self._start[record] = now
            self._connects[record] = self._messages[record] = self._recipients[record] = 0
            self._logged[record] &= ~_MINUTE_BITS
        if error_window is not None and now - self._error_start[record] >= error_window:
            self._error_start[record] = now
            self._errors[record] = 0
            self._logged[record] &= ~_BIT[ERRORS]
        if self._open[record] == 0:
            self._touch(record)
        return record

    def _refused(self, record: int, kind: str) -> tuple[str, bool]:
        """(kind, whether this is its first refusal in its window)."""
        bit = _BIT[kind]
        first = not self._logged[record] & bit
        self._logged[record] |= bit
        return kind, first

    def connect(
        self,
        h: int,
        now: float,
        max_connections: int,
        connection_rate: int,
        max_errors: int,
        error_window: float,
    ) -> tuple[str | None, bool]:
        """A connection from client `h` begins: count it, unless the client is
        over a limit (0: none). Every attempt counts against the rate, as in
        anvil. Returns (None, False) when it is counted (call `disconnect` at
        its end), else (the limit, whether it is that limit's first refusal
        of the client in its window: log that one)."""
        with self.locked():
            record = self._record(h, now, error_window)
            if record < 0:
                return None, False
            self._connects[record] += 1
            if max_errors and self._errors[record] >= max_errors:
                return self._refused(record, ERRORS)
            if max_connections and self._open[record] >= max_connections:
                return self._refused(record, CONNECTIONS)
            if connection_rate and self._connects[record] > connection_rate:
                return self._refused(record, CONNECTION_RATE)
            if self._open[record] == 0:
                self._unlink(record)  # held off the list while it has connections
            self._open[record] += 1
            return None, False

    def disconnect(self, h: int) -> None:
        """A connection counted by `connect` ended."""
        with self.locked():
            record = self._find(h)[1]
            if record < 0 or self._open[record] <= 0:
                return  # not counted (no room then), or the table was started afresh
            self._open[record] -= 1
            if self._open[record] == 0:
                self._link_tail(record)

    def count(self, h: int, kind: str, now: float, limit: int) -> tuple[bool, bool]:
        """One message (`MESSAGE_RATE`) or recipient (`RECIPIENT_RATE`) of client
        `h`: (allowed, whether a refusal is the first in the window). A refused
        one is not counted."""
        with self.locked():
            record = self._record(h, now, None)
            if record < 0:
                return True, False
            column = self._messages if kind == MESSAGE_RATE else self._recipients
            if column[record] >= limit:
                return False, self._refused(record, kind)[1]
            column[record] += 1
            return True, False

    def add_errors(
        self, h: int, n: int, now: float, max_errors: int, error_window: float
    ) -> tuple[bool, bool]:
        """`n` more error replies to client `h`: (whether it has used up
        `max_errors` in the window, whether that is news to log)."""
        with self.locked():
            record = self._record(h, now, error_window)
            if record < 0:
                return False, False
            self._errors[record] += n
            if self._errors[record] < max_errors:
                return False, False
            return True, self._refused(record, ERRORS)[1]

    def forget_open(self) -> None:
        """Set every client's open connections to 0: a worker died with
        connections open, and nobody knows whose they were. Until the other
        workers' connections end, their clients are undercounted (they may
        open that many more); never overcounted for good."""
        with self.locked():
            hashes, open_ = self._hash, self._open
            for record in range(self._header[_UNUSED]):
                if hashes[record] and open_[record] > 0:
                    open_[record] = 0
                    self._link_tail(record)

    def get(self, h: int) -> ClientCounts | None:
        """What is counted for client `h` (windows not rolled on)."""
        with self.locked():
            record = self._find(h)[1]
            if record < 0:
                return None
            return ClientCounts(
                self._open[record],
                self._connects[record],
                self._messages[record],
                self._recipients[record],
                self._errors[record],
            )
