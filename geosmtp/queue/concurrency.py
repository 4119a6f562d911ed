"""How many deliveries go to one destination at once: a limit that adapts.

Postfix's destination concurrency feedback (its `SCHEDULER_README`,
"Concurrency scheduling"), with the "1/concurrency" feedback its README
describes for both directions (Postfix's own default is the constant 1):

- A destination (a domain, or the smarthost: everything goes to that one
  then) starts at `initial` deliveries at once (Postfix's
  `initial_destination_concurrency`, 5), never more than the maximum
  (`relay.per_domain_concurrency`).
- **Positive feedback**: a delivery that reached the destination's server
  and ended without a connection failure (whatever the server said of the
  recipients) counts 1/limit; a whole pseudo-cohort of them (as many as the
  limit, in a row) raises the limit by one, up to the maximum. The limit is
  raised at the end of such a sequence.
- **Negative feedback**: a delivery that says the destination is overloaded
  or unreachable (`verdict`: no address took the connection, a `421`, a
  connection lost or timed out) lowers the limit by one at the start of a
  sequence of `limit` failures, never below 1; a success in between starts
  the counting again.
- **Dead**: failures in a row add up to failed pseudo-cohorts (1/limit each);
  once the limit is 1 and `failed_cohort_limit` cohorts have failed at it
  (Postfix's `default_destination_concurrency_failed_cohort_limit`, 1), the
  destination is suspended for `dead_for` seconds: the deliveries waiting
  for it, and any asked for meanwhile, are told so (`Slot.suspended`) and
  are deferred without a connection; a delivery still in flight that
  succeeds revives it. When the time is over it starts again at `initial`.

`DestinationLimits.slot(destination)` blocks the calling greenlet until the
destination has room (first come, first served), and gives a `Slot` whose
`feedback(result)` reports the delivery's outcome. A destination with
nothing in flight, nobody waiting, and not dead is forgotten at once, so a
queue with a million domains keeps only those in use (and the dead ones,
until their time is over). Every whole step of a limit is logged at DEBUG
level, a destination found dead at INFO.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from gevent.event import Event
from loguru import logger

from ..relay.client import AttemptResult, Outcome

#: Postfix's `initial_destination_concurrency`.
INITIAL = 5
#: Postfix's `default_destination_concurrency_failed_cohort_limit`.
FAILED_COHORT_LIMIT = 1


class Feedback(enum.Enum):
    POSITIVE = "positive"  # the destination's server took part to the end
    NEGATIVE = "negative"  # overloaded or unreachable
    NONE = "none"  # nothing was learnt (no connection was tried)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one delivery says of its destination, and why (for a suspension)."""

    feedback: Feedback
    status: str = ""
    diagnostic: str = ""


def verdict(result: AttemptResult) -> Verdict:
    """What a delivery attempt's result says of the destination's health.

    Negative: no address took the mail (`remote_host` is None and the `tried`
    list is not empty: refused, timed out, a 4xx/5xx greeting, a failed TLS
    handshake or AUTH), a recipient deferred by a `421` (the server is
    closing), or one deferred with no reply to decide it although a server
    was reached (the connection was lost or timed out in the transaction).
    None: no connection was tried (a mail loop, bad addresses, no host).
    Positive otherwise: the server answered every step, 5xx included.
    """
    if result.remote_host is None:
        if not result.tried:
            return Verdict(Feedback.NONE)
        last = result.tried[-1]
        return Verdict(Feedback.NEGATIVE, last.status, last.diagnostic)
    for r in result.recipients:
        if r.outcome is Outcome.TEMPORARY and (r.reply is None or r.reply.code == 421):
            return Verdict(Feedback.NEGATIVE, r.status, r.diagnostic)
    return Verdict(Feedback.POSITIVE)


