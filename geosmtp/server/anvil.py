"""Limits per client address, in the spirit of Postfix's anvil (`client_limits:`).

An address is counted as the AUTH throttle counts it (`auth.throttle_key`: an
IPv4 address, an IPv6 /64). The counters are in `shared.SharedClientTable`,
in memory every worker shares, so each limit holds for the whole server:
open connections (SMTP and POP3), connections, messages and recipients per
minute, and error replies per error window. The listeners ask at each
connection (`connect`, `disconnect`), the SMTP core at MAIL and RCPT (through
`ClientRates`), the SMTP shell when a session's error count grows
(`add_errors`). Clients in `trusted_networks` are never counted.

A refusal is counted in `geosmtp_client_limit_refusals_total{limit}` every
time, and logged once per client and window (the table remembers which
limits it logged), so a client hammering at a limit cannot flood the log.

Cost, measured on the shared 2-core test machine (so ranges): 10 to 16 µs per
connection (`connect` and `disconnect`: a lock and a probe each, the key
hashed once; the server-wide cap's `try_open` and `closed` are 5 to 6.5 µs of
it), 4 to 6 µs per MAIL or RCPT counted, and only when a rate is on (off by
default). The table's lock is a small context-manager class, not a generator
(`contextmanager` cost a microsecond per section); trying the lock without
waiting first changed nothing. `python -m bench compare throughput --quick`
saw no difference the noise lets one see; the full comparison (20,000
messages, 3 rounds) saw every rate on cost 10 to 20 %, most of it in the
end-of-DATA phase, where no table is used, for a cause that was not found.
The rates are off by default, as in Postfix (`bench/README.md`, "Issue 18",
has the runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

from ..auth import throttle_key
from .shared import (
    CONNECTIONS,
    ERRORS,
    MESSAGE_RATE,
    RECIPIENT_RATE,
    SharedClientTable,
    key_hash,
)

if TYPE_CHECKING:
    from ..config import ClientLimits
    from ..metrics import Metrics

#: The config key of each limit, for the log.
_KEYS = {
    CONNECTIONS: "max_connections",
    "connection_rate": "connection_rate",
    MESSAGE_RATE: "message_rate",
    RECIPIENT_RATE: "recipient_rate",
    ERRORS: "max_errors",
}


class Anvil:
    """The per-client limits of one worker: its settings (`configure`), the
    shared table, the log and the metric."""

    def __init__(
        self,
        table: SharedClientTable,
        metrics: Metrics,
        trusted: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.trusted = trusted  # the client is in trusted_networks: never counted
        self.clock = clock  # monotonic: one clock for every process
        self.limits: ClientLimits | None = None

    def configure(self, limits: ClientLimits) -> None:
        """The settings new connections and commands are judged by."""
        self.limits = limits

    def connect(self, peer: str, smtp: bool) -> tuple[int, str | None]:
        """A client from `peer` connects: (its key, 0 when it is not counted;
        the limit it is over, None when it may go on). A key other than 0 is
        given to `disconnect` at the end and to the rates. POP3 (`smtp`
        False) is held to the open connections only."""
        limits = self.limits
        assert limits is not None, "Anvil.configure was not called"
        rate = limits.connection_rate if smtp else 0
        errors = limits.max_errors if smtp else 0
        per_command = smtp and (limits.message_rate or limits.recipient_rate or errors)
        if not (limits.max_connections or rate or per_command) or self.trusted(peer):
            return 0, None
        # An IPv4 address from accept() is already its key (the parse costs
        # more than the rest of the check).
        key = peer if ":" not in peer else throttle_key(peer)
        h = key_hash(key)
        refused, first = self.table.connect(
            h, self.clock(), limits.max_connections, rate, errors, limits.error_window
        )
        if refused is not None:
            self._refused(refused, first, key)
            return 0, refused
        return h, None

    def disconnect(self, h: int) -> None:
        """A connection `connect` counted (key `h`) ended."""
        if h:
            self.table.disconnect(h)

    def allow(self, h: int, kind: str, peer: str) -> bool:
        """One more message (`MESSAGE_RATE`) or recipient (`RECIPIENT_RATE`)
        from client `h`: whether it is under its limit per minute."""
        limits = self.limits
        assert limits is not None, "Anvil.configure was not called"
        limit = limits.message_rate if kind == MESSAGE_RATE else limits.recipient_rate
        if not (h and limit):
            return True
        allowed, first = self.table.count(h, kind, self.clock(), limit)
        if not allowed:
            self._refused(kind, first, throttle_key(peer))
        return allowed

    def add_errors(self, h: int, n: int, peer: str) -> bool:
        """`n` more error replies to client `h`: whether it has used up its
        error budget (the session ends)."""
        limits = self.limits
        assert limits is not None, "Anvil.configure was not called"
        if not (h and n and limits.max_errors):
            return False
        over, first = self.table.add_errors(
            h,
            n,
            self.clock(),
            limits.max_errors,
            limits.error_window,
        )
        if over:
            self._refused(ERRORS, first, throttle_key(peer))
        return over

    def _refused(self, kind: str, first: bool, key: str) -> None:
        self.metrics.client_limit_refused(kind)
        if first:
            logger.warning(
                "client [{}] is over client_limits.{}: refused (logged once per client and window)",
                key,
                _KEYS[kind],
            )


class ClientRates:
    """`smtp.session.ClientRates` for one session: its client's counters."""

    __slots__ = ("anvil", "h", "peer")

    def __init__(self, anvil: Anvil, h: int, peer: str) -> None:
        self.anvil, self.h, self.peer = anvil, h, peer

    def message(self) -> bool:
        return self.anvil.allow(self.h, MESSAGE_RATE, self.peer)

    def recipient(self) -> bool:
        return self.anvil.allow(self.h, RECIPIENT_RATE, self.peer)
