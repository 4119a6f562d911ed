"""Per-destination concurrency that adapts (issue 20; Postfix's destination
concurrency feedback): the window's arithmetic, what a result says of its
destination, and the runner's deliveries in flight counted against a
scripted send that blocks until the test lets each one end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gevent
import gevent.event
import pytest
from loguru import logger

from geosmtp.queue.concurrency import (
    INITIAL,
    DestinationLimits,
    Feedback,
    Verdict,
    Window,
    verdict,
)
from geosmtp.queue.runner import QueueRunner, RunnerSettings
from geosmtp.queue.schedule import RetrySchedule
from geosmtp.queue.store import PENDING, QueuedRecipient, QueueRecord, QueueStore
from geosmtp.relay.client import (
    AttemptResult,
    Outcome,
    RecipientResult,
    Tried,
    parse_reply,
)
from geosmtp.relay.mx import Host
from geosmtp.storage import Spool
from geosmtp.storage.spool import UniqueNames


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ results


def delivered(rcpt: str) -> AttemptResult:
    return AttemptResult(
        (RecipientResult(rcpt, Outcome.DELIVERED, "2.0.0", "smtp; 250 ok"),),
        remote_host="mx.remote.test",
        remote_address="127.0.0.9",
    )


def refused(rcpt: str) -> AttemptResult:
    """No address took the connection (the client's 'every address failed')."""
    why = "x-geosmtp; connect to mx.remote.test[127.0.0.9]:25: Connection refused"
    return AttemptResult(
        (RecipientResult(rcpt, Outcome.TEMPORARY, "4.4.1", why),),
        tried=(Tried("mx.remote.test", "127.0.0.9", "4.4.1", why),),
    )


def replied(rcpt: str, code: int, text: bytes, outcome: Outcome) -> AttemptResult:
    reply = parse_reply(code, text)
    return AttemptResult(
        (RecipientResult(rcpt, outcome, reply.status, f"smtp; {reply}", reply),),
        remote_host="mx.remote.test",
        remote_address="127.0.0.9",
    )


def lost(rcpt: str) -> AttemptResult:
    """A server was reached, then the connection went before a reply decided."""
    why = "x-geosmtp; lost connection with mx.remote.test[127.0.0.9]:25 while sending DATA"
    return AttemptResult(
        (RecipientResult(rcpt, Outcome.TEMPORARY, "4.4.2", why),),
        remote_host="mx.remote.test",
        remote_address="127.0.0.9",
    )


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (delivered("b@remote.test"), Feedback.POSITIVE),
        # the server answered: a refusal of the recipient is not the site's failure
        (
            replied("b@remote.test", 550, b"5.1.1 no such user", Outcome.PERMANENT),
            Feedback.POSITIVE,
        ),
        (replied("b@remote.test", 450, b"4.2.0 greylisted", Outcome.TEMPORARY), Feedback.POSITIVE),
        (refused("b@remote.test"), Feedback.NEGATIVE),
        (replied("b@remote.test", 421, b"4.3.2 too busy", Outcome.TEMPORARY), Feedback.NEGATIVE),
        (lost("b@remote.test"), Feedback.NEGATIVE),
        # nothing was tried (a mail loop, no host): nothing learnt
        (
            AttemptResult(
                (RecipientResult("b@remote.test", Outcome.PERMANENT, "5.4.6", "x-geosmtp; loop"),)
            ),
            Feedback.NONE,
        ),
    ],
    ids=["delivered", "550", "450", "refused", "421", "lost", "not-tried"],
)
def test_what_a_result_says_of_its_destination(result: AttemptResult, expected: Feedback):
    got = verdict(result)
    assert got.feedback is expected
    if expected is Feedback.NEGATIVE:  # the reason a suspension gives
        assert got.status.startswith("4.") and got.diagnostic == result.recipients[0].diagnostic


# ------------------------------------------------------------------- window