@dataclass
class Window:
    """One destination's limit and the counts that move it (no I/O, no time)."""

    limit: int
    maximum: int
    successes: int = 0  # in a row, since the limit last moved
    failures: int = 0  # in the current negative sequence (0: none started)
    failed_cohorts: Fraction = field(default_factory=Fraction)  # since the last success

    def success(self) -> bool:
        """Positive feedback; True when the limit went up."""
        self.failed_cohorts = Fraction(0)
        self.failures = 0
        if self.limit >= self.maximum:
            self.successes = 0
            return False
        self.successes += 1
        if self.successes < self.limit:  # 1/limit each: raised at the end of a cohort
            return False
        self.limit += 1
        self.successes = 0
        return True

    def failure(self) -> bool:
        """Negative feedback; True when the limit went down."""
        self.successes = 0
        self.failed_cohorts += Fraction(1, self.limit)
        lowered = False
        if self.failures == 0 and self.limit > 1:  # at the start of a sequence of `limit`
            lowered = True
            self.limit -= 1
            if self.limit == 1:
                self.failed_cohorts = Fraction(0)  # counted at 1 from here
        self.failures += 1
        if self.failures >= self.limit:
            self.failures = 0
        return lowered

    def dead(self, failed_cohort_limit: int) -> bool:
        """Enough failed cohorts at a limit of 1 to stop trying for a while."""
        return (
            failed_cohort_limit > 0
            and self.limit == 1
            and self.failed_cohorts >= failed_cohort_limit
        )


@dataclass
class _Destination:
    window: Window
    in_flight: int = 0
    waiting: deque[_Waiter] = field(default_factory=deque)
    dead_until: float | None = None
    dead_reason: Verdict | None = None


@dataclass(eq=False)
class _Waiter:
    ready: Event = field(default_factory=Event)
    suspended: Verdict | None = None  # set instead of a slot when the destination died


@dataclass
class Slot:
    """A place among a destination's deliveries, or why there is none."""

    destination: str
    suspended: Verdict | None = None  # the destination is dead: defer, do not connect
    _limits: DestinationLimits | None = None
    _given: bool = False

    def feedback(self, result: AttemptResult) -> None:
        """Report what the delivery made of the destination (once)."""
        if self._limits is None or self._given:
            return
        self._given = True
        self._limits.feedback(self.destination, verdict(result))


