"""When to try a queued message again, and when to give up. Pure: no clock reads.

Every time is given by the caller (seconds on the wall clock, as stored in the
queue record), so the schedule is the same in a test and after a restart.

RFC 5321 §4.5.4.1: a client that cannot deliver a message at once queues it and
retries; the retry interval "SHOULD be at least 30 minutes", although "more
sophisticated and variable strategies will be beneficial when the SMTP client
can determine the reason for non-delivery", and the give-up time "needs to be
at least 4-5 days". The default schedule follows the practice of current MTAs
rather than the letter of the 30 minutes:

- Minutes first (1, 5, 15, 30 min): most temporary failures are greylisting
  (cleared after 1 to 15 minutes on most implementations) or a remote restart.
  chasquid retries after 1, 5, 10, then every 20 minutes; Postfix's
  `minimal_backoff_time` is 5 minutes.
- Then doubling (1 h, 2 h, 4 h) and every 4 hours after that: a host that is
  down for longer is not helped by a busier queue. Postfix caps its backoff at
  `maximal_backoff_time` = 4000 s; Exim's default retry rule ends at every
  6 hours; 4 hours sits between them.
- Give up after 5 days: Postfix's `maximal_queue_lifetime` and the upper end of
  RFC 5321 §4.5.4.1's "4-5 days". As in Postfix, the message bounces at the
  first failed attempt from then on: the last wait is cut short so that one
  attempt falls at the end of the lifetime, the time a delay report promised
  (`Will-Retry-Until`).
- Delay warning (RFC 3461 §4.1 `NOTIFY=DELAY`, RFC 3464 `Action: delayed`)
  after 4 hours, Sendmail's `Timeout.queuewarn` and Postfix's usual setting.

The defaults themselves (`DEFAULT_RETRY_DELAYS`, `DEFAULT_MAX_LIFETIME`,
`DEFAULT_DELAY_WARNING`) are the `relay:` section's, in `geosmtp.config`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _finite(value: float, what: str, *, positive: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}")
    return value


class RetrySchedule:
    """The delays between delivery attempts and the lifetime of a queued message.

    `delays[i]` is the wait after attempt `i + 1`; the last delay repeats for
    every attempt after that. No wait reaches past `first_seen + max_lifetime`
    (`expires`): when the next one would, the last attempt is made at that
    time instead, and a message is given up (bounced, RFC 3464
    `Action: failed`) only when an attempt made then or later fails too.
    Postfix's `maximal_queue_lifetime` works so ("bounced at the first attempt
    after it"), and a delay report's `Will-Retry-Until` (`expires`) stays true:
    nothing is given up before it.
    """

    __slots__ = ("delays", "max_lifetime")

    def __init__(
        self,
        delays: Sequence[float],
        max_lifetime: float,
    ) -> None:
        if isinstance(delays, str | bytes) or not len(delays):
            raise ValueError("a retry schedule needs at least one delay")
        self.delays: tuple[float, ...] = tuple(
            _finite(d, "a retry delay", positive=True) for d in delays
        )
        self.max_lifetime: float = _finite(max_lifetime, "max_lifetime", positive=True)

    def delay_after(self, attempts: int) -> float:
        """The wait after the `attempts`-th attempt (1-based); 0 before the first."""
        if attempts < 0:
            raise ValueError("attempts must be >= 0")
        if attempts == 0:
            return 0.0
        return self.delays[min(attempts, len(self.delays)) - 1]

    def expires(self, first_seen: float) -> float:
        """The end of the lifetime: the last attempt is made at this time, and a
        failure from then on is final (what a delay report's `Will-Retry-Until`
        promises)."""
        return first_seen + self.max_lifetime

    def next_attempt(self, first_seen: float, attempts: int, now: float) -> float | None:
        """When to try again after `attempts` failed attempts, the last ending `now`.

        `now` plus the schedule's wait, but never later than `expires`: the
        last attempt is made at the end of the lifetime. None means give up:
        the attempt that just failed ended at or after the end of the lifetime.
        `attempts == 0` (never tried) is `now`, whatever the time: a message is
        tried at least once before it is given up.
        """
        if attempts < 0:
            raise ValueError("attempts must be >= 0")
        if attempts == 0:
            return now
        expires = self.expires(first_seen)
        if now >= expires:
            return None
        return min(now + self.delay_after(attempts), expires)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RetrySchedule)
            and other.delays == self.delays
            and other.max_lifetime == self.max_lifetime
        )

    def __hash__(self) -> int:
        return hash((self.delays, self.max_lifetime))

    def __repr__(self) -> str:
        return f"RetrySchedule(delays={list(self.delays)!r}, max_lifetime={self.max_lifetime!r})"


def delay_warning_due(first_seen: float, now: float, delay_warning: float, warned: bool) -> bool:
    """Whether to send the "delayed" DSN (RFC 3464 §2.3.3 `Action: delayed`) now.

    Once per message: `warned` says it was sent already. `delay_warning <= 0`
    turns warnings off (Postfix's `delay_warning_time = 0`). Whether the sender
    asked for it (RFC 3461 §4.1 `NOTIFY=DELAY`, or no NOTIFY at all) is the
    caller's to decide.
    """
    if warned or not delay_warning > 0:  # `not >` also turns NaN off
        return False
    return now - first_seen >= delay_warning