def test_the_window_grows_by_one_per_cohort_of_successes_up_to_the_maximum():
    w = Window(INITIAL, 8)
    limits = []
    for _ in range(30):
        w.success()
        limits.append(w.limit)
    # 5 successes at 5, then 6 at 6, then 7 at 7: 1/limit each
    assert limits[:18] == [5] * 4 + [6] * 6 + [7] * 7 + [8]
    assert set(limits[17:]) == {8}  # never above per_domain_concurrency


def test_the_window_drops_to_1_on_failures_and_a_success_starts_again():
    w = Window(INITIAL, 20)
    limits = []
    for _ in range(10):
        w.failure()
        limits.append(w.limit)
    # lowered at the start of each sequence of `limit` failures, never below 1
    assert limits == [4, 4, 4, 4, 3, 3, 3, 2, 2, 1]
    assert not w.dead(1)
    w.failure()  # a whole cohort failed at 1
    assert (w.limit, w.dead(1)) == (1, True)
    w.success()
    assert not w.dead(1) and w.limit == 2  # one success at 1 is a whole cohort


def test_a_success_between_failures_restarts_the_negative_sequence():
    w = Window(INITIAL, 20)
    w.failure()  # 5 -> 4 at once
    w.failure()
    w.success()
    w.failure()  # a new sequence: lowered at its start
    assert w.limit == 3


# ---------------------------------------------------------- limits, greenlets


def limits(maximum: int = 20, dead_for: float = 60.0) -> tuple[DestinationLimits, Clock]:
    clock = Clock()
    return DestinationLimits(lambda: maximum, lambda: dead_for, clock), clock


def poll(condition: Callable[[], bool], what: str) -> None:
    """Yield to the other greenlets until `condition` holds (bounded)."""
    for _ in range(2000):
        if condition():
            return
        gevent.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def test_a_destination_is_forgotten_when_idle():
    lim, _ = limits()
    for i in range(1000):  # a queue of many domains keeps none of them once idle
        with lim.slot(f"d{i}.test") as slot:
            slot.feedback(delivered("b@d.test"))
    assert len(lim) == 0


def test_a_waiter_killed_while_waiting_gives_back_nothing_it_did_not_take():
    lim, _ = limits(maximum=1)
    release = gevent.event.Event()
    entered: list[int] = []

    def hold(n: int) -> None:
        with lim.slot("remote.test"):
            entered.append(n)
            release.wait()

    first = gevent.spawn(hold, 1)
    poll(lambda: entered == [1], "the first holds the only slot")
    waiters = [gevent.spawn(hold, n) for n in (2, 3)]
    poll(lambda: lim.view()["remote.test"]["waiting"] == 2, "two wait")
    waiters[0].kill()  # a stop kills a waiting attempt
    assert lim.view()["remote.test"] == {
        "limit": 1,
        "in_flight": 1,
        "waiting": 1,
        "dead_until": None,
    }
    release.set()
    gevent.joinall([first, waiters[1]], timeout=5)
    assert entered == [1, 3] and len(lim) == 0


def test_a_dead_destination_defers_its_waiters_then_starts_again_after_its_time():
    clock = Clock()
    lim = DestinationLimits(lambda: 20, lambda: 60.0, clock, initial=1)
    gate = gevent.event.Event()
    got: list[Verdict | None] = []

    def deliver(result: AttemptResult | None) -> None:
        with lim.slot("remote.test") as slot:
            got.append(slot.suspended)
            if slot.suspended is None:
                gate.wait()
                if result is not None:
                    slot.feedback(result)

    holder = gevent.spawn(deliver, refused("b@remote.test"))
    poll(lambda: got == [None], "the one slot at 1 is taken")
    waiting = [gevent.spawn(deliver, None) for _ in range(3)]
    poll(lambda: lim.view()["remote.test"]["waiting"] == 3, "three wait")
    gate.set()  # its failure at 1 is a whole failed cohort: dead
    gevent.joinall([holder, *waiting], timeout=5)
    suspended = got[1:]
    assert len(suspended) == 3 and all(isinstance(s, Verdict) for s in suspended)
    assert "Connection refused" in suspended[0].diagnostic  # type: ignore[union-attr]
    assert lim.view()["remote.test"]["dead_until"] == clock.now + 60  # kept while dead
    with lim.slot("remote.test") as slot:  # asked meanwhile: told at once
        assert slot.suspended is not None
    clock.now += 60
    with lim.slot("remote.test") as slot:  # its time is over: tried again
        assert slot.suspended is None
        assert lim.view()["remote.test"]["in_flight"] == 1
    assert len(lim) == 0


