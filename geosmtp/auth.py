"""Users, password hashes and failed-login throttling (the service behind AUTH).

Passwords are stored only as argon2id hashes (memory-hard, with the
parameters in the hash so they can be raised later). `geosmtp passwd` prints
one to paste into the config (argon2-cffi, the reference implementation's
bindings). Verification is CPU-heavy on purpose; the shell runs it in the
hub's threadpool so one login never stalls the other clients. It is done by
libsodium (PyNaCl), whose argon2 is the one Dovecot uses: the same standard
hash strings at about two thirds of the reference code's CPU per check
(0.12 against 0.19 s for the t=3, 64 MiB hashes `geosmtp passwd` makes),
and it lets go of the GIL while it works. A hash libsodium does not take
(argon2d) is checked by argon2-cffi.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import nacl.exceptions
import nacl.pwhash
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .mail import Domains, safe_mailbox_name

_hasher = PasswordHasher()
# A hash to verify against when the user is unknown, so that the time taken
# does not tell an attacker which user names exist.
_DUMMY_HASH = _hasher.hash("geosmtp-no-such-user")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(stored: str, password: str) -> bool:
    """Whether `password` matches the argon2 hash `stored` (slow on purpose)."""
    secret = password.encode("utf-8", "surrogatepass")
    try:
        return nacl.pwhash.verify(stored.encode("ascii", "replace"), secret)
    except nacl.exceptions.CryptPrefixError:
        pass  # not a kind libsodium checks: the reference implementation does
    except nacl.exceptions.CryptoError:
        return False  # a wrong password, or a hash it cannot use
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class UserDB:
    """User name -> password hash, from the config's `users:` section."""

    def __init__(self, hashes: Mapping[str, str | None], local_domains: Domains) -> None:
        self._hashes = {name: h for name, h in hashes.items() if h}
        self._domains = local_domains

    def user_for_login(self, login: str) -> str | None:
        """`alice` or `alice@<local domain>` -> the mailbox name `alice`."""
        local, at, domain = login.rpartition("@") if "@" in login else (login, "", "")
        if at and domain not in self._domains:
            return None
        return safe_mailbox_name(local)

    def verify(self, login: str, password: str) -> str | None:
        """The user name when `password` is right for `login`, else None (slow on purpose)."""
        user = self.user_for_login(login)
        stored = self._hashes.get(user) if user else None
        if not check_password(stored or _DUMMY_HASH, password):
            return None
        return user if stored else None

    def __contains__(self, user: str) -> bool:
        return user in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)


def throttle_key(address: str) -> str:
    """The unit a client is counted by: an IPv4 address, or the /64 of an IPv6 one.

    One subscriber usually holds a whole IPv6 /64 and can pick any address in
    it, so counting single IPv6 addresses would let it guess without limit. An
    IPv4-mapped address (`::ffff:192.0.2.1`) is its IPv4 address; a zone
    (`fe80::1%eth0`) is dropped. Anything else (not an IP address) is its own key.
    """
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
        ip = ip.ipv4_mapped
    return str(ip)


@dataclass(slots=True)
class ThrottleRecord:
    """What `AuthThrottle` remembers of one client."""

    count: int  # failed password checks in this window
    last: float  # when the latest one was counted (the window runs from it)
    pending: int = 0  # checks running now, each of which may still fail


class ThrottleRecords(Protocol):
    """Where `AuthThrottle` keeps its records, by `throttle_key`, the least
    recently seen first: in this process (`LocalThrottleRecords`) or in memory
    the worker processes share (`server.shared.SharedThrottleRecords`).

    Every method but `locked` is called inside `with records.locked():`, and
    a record read with `get` is written back with `put` to change it.
    """

    def locked(self) -> AbstractContextManager[object]: ...
    def __len__(self) -> int: ...
    def get(self, key: str) -> ThrottleRecord | None:
        """The record, if any; does not count as seeing the client."""
        ...

    def put(self, key: str, record: ThrottleRecord) -> None:
        """Write `key`'s record. A new key is the most recently seen, and the
        least recently seen is forgotten when the table is over its bound."""
        ...

    def touch(self, key: str) -> None:
        """`key` is now the most recently seen."""
        ...

    def delete(self, key: str) -> None: ...


