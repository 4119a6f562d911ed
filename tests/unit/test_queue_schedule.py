"""The retry schedule (geosmtp.queue.schedule): pure arithmetic on given times."""

from __future__ import annotations

import ast
import itertools
import math
import sys
from pathlib import Path

import pytest

from geosmtp import config as cfg
from geosmtp.config import DEFAULT_DELAY_WARNING, DEFAULT_MAX_LIFETIME, DEFAULT_RETRY_DELAYS
from geosmtp.queue import schedule
from geosmtp.queue.schedule import RetrySchedule, delay_warning_due

T0 = 1_700_000_000.0  # a wall-clock time, as a queue record stores it
DAY = 86400.0


def default_schedule() -> RetrySchedule:
    """The schedule of the config's defaults (`relay:`, which defines them)."""
    relay = cfg.Relay()
    return RetrySchedule(relay.retry_schedule, relay.max_lifetime)


def test_defaults_are_minutes_then_hours_for_five_days():
    s = default_schedule()
    assert s.delays == DEFAULT_RETRY_DELAYS == (60, 300, 900, 1800, 3600, 7200, 14400)
    assert s.max_lifetime == DEFAULT_MAX_LIFETIME == 5 * DAY
    assert cfg.Relay().delay_warning == DEFAULT_DELAY_WARNING == 4 * 3600


def test_each_delay_follows_its_attempt_and_the_last_repeats():
    s = RetrySchedule([10, 20, 30], max_lifetime=DAY)
    assert [s.delay_after(n) for n in range(0, 7)] == [0, 10, 20, 30, 30, 30, 30]


def test_next_attempt_is_now_plus_the_delay():
    s = RetrySchedule([60, 300], max_lifetime=DAY)
    assert s.next_attempt(T0, 1, T0 + 5) == T0 + 65
    assert s.next_attempt(T0, 2, T0 + 70) == T0 + 370
    assert s.next_attempt(T0, 9, T0 + 1000) == T0 + 1300


def test_never_tried_is_now():
    assert RetrySchedule([60], DAY).next_attempt(T0, 0, T0) == T0


def test_the_last_wait_is_cut_short_to_end_at_the_lifetime():
    s = RetrySchedule([100], max_lifetime=1000)
    assert s.expires(T0) == T0 + 1000
    # a wait that ends exactly at the end of the lifetime is kept
    assert s.next_attempt(T0, 3, T0 + 900) == T0 + 1000
    # one that would end past it is cut short: the last attempt is at the end
    assert s.next_attempt(T0, 3, T0 + 900.5) == T0 + 1000
    assert s.next_attempt(T0, 3, T0 + 999.9) == T0 + 1000


def test_give_up_only_after_an_attempt_at_or_past_the_lifetime():
    s = RetrySchedule([100], max_lifetime=1000)
    assert s.next_attempt(T0, 4, T0 + 1000) is None
    assert s.next_attempt(T0, 4, T0 + 5000) is None


def test_a_message_never_tried_is_tried_even_past_its_lifetime():
    # held past its lifetime, then released: one attempt before the bounce
    assert RetrySchedule([60], 100).next_attempt(T0, 0, T0 + 5000) == T0 + 5000