# -------------------------------------------------------------- the runner


class Resolver:
    def resolve_mx(self, domain: str) -> list[Host]:
        return [Host(f"mx.{domain}", ("127.0.0.9",))]


class Gated:
    """A send that blocks until the test lets it end, counting those in flight."""

    def __init__(self, result: Callable[[str], AttemptResult]) -> None:
        self.result = result
        self.gates: list[gevent.event.Event] = []
        self.in_flight = 0
        self.peak = 0
        self.returned = 0

    def __call__(self, hosts, port, sender, recipients, message, **kw) -> AttemptResult:
        gate = gevent.event.Event()
        self.gates.append(gate)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            gate.wait()
        finally:
            self.in_flight -= 1
            self.returned += 1
        return self.result(recipients[0])


def queue_of(tmp_path: Path, domains: list[str], send: Gated, **settings) -> QueueRunner:
    """A started runner with one queued message to b@<domain> for each domain."""
    store = QueueStore(tmp_path / ".queue")
    spool = Spool(tmp_path / ".spool", UniqueNames("h"))
    for n, domain in enumerate(domains):
        f = spool.open()
        f.write(b"Subject: s\n\nbody\n")
        rcpt = QueuedRecipient(f"b@{domain}", domain)
        store.add(f, QueueRecord(f"Q{n}", "alice@example.test", 1000.0, [rcpt]))
        f.remove()
    runner = QueueRunner(
        store,
        RunnerSettings("mx.example.test", RetrySchedule((60,), 3600), delay_warning=0, **settings),
        Resolver(),  # type: ignore[arg-type]
        lambda record, rcpts, kind: None,
        send=send,
        clock=Clock(),
    )
    runner.start()
    return runner


def waiting(runner: QueueRunner) -> int:
    return sum(d["waiting"] for d in runner._limits.view().values())  # type: ignore[misc]


def settled(runner: QueueRunner, send: Gated, returned: int) -> Callable[[], bool]:
    """`returned` sends have ended (and their attempts with them: nothing after
    the send yields), and every other attempt is sending or waiting for a slot.
    With fewer entries than `relay.concurrency`: the pool is never full."""
    return lambda: (
        send.returned == returned and send.in_flight + waiting(runner) == len(runner._busy)
    )


def run_one_by_one(runner: QueueRunner, send: Gated, total: int) -> list[int]:
    """Let the sends end one at a time, oldest first; the number in flight after each."""
    assert total < runner.settings.concurrency
    poll(lambda: len(runner._busy) == total, "every entry has its attempt")
    poll(settled(runner, send, 0), "every attempt sending or waiting")
    in_flight = [send.in_flight]
    for n in range(total):
        send.gates[n].set()
        poll(settled(runner, send, n + 1), f"settled after {n + 1} sends")
        if not runner._busy:
            break
        in_flight.append(send.in_flight)
    return in_flight


def test_a_destination_starts_at_5_and_grows_while_deliveries_succeed(tmp_path):
    send = Gated(delivered)
    runner = queue_of(
        tmp_path, ["remote.test"] * 30, send, concurrency=40, per_domain_concurrency=8
    )
    try:
        in_flight = run_one_by_one(runner, send, 30)
    finally:
        runner.stop(timeout=1)
    # 5 at first; one more after each whole cohort of successes, up to 8
    assert in_flight[:19] == [5] * 5 + [6] * 6 + [7] * 7 + [8]
    assert send.peak == 8  # never above per_domain_concurrency
    assert not runner.records and len(send.gates) == 30  # all delivered, each once
    assert len(runner._limits) == 0  # idle: forgotten