class LocalThrottleRecords:
    """`ThrottleRecords` in this process: an `OrderedDict` as an LRU."""

    def __init__(self, max_tracked: int = 100_000) -> None:
        self.max_tracked = max_tracked
        self._records: OrderedDict[str, ThrottleRecord] = OrderedDict()
        self._unlocked = nullcontext()  # one process, and no switch inside a call

    def locked(self) -> AbstractContextManager[object]:
        return self._unlocked

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> ThrottleRecord | None:
        return self._records.get(key)

    def put(self, key: str, record: ThrottleRecord) -> None:
        records = self._records
        new = key not in records
        records[key] = record
        if new and len(records) > self.max_tracked:
            records.popitem(last=False)

    def touch(self, key: str) -> None:
        self._records.move_to_end(key)

    def delete(self, key: str) -> None:
        del self._records[key]


#: `reserve`'s answer when checks already running could use up what is left of
#: the client's allowance: wait for one of them to end, then ask again.
BUSY = 0


class AuthThrottle:
    """Failed logins per client (`throttle_key`): a growing delay, then disconnect.

    A password check is counted before it runs (`reserve`): failures and checks
    still running together never exceed `max_failures`, so parallel
    connections from one client share `max_failures` guesses per window
    instead of each passing a "not blocked yet" test while the checks are in
    flight. A check that would go over answers `BUSY`: the caller waits for a
    running one to end and asks again (a mail program's parallel logins with
    the right password all succeed, one allowance at a time). After the n-th
    failure the reply is delayed by
    `base_delay * 2**(n-1)` seconds (capped at `max_delay`); the `max_failures`-th
    ends the session, and further attempts get no password check until the
    record expires, `window` seconds after its last failure, or a login
    succeeds.

    At most `max_tracked` clients are remembered: the least recently seen is
    forgotten first, so a spray of addresses costs bounded memory and O(1) per
    attempt. Expired records are dropped when next looked at.

    The records are in this process unless `records` is given: the worker
    processes of one server share theirs (`server.shared.SharedState`), so that
    a client's failures count in every worker; its own bound replaces
    `max_tracked`. The settings are this object's (each worker sets them from
    its config).
    """

    def __init__(
        self,
        max_failures: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 8.0,
        window: float = 600.0,
        max_tracked: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        records: ThrottleRecords | None = None,
    ) -> None:
        self.max_failures = max_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.clock = clock  # shared records need a clock every process reads alike
        self.records = LocalThrottleRecords(max_tracked) if records is None else records

    def __len__(self) -> int:
        with self.records.locked():
            return len(self.records)

    def _current(self, key: str, now: float) -> ThrottleRecord | None:
        records = self.records
        record = records.get(key)
        if record is None:
            return None
        if now - record.last > self.window:
            records.delete(key)
            return None
        records.touch(key)
        return record

    def reserve(self, address: str) -> int | None:
        """Count a password check before it runs.

        Returns its number in the window (failures so far plus the checks
        running, this one included); `BUSY` (0) when running checks could use
        up the allowance (wait for one to end, ask again); None when the client
        is at the limit and gets no check. Call `failed` or `succeeded` with the
        outcome; a check that never reports one stays counted. Does not yield,
        and shared records are locked for the whole call, so concurrent callers
        (in any worker) can never pass the limit together.
        """
        key = throttle_key(address)
        with self.records.locked():
            now = self.clock()
            record = self._current(key, now)
            if record is None:
                record = ThrottleRecord(0, 0.0)
            elif record.count >= self.max_failures:
                return None
            elif record.count + record.pending >= self.max_failures:
                return BUSY
            record.pending += 1
            record.last = now
            self.records.put(key, record)
            return record.count + record.pending

    def failed(self, address: str, attempt: int) -> tuple[float, bool]:
        """A check failed: (seconds to delay the reply, disconnect?)."""
        key = throttle_key(address)
        with self.records.locked():
            now = self.clock()
            record = self._current(key, now)
            if record is None:  # forgotten meanwhile (expired, evicted): judge by its number
                failures = attempt
            else:
                record.pending = max(0, record.pending - 1)
                record.count += 1
                record.last = now
                self.records.put(key, record)
                failures = record.count
        delay = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return delay, failures >= self.max_failures

    def succeeded(self, address: str) -> None:
        """A login succeeded: forget the client's failures; checks still running
        keep their places."""
        key = throttle_key(address)
        with self.records.locked():
            record = self.records.get(key)
            if record is None:
                return
            record.count = 0
            record.pending = max(0, record.pending - 1)
            if record.pending:
                self.records.put(key, record)
            else:
                self.records.delete(key)