class FakeClock:
    """The queue's time, moved by the test."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def walk(s: RetrySchedule, duration: float = 0.0) -> tuple[list[float], float]:
    """Attempts that all fail temporarily, as the runner makes them on a fake
    clock (each starts when due and takes `duration` seconds): the start of
    each, and when the message was given up (seconds after arrival)."""
    clock = FakeClock(T0)
    starts: list[float] = []
    at: float | None = T0
    for attempts in range(1, 10_000):  # bounded: a schedule that never ends fails
        assert at is not None
        clock.now = max(clock.now, at)  # the runner starts an attempt once it is due
        starts.append(clock() - T0)
        clock.now += duration
        at = s.next_attempt(T0, attempts, clock())
        if at is None:
            return starts, clock() - T0
    pytest.fail("the schedule never gave up")


def test_issue_16_max_lifetime_150_with_retries_15_30():
    """The schedule that gave up at 135 s, after a delay notice had promised
    Will-Retry-Until at 150 s: the last attempt is at 150 s now."""
    s = RetrySchedule([15, 30], max_lifetime=150)
    starts, given_up = walk(s)
    assert starts == [0, 15, 45, 75, 105, 135, 150]
    assert given_up == 150 == s.expires(T0) - T0


@pytest.mark.parametrize("duration", [0.0, 0.5, 29.0, 31.0])  # exact in binary
@pytest.mark.parametrize(
    ("delays", "lifetime"),
    [([15, 30], 150), ([60], 60), ([60], 59), ([7], 100), ([1000], 10), ([10, 20, 40], 3600.5)],
)
def test_never_given_up_before_the_promised_time(delays, lifetime, duration):
    """Whatever the schedule and however long attempts take, a message is given
    up no earlier than `expires` (a delay report's Will-Retry-Until), after an
    attempt that ended then or later; each wait is the schedule's, cut short
    at the end of the lifetime."""
    s = RetrySchedule(delays, lifetime)
    starts, given_up = walk(s, duration)
    assert given_up >= lifetime
    assert starts[-1] + duration >= lifetime
    assert all(start + duration < lifetime for start in starts[:-1])
    for n, (before, start) in enumerate(itertools.pairwise(starts), start=1):
        end = before + duration
        assert start == max(min(end + s.delay_after(n), lifetime), end)


def test_default_schedule_attempts_over_five_days():
    """Walking the default schedule: the attempt times, and the give-up."""
    starts, given_up = walk(default_schedule())
    assert starts[:8] == [0, 60, 360, 1260, 3060, 6660, 13860, 28260]
    assert all(b - a == 14400 for a, b in itertools.pairwise(starts[7:-1]))
    # 8 attempts in the first 8 hours, 28 every 4 hours, the last at 5 days
    assert starts[-2] < 5 * DAY < starts[-2] + 14400
    assert starts[-1] == given_up == 5 * DAY
    assert len(starts) == 37


def test_a_clock_that_went_back_still_schedules():
    s = RetrySchedule([60], DAY)
    assert s.next_attempt(T0, 1, T0 - 3600) == T0 - 3540


@pytest.mark.parametrize(
    ("delays", "lifetime"),
    [
        ([], DAY),
        ("60", DAY),
        ([60, 0], DAY),
        ([-1], DAY),
        ([math.nan], DAY),
        ([math.inf], DAY),
        ([60], 0),
        ([60], -5),
        ([60], math.inf),
        ([60], math.nan),
    ],
)
def test_nonsense_is_refused(delays, lifetime):
    with pytest.raises(ValueError):
        RetrySchedule(delays, lifetime)


def test_negative_attempts_are_refused():
    with pytest.raises(ValueError):
        default_schedule().next_attempt(T0, -1, T0)


def test_equality_and_repr():
    assert RetrySchedule([1, 2], 10) == RetrySchedule((1.0, 2.0), 10.0)
    assert RetrySchedule([1, 2], 10) != RetrySchedule([1, 3], 10)
    assert hash(RetrySchedule([1], 5)) == hash(RetrySchedule([1.0], 5.0))
    assert "max_lifetime=10.0" in repr(RetrySchedule([1, 2], 10))


def test_delay_warning_is_due_once_after_the_delay():
    assert not delay_warning_due(T0, T0 + 3599, 3600, warned=False)
    assert delay_warning_due(T0, T0 + 3600, 3600, warned=False)
    assert delay_warning_due(T0, T0 + 9999, 3600, warned=False)
    assert not delay_warning_due(T0, T0 + 9999, 3600, warned=True)


@pytest.mark.parametrize("off", [0, -1, math.nan])
def test_delay_warning_off(off):
    assert not delay_warning_due(T0, T0 + 10 * DAY, off, warned=False)


def test_schedule_is_pure():
    """Standard library only, and no clock: times are always passed in."""
    tree = ast.parse(Path(schedule.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    assert not imported & {"time", "datetime", "random", "os", "socket"}