class DestinationLimits:
    """The adaptive limit of every destination in use, and the waits for them.

    `maximum` and `dead_for` are read when needed, so a reloaded config
    applies to the next change of a limit.
    """

    def __init__(
        self,
        maximum: Callable[[], int],
        dead_for: Callable[[], float],
        clock: Callable[[], float],
        *,
        initial: int = INITIAL,
        failed_cohort_limit: int = FAILED_COHORT_LIMIT,
    ) -> None:
        self.maximum = maximum
        self.dead_for = dead_for
        self.clock = clock
        self.initial = initial
        self.failed_cohort_limit = failed_cohort_limit
        self._destinations: dict[str, _Destination] = {}
        self._dead: list[tuple[float, str]] = []  # (until, destination), soonest first

    # ------------------------------------------------------------ slots

    @contextlib.contextmanager
    def slot(self, destination: str) -> Iterator[Slot]:
        """Wait for room at `destination`; the slot is given back on leaving."""
        suspended = self._acquire(destination)
        if suspended is not None:
            yield Slot(destination, suspended)
            return
        try:
            yield Slot(destination, None, self)
        finally:
            self._release(destination)

    def _acquire(self, destination: str) -> Verdict | None:
        self._revive_expired()
        dest = self._destinations.get(destination)
        if dest is None:
            start = max(min(self.initial, self.maximum()), 1)
            dest = self._destinations[destination] = _Destination(Window(start, self.maximum()))
        if dest.dead_until is not None:
            return dest.dead_reason
        if dest.in_flight < dest.window.limit and not dest.waiting:
            dest.in_flight += 1
            return None
        waiter = _Waiter()
        dest.waiting.append(waiter)
        try:
            waiter.ready.wait()
        except BaseException:  # killed while waiting (a stop): give back what was handed over
            if waiter.ready.is_set():
                if waiter.suspended is None:
                    self._release(destination)
            else:
                dest.waiting.remove(waiter)
                self._forget_if_idle(destination, dest)
            raise
        return waiter.suspended

    def _release(self, destination: str) -> None:
        dest = self._destinations[destination]
        dest.in_flight -= 1
        self._hand_over(dest)
        self._forget_if_idle(destination, dest)

    def _hand_over(self, dest: _Destination) -> None:
        while dest.waiting and dest.in_flight < dest.window.limit:
            waiter = dest.waiting.popleft()
            dest.in_flight += 1
            waiter.ready.set()

    def _forget_if_idle(self, destination: str, dest: _Destination) -> None:
        if dest.in_flight == 0 and not dest.waiting and dest.dead_until is None:
            del self._destinations[destination]

    # --------------------------------------------------------- feedback

    def feedback(self, destination: str, verdict: Verdict) -> None:
        """Move `destination`'s limit as `verdict` says (it has a slot in flight)."""
        dest = self._destinations.get(destination)
        if dest is None or verdict.feedback is Feedback.NONE:
            return
        window = dest.window
        window.maximum = max(self.maximum(), 1)
        before = window.limit
        if verdict.feedback is Feedback.POSITIVE:
            if dest.dead_until is not None:  # an attempt begun before it died got through
                self._revive(destination, dest)
            elif window.success():
                self._log_step(destination, before, window.limit, "positive")
            window.limit = min(window.limit, window.maximum)  # a reload lowered it
            self._hand_over(dest)
            return
        if dest.dead_until is not None:
            return
        if window.failure():
            self._log_step(destination, before, window.limit, "negative")
        window.limit = min(window.limit, window.maximum)
        if window.dead(self.failed_cohort_limit):
            self._die(destination, dest, verdict)

    def _die(self, destination: str, dest: _Destination, verdict: Verdict) -> None:
        seconds = self.dead_for()
        dest.dead_until = self.clock() + seconds
        dest.dead_reason = verdict
        heapq.heappush(self._dead, (dest.dead_until, destination))
        logger.info(
            "relay: destination {}: no deliveries for {:g} s after {} failed in a row: {}",
            destination,
            seconds,
            self.failed_cohort_limit,
            verdict.diagnostic,
        )
        while dest.waiting:  # each is told at once, and defers its recipients
            waiter = dest.waiting.popleft()
            waiter.suspended = verdict
            waiter.ready.set()

    def _revive(self, destination: str, dest: _Destination) -> None:
        dest.dead_until = dest.dead_reason = None
        dest.window = Window(max(min(self.initial, self.maximum()), 1), self.maximum())
        logger.info("relay: destination {}: deliveries resumed", destination)

    def _revive_expired(self) -> None:
        """Destinations whose dead time is over start again (or are forgotten if idle)."""
        now = self.clock()
        while self._dead and self._dead[0][0] <= now:
            until, destination = heapq.heappop(self._dead)
            dest = self._destinations.get(destination)
            if dest is None or dest.dead_until != until:  # revived meanwhile
                continue
            self._revive(destination, dest)
            self._forget_if_idle(destination, dest)

    @staticmethod
    def _log_step(destination: str, before: int, after: int, kind: str) -> None:
        logger.debug(
            "relay: destination {}: concurrency {} -> {} ({} feedback)",
            destination,
            before,
            after,
            kind,
        )

    # ------------------------------------------------------------ views

    def view(self) -> dict[str, dict[str, object]]:
        """Every destination in use: its limit, deliveries in flight, waiting, dead until."""
        return {
            name: {
                "limit": d.window.limit,
                "in_flight": d.in_flight,
                "waiting": len(d.waiting),
                "dead_until": d.dead_until,
            }
            for name, d in self._destinations.items()
        }

    def __len__(self) -> int:
        return len(self._destinations)


__all__ = ["INITIAL", "DestinationLimits", "Feedback", "Slot", "Verdict", "Window", "verdict"]
