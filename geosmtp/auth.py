"""Users, password hashes and failed-login throttling (the service behind AUTH).

Passwords are stored only as argon2id hashes (argon2-cffi: the reference
implementation's bindings, memory-hard, with the parameters in the hash so
they can be raised later). `geosmtp passwd` prints a hash to paste into the
config. Verification is CPU-heavy on purpose; the shell runs it in the hub's
threadpool so one login never stalls the other clients.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .smtp.policy import safe_mailbox_name

_hasher = PasswordHasher()
# A hash to verify against when the user is unknown, so that the time taken
# does not tell an attacker which user names exist.
_DUMMY_HASH = _hasher.hash("geosmtp-no-such-user")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


class UserDB:
    """User name -> password hash, from the config's `users:` section."""

    def __init__(self, hashes: Mapping[str, str | None], local_domains: frozenset[str]) -> None:
        self._hashes = {name: h for name, h in hashes.items() if h}
        self._domains = local_domains

    def user_for_login(self, login: str) -> str | None:
        """`alice` or `alice@<local domain>` -> the mailbox name `alice`."""
        local, at, domain = login.rpartition("@") if "@" in login else (login, "", "")
        if at and domain.lower() not in self._domains:
            return None
        return safe_mailbox_name(local)

    def verify(self, login: str, password: str) -> str | None:
        """The user name when `password` is right for `login`, else None (slow on purpose)."""
        user = self.user_for_login(login)
        stored = self._hashes.get(user) if user else None
        try:
            _hasher.verify(stored or _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return user if stored else None

    def __contains__(self, user: str) -> bool:
        return user in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)


@dataclass
class _Failures:
    count: int
    last: float


class AuthThrottle:
    """Failed logins per client address: a growing delay, then disconnect.

    After the n-th consecutive failure the reply is delayed by
    `base_delay * 2**(n-1)` seconds (capped); from `max_failures` on, the client
    gets `421` and is disconnected. The record is forgotten after `window`
    seconds without failures, or on a successful login.
    """

    def __init__(
        self,
        max_failures: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 8.0,
        window: float = 600.0,
        clock=time.monotonic,  # type: ignore[no-untyped-def]
    ) -> None:
        self.max_failures = max_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.clock = clock
        self._by_address: dict[str, _Failures] = {}

    def _current(self, address: str) -> _Failures | None:
        record = self._by_address.get(address)
        if record and self.clock() - record.last > self.window:
            del self._by_address[address]
            return None
        return record

    def failed(self, address: str) -> tuple[float, bool]:
        """Record a failure; return (seconds to delay the reply, disconnect?)."""
        record = self._current(address)
        if record is None:
            record = self._by_address[address] = _Failures(0, 0.0)
            if len(self._by_address) > 100_000:  # bounded memory under a spray of addresses
                self._prune()
        record.count += 1
        record.last = self.clock()
        delay = min(self.max_delay, self.base_delay * 2 ** (record.count - 1))
        return delay, record.count >= self.max_failures

    def blocked(self, address: str) -> bool:
        record = self._current(address)
        return record is not None and record.count >= self.max_failures

    def succeeded(self, address: str) -> None:
        self._by_address.pop(address, None)

    def _prune(self) -> None:
        now = self.clock()
        for address in [a for a, r in self._by_address.items() if now - r.last > self.window]:
            del self._by_address[address]