def test_the_global_concurrency_bounds_all_destinations(tmp_path):
    send = Gated(delivered)
    domains = [f"d{n % 4}.test" for n in range(12)]
    runner = queue_of(tmp_path, domains, send, concurrency=3)
    try:
        for n in range(12):  # each send as it comes: never more than 3 at once
            poll(lambda n=n: len(send.gates) > n, f"send {n + 1} started")
            send.gates[n].set()
        poll(lambda: not runner.records, "all delivered")
    finally:
        runner.stop(timeout=1)
    assert send.peak == 3 and not runner.records and len(send.gates) == 12


def test_with_a_smarthost_every_domain_is_one_destination(tmp_path):
    send = Gated(delivered)
    domains = [f"d{n % 3}.test" for n in range(12)]
    runner = queue_of(tmp_path, domains, send, smarthost=("127.0.0.1", 2525))
    try:
        poll(lambda: len(runner._busy) == 12, "every entry has its attempt")
        poll(settled(runner, send, 0), "every attempt sending or waiting")
        assert send.in_flight == 5  # not 5 per domain
        assert runner._limits.view() == {
            "[127.0.0.1]:2525": {"limit": 5, "in_flight": 5, "waiting": 7, "dead_until": None}
        }
        for n in range(12):
            poll(lambda n=n: len(send.gates) > n, f"send {n + 1} started")
            send.gates[n].set()
        poll(lambda: not runner.records, "all delivered")
        assert send.peak == 6  # 5, and 6 once a cohort of 5 succeeded
    finally:
        runner.stop(timeout=1)


def test_failures_drop_a_destination_to_1_then_suspend_it(tmp_path):
    send = Gated(refused)
    runner = queue_of(tmp_path, ["remote.test"] * 30, send, concurrency=40)
    try:
        in_flight = run_one_by_one(runner, send, 30)
    finally:
        runner.stop(timeout=1)
    # lowered by one at the start of each sequence of `limit` failures
    assert in_flight == [5, 4, 4, 4, 4, 3, 3, 3, 2, 2, 1]
    assert send.peak == 5 and len(send.gates) == 11
    # the 11th failed at 1: the other 19 were deferred without a connection
    records = list(runner.records.values())
    assert len(records) == 30  # nothing lost: all still queued
    rcpts = [r.recipients[0] for r in records]
    assert all(r.state == PENDING and r.attempts == 1 for r in rcpts)
    suspended = [r for r in rcpts if "temporarily suspended" in (r.last_error or "")]
    assert len(suspended) == 19
    assert all(
        r.status == "4.4.1"
        and r.last_error
        == "x-geosmtp; delivery to remote.test temporarily suspended: "
        "connect to mx.remote.test[127.0.0.9]:25: Connection refused"
        for r in suspended
    )
    assert runner._limits.view()["remote.test"]["dead_until"] == 1000.0 + 60


def test_each_whole_step_of_a_limit_is_a_debug_line():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    try:
        lim, _ = limits(maximum=6)
        gate = gevent.event.Event()

        def deliver(result: AttemptResult) -> None:
            with lim.slot("remote.test") as slot:
                gate.wait()
                slot.feedback(result)

        # five in flight at once: the destination is kept while the cohort ends
        first = [gevent.spawn(deliver, delivered("b@remote.test")) for _ in range(5)]
        poll(lambda: lim.view().get("remote.test", {}).get("in_flight") == 5, "five in flight")
        gate.set()
        gevent.joinall(first, timeout=5)
    finally:
        logger.remove(sink)
    assert [ln for ln in lines if "concurrency" in ln] == [
        "relay: destination remote.test: concurrency 5 -> 6 (positive feedback)"
    ]
