"""The queue runner's decisions, with a scripted SMTP client and a fake clock."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import gevent
import gevent.event
import pytest
from loguru import logger

from geosmtp import logs
from geosmtp.queue.runner import QueueRunner, ReportNotStored, RunnerSettings
from geosmtp.queue.schedule import RetrySchedule
from geosmtp.queue.store import (
    DELIVERED,
    FAILED,
    MAX_TEXT,
    PENDING,
    QueuedRecipient,
    QueueRecord,
    QueueStore,
    read_record,
)
from geosmtp.relay.client import (
    MAX_REPLY_BYTES,
    AttemptResult,
    Outcome,
    RecipientResult,
    parse_reply,
)
from geosmtp.relay.mx import DNSPermanentError, DNSTemporaryError, Host
from geosmtp.storage import Spool
from geosmtp.storage.spool import UniqueNames


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Resolver:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def resolve_mx(self, domain: str) -> list[Host]:
        if self.error:
            raise self.error
        return [Host(f"mx.{domain}", ("127.0.0.9",))]


class Client:
    """Answers each recipient from `outcomes` (address -> (Outcome, status))."""

    def __init__(self, outcomes: dict[str, tuple[Outcome, str]]) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[str, list[str], bytes]] = []
        self.options: list[dict] = []

    def __call__(self, hosts, port, sender, recipients, message, **kw) -> AttemptResult:
        self.calls.append((sender, list(recipients), message.read()))
        self.options.append(kw)
        results = tuple(
            RecipientResult(r, *self.outcomes[r], diagnostic=f"smtp; {self.outcomes[r][1]} x")
            for r in recipients
        )
        address = hosts[0].addresses[0] if hosts[0].addresses else hosts[0].name
        return AttemptResult(results, remote_host=hosts[0].name, remote_address=address)


@pytest.fixture
def make(tmp_path: Path):
    def factory(  # type: ignore[no-untyped-def]
        outcomes,
        *,
        sender="alice@example.test",
        notify=None,
        resolver=None,
        delays=(60,),
        lifetime=3600,
        delay_warning=0,
    ):
        store = QueueStore(tmp_path / ".queue")
        spool = Spool(tmp_path / ".spool", UniqueNames("h"))
        f = spool.open()
        f.write(b"Return-Path: <alice@example.test>\nSubject: s\n\nbody\n")
        rcpts = [QueuedRecipient(a, a.split("@")[1], notify=notify) for a in outcomes]
        record = QueueRecord("Q1", sender, 1000.0, rcpts)
        store.add(f, record)
        f.remove()
        reports: list[tuple[str, list[str]]] = []
        clock = Clock()
        settings = RunnerSettings(
            "mx.example.test", RetrySchedule(delays, lifetime), delay_warning=delay_warning
        )
        client = Client(outcomes)
        runner = QueueRunner(
            store,
            settings,
            resolver or Resolver(),
            lambda rec, rs, kind: reports.append((kind, [r.address for r in rs])),
            send=client,
            clock=clock,
        )
        runner.records[record.id] = record
        return runner, record, client, reports, clock, store

    return factory


def test_one_transaction_per_domain_and_no_return_path(make):
    ok = (Outcome.DELIVERED, "2.0.0")
    runner, record, client, reports, _, store = make(
        {"b@remote.test": ok, "c@remote.test": ok, "d@other.test": ok}
    )
    runner._attempt(record)
    assert sorted(rcpts for _, rcpts, _ in client.calls) == [
        ["b@remote.test", "c@remote.test"],
        ["d@other.test"],
    ]
    assert all(data == b"Subject: s\n\nbody\n" for _, _, data in client.calls)
    assert reports == [] and "Q1" not in runner.records
    assert store.load().records == []  # finished: removed from disk


def test_a_temporary_failure_is_retried_on_the_schedule_and_saved(make):
    runner, record, _, reports, clock, store = make({"b@remote.test": (Outcome.TEMPORARY, "4.3.0")})
    runner._attempt(record)
    (rcpt,) = record.recipients
    assert (rcpt.state, rcpt.attempts, rcpt.next_attempt) == (PENDING, 1, clock.now + 60)
    assert store.load().records[0].recipients[0].attempts == 1  # on disk
    assert reports == []


def test_past_its_lifetime_it_fails_with_4_4_7_and_is_reported(make):
    runner, record, _, reports, clock, _ = make({"b@remote.test": (Outcome.TEMPORARY, "4.3.0")})
    clock.now = 1000.0 + 3600 - 10  # the next wait would end past the lifetime
    runner._attempt(record)
    (rcpt,) = record.recipients
    # not given up yet: one last attempt at the end of the lifetime
    assert (rcpt.state, rcpt.next_attempt) == (PENDING, 1000.0 + 3600)
    assert reports == []
    clock.now = rcpt.next_attempt
    runner._attempt(record)
    assert (rcpt.state, rcpt.status, rcpt.attempts) == (FAILED, "4.4.7", 2)
    assert "given up after 2 attempts" in rcpt.last_error
    assert reports == [("failed", ["b@remote.test"])]


def test_issue_16_the_last_attempt_is_at_the_time_the_delay_report_promised(make):
    """max_lifetime 150, retry_schedule [15, 30]: the runner used to give up at
    135 s, after a delay report had promised attempts until 150 s."""
    runner, record, client, reports, clock, _ = make(
        {"b@remote.test": (Outcome.TEMPORARY, "4.3.0")},
        delays=(15, 30),
        lifetime=150,
        delay_warning=40,
    )
    arrival = record.arrival
    promised = runner.settings.schedule.expires(arrival)  # what Will-Retry-Until says
    assert promised == arrival + 150
    (rcpt,) = record.recipients
    attempts_at: list[float] = []
    reported_at: dict[str, float] = {}
    for _ in range(20):  # bounded: a runner that never gives up fails below
        if rcpt.state != PENDING:
            break
        clock.now = max(clock.now, rcpt.next_attempt)  # the loop starts it when due
        attempts_at.append(clock.now - arrival)
        runner._attempt(record)
        for kind, _ in reports:
            reported_at.setdefault(kind, clock.now)
    assert attempts_at == [0, 15, 45, 75, 105, 135, 150]
    assert len(client.calls) == 7
    assert [kind for kind, _ in reports] == ["delayed", "failed"]
    assert reported_at["delayed"] == arrival + 45  # the first attempt after delay_warning
    assert reported_at["failed"] >= promised
    assert (rcpt.state, rcpt.status) == (FAILED, "4.4.7")


def test_a_permanent_failure_is_reported_once_and_the_delivered_not_resent(make):
    runner, record, client, reports, _, _ = make(
        {
            "b@remote.test": (Outcome.PERMANENT, "5.1.1"),
            "c@remote.test": (Outcome.DELIVERED, "2.0.0"),
        }
    )
    runner._attempt(record)
    assert reports == [("failed", ["b@remote.test"])]
    assert [r.state for r in record.recipients] == [FAILED, DELIVERED]
    assert len(client.calls) == 1


def test_a_bounce_that_cannot_be_stored_defers_the_recipient(make):
    """A full disk when the bounce is written: the recipient is deferred, not
    given up (the entry stays, on disk too), and failed and reported once the
    report can be stored."""
    runner, record, client, reports, clock, store = make(
        {"b@remote.test": (Outcome.PERMANENT, "5.1.1")}
    )
    stored = runner.report

    def disk_full(rec, rcpts, kind):  # type: ignore[no-untyped-def]
        raise ReportNotStored("No space left on device")

    runner.report = disk_full
    runner._attempt(record)
    (rcpt,) = record.recipients
    assert (rcpt.state, rcpt.attempts, rcpt.next_attempt) == (PENDING, 1, clock.now + 60)
    assert "Q1" in runner.records and not record.done
    assert store.load().records[0].recipients[0].state == PENDING  # on disk
    assert reports == []
    runner.report = stored
    clock.now += 60
    runner._attempt(record)
    assert reports == [("failed", ["b@remote.test"])]
    assert rcpt.state == FAILED and "Q1" not in runner.records
    assert store.load().records == []
    assert len(client.calls) == 2


def test_a_delay_report_not_stored_is_tried_again(make):
    runner, record, _, reports, clock, _ = make(
        {"b@remote.test": (Outcome.TEMPORARY, "4.3.0")}, delay_warning=30
    )
    stored = runner.report
    runner.report = lambda rec, rcpts, kind: (_ for _ in ()).throw(ReportNotStored("full"))
    clock.now += 60
    runner._attempt(record)
    assert not record.recipients[0].delay_warned
    runner.report = stored
    clock.now += 60
    runner._attempt(record)
    assert reports == [("delayed", ["b@remote.test"])]
    assert record.recipients[0].delay_warned


def test_the_longest_reply_fits_a_record():
    """What the client makes of the longest reply it reads (64 KiB) is cut to
    less than a record holds (`MAX_TEXT`): the runner's own bound is below it."""
    reply = parse_reply(451, b"4.3.0 " + b"x" * (MAX_REPLY_BYTES - 10))
    assert len(f"smtp; {reply} (given up after 99999 attempts)") < MAX_TEXT


@pytest.mark.parametrize("given_up", [False, True], ids=["deferred", "given-up"])
def test_a_long_diagnostic_never_makes_the_record_unreadable(make, given_up):
    """A reply, or an exception's text in an `x-geosmtp;` diagnostic, longer
    than a record holds is cut by the runner: its record loads again, and
    the end of the lifetime still says so."""
    runner, record, _, _, clock, store = make({"b@remote.test": (Outcome.TEMPORARY, "4.3.0")})
    long = "x-geosmtp; lost connection with mx.remote.test: " + "e" * 100_000

    def send(hosts, port, sender, recipients, message, **kw) -> AttemptResult:
        result = RecipientResult(recipients[0], Outcome.TEMPORARY, "4.4.2", diagnostic=long)
        return AttemptResult((result,), remote_host="m" * 100_000, remote_address="127.0.0.9")

    runner.send = send
    if given_up:
        clock.now = 1000.0 + 3600  # the end of the lifetime: this attempt is the last
    runner._attempt(record)
    (rcpt,) = record.recipients
    assert rcpt.state == (FAILED if given_up else PENDING)
    assert len(rcpt.last_error) == len(rcpt.remote_mta) == MAX_TEXT
    assert rcpt.last_error.startswith(long[:1000])
    tail = " (given up after 1 attempts)" if given_up else ""
    assert rcpt.last_error.endswith("e..." + tail)
    assert read_record(record.to_json()) == record  # what the next start reads
    if not given_up:
        (loaded,) = store.load().records
        assert loaded == record and store.quarantined_count() == 0


@pytest.mark.parametrize(
    ("notify", "expected"),
    [(None, [("failed", ["b@remote.test"])]), (["NEVER"], []), (["SUCCESS"], [])],
)
def test_notify_decides_the_failure_report(make, notify, expected):
    runner, record, _, reports, _, _ = make(
        {"b@remote.test": (Outcome.PERMANENT, "5.1.1")}, notify=notify
    )
    runner._attempt(record)
    assert reports == expected


def test_notify_success_gets_a_delivery_report(make):
    runner, record, _, reports, _, _ = make(
        {"b@remote.test": (Outcome.DELIVERED, "2.0.0")}, notify=["SUCCESS", "FAILURE"]
    )
    runner._attempt(record)
    assert reports == [("delivered", ["b@remote.test"])]


def from_a_dsn_hop(result: AttemptResult) -> AttemptResult:
    """`result` as from a next hop that offered DSN, so NOTIFY and ORCPT went on."""
    return dataclasses.replace(result, dsn=True)


@pytest.mark.parametrize("dsn_hop", [False, True])
def test_a_relayed_notice_only_where_the_next_hop_did_not_take_the_dsn_request(make, dsn_hop):
    """RFC 3461 §6.2.1: a hop that offered DSN got NOTIFY=SUCCESS passed on and
    reports the delivery itself; geosmtp sends `relayed` only to one that did not."""
    runner, record, client, reports, _, _ = make(
        {"b@remote.test": (Outcome.DELIVERED, "2.0.0")}, notify=["SUCCESS"]
    )
    if dsn_hop:
        send = runner.send
        runner.send = lambda *args, **kw: from_a_dsn_hop(send(*args, **kw))
    runner._attempt(record)
    assert record.recipients[0].state == DELIVERED and len(client.calls) == 1
    assert reports == ([] if dsn_hop else [("delivered", ["b@remote.test"])])


def test_nothing_is_ever_reported_to_the_null_sender(make):
    runner, record, _, reports, _, _ = make(
        {"b@remote.test": (Outcome.PERMANENT, "5.1.1")}, sender=""
    )
    runner._attempt(record)
    assert reports == [] and record.recipients[0].state == FAILED


def test_a_null_mx_fails_without_a_connection(make):
    error = DNSPermanentError("remote.test has a null MX (RFC 7505)", "5.1.10")
    runner, record, client, reports, _, _ = make(
        {"b@remote.test": (Outcome.DELIVERED, "2.0.0")}, resolver=Resolver(error)
    )
    runner._attempt(record)
    assert client.calls == []
    assert (record.recipients[0].state, record.recipients[0].status) == (FAILED, "5.1.10")
    assert reports == [("failed", ["b@remote.test"])]


# ------------------------------------------------ every attempt in the access log


class AccessLines:
    """Stands in for `logs.access_log`: the lines the runner writes, as fields."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def fields(self) -> list[dict[str, str]]:
        return [dict(item.split("=", 1) for item in shlex.split(line)) for line in self.lines]


@pytest.fixture
def access(monkeypatch) -> AccessLines:
    lines = AccessLines()
    monkeypatch.setattr(logs, "access_log", lines)
    return lines


@pytest.fixture
def info_lines():
    lines: list[str] = []
    handler = logger.add(lines.append, level="INFO", format="{message}")
    yield lines
    logger.remove(handler)


ATTEMPT_FIELDS = ["queue", "to", "relay", "delay", "status", "outcome", "reason"]


@pytest.mark.parametrize(
    ("error", "status", "outcome", "words"),
    [
        (
            DNSPermanentError("nosuch.test: no such domain (DNS: NXDOMAIN for MX)", "5.1.2"),
            "5.1.2",
            "bounced",
            "no such domain",
        ),
        (
            DNSPermanentError("remote.test has a null MX (RFC 7505)", "5.1.10"),
            "5.1.10",
            "bounced",
            "null MX",
        ),
        (
            DNSTemporaryError("remote.test: DNS lookup failed (SERVFAIL or REFUSED)", "4.4.3"),
            "4.4.3",
            "deferred",
            "SERVFAIL",
        ),
    ],
)
def test_a_dns_failure_is_an_access_line_with_no_relay(
    make, access, info_lines, error, status, outcome, words
):
    runner, record, client, _, clock, _ = make(
        {"b@remote.test": (Outcome.DELIVERED, "2.0.0")}, resolver=Resolver(error)
    )
    clock.now = record.arrival + 2.5
    runner._attempt(record)
    assert client.calls == []
    (line,) = access.fields()
    assert list(line) == ATTEMPT_FIELDS  # no tls=: there was no connection
    assert line["queue"] == "Q1" and line["to"] == "<b@remote.test>"
    assert line["relay"] == "none"
    assert line["delay"] == "2.50"
    assert (line["status"], line["outcome"]) == (status, outcome)
    assert line["reason"] == f"x-geosmtp; {error}" and words in line["reason"]
    done = [li.rstrip("\n") for li in info_lines if "done" in li]
    if outcome == "bounced":  # the server log's INFO line says why, too
        assert done == [f"queue Q1: done (<b@remote.test>: failed ({status} x-geosmtp; {error}))"]
    else:
        assert done == []


def test_each_recipient_of_an_smtp_attempt_gets_its_line(make, access):
    runner, record, _, _, _, _ = make(
        {
            "b@remote.test": (Outcome.DELIVERED, "2.0.0"),
            "c@remote.test": (Outcome.TEMPORARY, "4.2.1"),
            "d@remote.test": (Outcome.PERMANENT, "5.1.1"),
        }
    )
    runner._attempt(record)
    lines = {line["to"]: line for line in access.fields()}
    assert len(access.lines) == 3
    assert {to: (li["outcome"], li["status"], li["reason"]) for to, li in lines.items()} == {
        "<b@remote.test>": ("sent", "2.0.0", "smtp; 2.0.0 x"),
        "<c@remote.test>": ("deferred", "4.2.1", "smtp; 4.2.1 x"),
        "<d@remote.test>": ("bounced", "5.1.1", "smtp; 5.1.1 x"),
    }
    assert {li["relay"] for li in lines.values()} == {"mx.remote.test[127.0.0.9]:None"}


def test_the_attempt_that_gives_up_is_bounced_with_4_4_7_in_the_access_log(make, access):
    runner, record, _, _, clock, _ = make(
        {"b@remote.test": (Outcome.TEMPORARY, "4.3.0")}, lifetime=100
    )
    clock.now = record.arrival + 100
    runner._attempt(record)
    (line,) = access.fields()
    assert (line["status"], line["outcome"]) == ("4.4.7", "bounced")
    assert line["reason"] == "smtp; 4.3.0 x (given up after 1 attempts)"
    assert line["delay"] == "100.00"


def test_an_attempt_that_fails_with_a_bug_is_deferred_in_the_access_log(make, access):
    runner, record, _, _, clock, _ = make({"b@remote.test": (Outcome.DELIVERED, "2.0.0")})

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    runner.send = broken
    runner._attempt(record)
    (line,) = access.fields()
    assert (line["relay"], line["status"], line["outcome"]) == ("none", "4.3.0", "deferred")
    assert "internal error" in line["reason"]
    assert record.recipients[0].next_attempt == clock.now + 60


# ------------------------------------------------- a crash between outcome and report
# Issue 19: a recipient's outcome is saved after its domain's transaction (so a
# delivered recipient is never sent twice), but its report comes at the end of
# the attempt. A crash in between (the next domain in flight) left a `failed`
# recipient on disk whose bounce was never made, and nothing ever made it. The
# report owed is saved with the outcome (`report_due`) and made on the next
# start; a crash after the report and before the mark is cleared makes it twice,
# never zero times.


OK = (Outcome.DELIVERED, "2.0.0")


class Crash(BaseException):
    """The process dies here: nothing after it runs (not even an `except Exception`)."""


def crash_at(domain: str, client: Client) -> Client:
    """`client`, but the server dies while a transaction to `domain` is in flight."""

    def send(hosts, port, sender, recipients, message, **kw) -> AttemptResult:
        if recipients[0].endswith("@" + domain):
            raise Crash
        return client(hosts, port, sender, recipients, message, **kw)

    return send  # type: ignore[return-value]


def restarted(store: QueueStore, outcomes, clock: Clock):  # type: ignore[no-untyped-def]
    """A fresh runner started on what the crash left on disk (`QueueRunner.start`,
    as the server starts one), run until the queue has nothing due."""
    reports: list[tuple[str, list[str]]] = []
    client = Client(outcomes)
    runner = QueueRunner(
        store,
        RunnerSettings("mx.example.test", RetrySchedule((60,), 3600), delay_warning=0),
        Resolver(),
        lambda rec, rs, kind: reports.append((kind, [r.address for r in rs])),
        send=client,
        clock=clock,
    )
    runner.start()
    try:
        for _ in range(200):  # bounded: the attempts are immediate
            gevent.sleep(0.01)
            if not runner._busy and not any(d.at <= clock.now for d in runner._heap):
                break
    finally:
        runner.stop(timeout=1)
    return runner, client, reports


def test_a_bounce_is_not_lost_when_the_server_dies_before_it_is_made(make):
    """remote.test fails for good and its outcome is saved; the server dies
    while other.test is in flight, before the attempt's reports. The bounce
    is made after the restart, and the failed recipient is not tried again."""
    outcomes = {"b@remote.test": (Outcome.PERMANENT, "5.1.1"), "d@other.test": OK}
    runner, record, client, reports, clock, store = make(outcomes)
    runner.send = crash_at("other.test", client)
    with pytest.raises(Crash):
        runner._try(record)
    assert reports == []
    (on_disk,) = store.load().records  # what the crash left
    assert [r.state for r in on_disk.recipients] == [FAILED, PENDING]
    clock.now += 1
    after, client, reports = restarted(store, outcomes, clock)
    assert reports == [("failed", ["b@remote.test"])]
    assert [rcpts for _, rcpts, _ in client.calls] == [["d@other.test"]]
    assert after.records == {} and store.load().records == []  # done, removed
    assert [r.report_due for r in on_disk.recipients] == [True, False]  # saved with the outcome


def test_a_success_report_is_not_lost_when_the_server_dies_before_it_is_made(make):
    """The same for NOTIFY=SUCCESS: the `relayed` report of a recipient
    delivered before the crash is made after the restart, and the mail is not
    sent to it again."""
    outcomes = {"b@remote.test": OK, "d@other.test": OK}
    runner, record, client, reports, clock, store = make(outcomes, notify=["SUCCESS"])
    runner.send = crash_at("other.test", client)
    with pytest.raises(Crash):
        runner._try(record)
    clock.now += 1
    _, client, reports = restarted(store, outcomes, clock)
    assert [(kind, sorted(rcpts)) for kind, rcpts in reports] == [
        ("delivered", ["b@remote.test", "d@other.test"])  # one report for both
    ]
    assert [rcpts for _, rcpts, _ in client.calls] == [["d@other.test"]]
    assert store.load().records == []


def test_a_report_owed_at_start_is_made_at_once_not_at_the_next_attempt(make):
    """A record as the crash leaves it, the other recipient deferred for an
    hour: the bounce is made at start, without waiting for that attempt."""
    outcomes = {"b@remote.test": (Outcome.PERMANENT, "5.1.1"), "d@other.test": OK}
    _, record, _, _, clock, store = make(outcomes)
    failed, later = record.recipients
    failed.state, failed.attempts, failed.status, failed.report_due = FAILED, 1, "5.1.1", True
    later.next_attempt = clock.now + 3600
    store.save(record)
    runner, client, reports = restarted(store, outcomes, clock)
    assert reports == [("failed", ["b@remote.test"])]
    assert client.calls == []  # other.test is not due
    (on_disk,) = store.load().records
    assert [r.report_due for r in on_disk.recipients] == [False, False]  # reported: saved
    assert list(runner.records) == ["Q1"]


def test_a_record_of_the_older_format_reports_nothing_again(make):
    """A record written before `report_due` existed (its failed recipients were
    reported before that record was saved, or lost in the crash window this
    closes): it loads as nothing owed, so an upgrade bounces nothing twice."""
    outcomes = {"b@remote.test": (Outcome.PERMANENT, "5.1.1"), "d@other.test": OK}
    _, record, _, _, clock, store = make(outcomes)
    record.recipients[0].state = FAILED
    raw = json.loads(record.to_json())
    for rcpt in raw["recipients"]:
        del rcpt["report_due"]
    Path(store.records, "Q1.json").write_text(json.dumps(raw))
    _, client, reports = restarted(store, outcomes, clock)
    assert reports == []
    assert [rcpts for _, rcpts, _ in client.calls] == [["d@other.test"]]


def test_a_stop_that_kills_a_later_domains_attempt_loses_no_bounce(make):
    """Not even a crash: a stop (SIGTERM) kills the attempts still in flight
    after its grace period; one killed at other.test, after remote.test failed,
    left that failure unreported. The next start makes the bounce."""
    outcomes = {"b@remote.test": (Outcome.PERMANENT, "5.1.1"), "d@other.test": OK}
    runner, record, client, reports, clock, store = make(outcomes)
    del runner.records[record.id]
    stalled = gevent.event.Event()

    def send(hosts, port, sender, recipients, message, **kw) -> AttemptResult:
        if recipients[0].endswith("@other.test"):
            stalled.set()
            gevent.sleep(60)  # a next hop that stalls: killed by the stop
        return client(hosts, port, sender, recipients, message, **kw)

    runner.send = send
    runner.start()
    assert stalled.wait(timeout=5)
    runner.stop(timeout=0)
    assert reports == []
    assert [r.state for r in store.load().records[0].recipients] == [FAILED, PENDING]
    _, client, reports = restarted(store, outcomes, clock)
    assert reports == [("failed", ["b@remote.test"])]
    assert [rcpts for _, rcpts, _ in client.calls] == [["d@other.test"]]


def test_a_crash_after_the_report_and_before_its_mark_makes_it_twice_not_never(make):
    """The report is made, then the server dies before the record saying so is
    written: the next start makes it again (a duplicate bounce, Postfix's
    choice too), never none."""
    outcomes = {"b@remote.test": (Outcome.PERMANENT, "5.1.1")}
    runner, record, _, reports, clock, store = make(outcomes)

    def report_then_die(rec, rcpts, kind):  # type: ignore[no-untyped-def]
        reports.append((kind, [r.address for r in rcpts]))
        raise Crash

    runner.report = report_then_die
    with pytest.raises(Crash):
        runner._try(record)
    _, _, again = restarted(store, outcomes, clock)
    assert reports == again == [("failed", ["b@remote.test"])]
    assert store.load().records == []


def test_a_bug_in_a_later_domain_does_not_lose_an_earlier_bounce(make):
    """Without a crash: remote.test fails for good, then the attempt at
    other.test fails with a bug. The bounce is still made in this attempt, and
    the entry is kept for other.test."""
    outcomes = {"b@remote.test": (Outcome.PERMANENT, "5.1.1"), "d@other.test": OK}
    runner, record, client, reports, clock, store = make(outcomes)

    def broken(hosts, port, sender, recipients, message, **kw) -> AttemptResult:
        if recipients[0].endswith("@other.test"):
            raise RuntimeError("a bug")
        return client(hosts, port, sender, recipients, message, **kw)

    runner.send = broken
    runner._attempt(record)
    assert reports == [("failed", ["b@remote.test"])]
    (on_disk,) = store.load().records
    assert [(r.state, r.report_due) for r in on_disk.recipients] == [
        (FAILED, False),
        (PENDING, False),
    ]
    runner.send = client
    clock.now += 60
    runner._attempt(record)
    assert reports == [("failed", ["b@remote.test"])]  # not twice
    assert "Q1" not in runner.records and store.load().records == []


def test_the_dsn_parameters_go_to_the_client(make):
    """Issue 20 (RFC 3461 §6.2.1): ENVID, RET, and each recipient's NOTIFY and
    ORCPT as received, for a next hop that offers DSN; SIZE is the client's to measure."""
    ok = (Outcome.DELIVERED, "2.0.0")
    runner, record, client, _, _, _ = make(
        {"b@remote.test": ok, "c@remote.test": ok}, notify=["SUCCESS", "DELAY"]
    )
    record.envid, record.ret = "QQ+2B1", "HDRS"
    record.recipients[0].orcpt = "rfc822;B@remote.test"
    runner._attempt(record)
    (options,) = client.options
    assert (options["envid"], options["ret"]) == ("QQ+2B1", "HDRS")
    assert options["notify"] == [["SUCCESS", "DELAY"], ["SUCCESS", "DELAY"]]
    assert options["orcpt"] == ["rfc822;B@remote.test", None]
    assert "size" not in options


# ------------------------------------------------------------------ LMTP


def test_lmtp_recipients_go_in_one_lmtp_transaction_each_with_its_own_outcome(
    make, access, tmp_path
):
    """`delivery.lmtp`: an entry's local recipients go to the LMTP server in
    one transaction, given as their mailboxes; each reply decides for its
    recipient as a remote's does (delivered, deferred on the schedule,
    bounced with a report), and the remote recipient still goes by SMTP."""
    ok, later, no = (
        (Outcome.DELIVERED, "2.0.0"),
        (Outcome.TEMPORARY, "4.2.2"),
        (Outcome.PERMANENT, "5.1.1"),
    )
    runner, record, client, reports, clock, store = make(
        {"bob@here.test": ok, "carol@here.test": later, "dan@here.test": no, "e@remote.test": ok}
    )
    for rcpt in record.recipients[:3]:
        rcpt.lmtp = rcpt.address  # as QueueDestination queues a local one
    record.recipients[0].address = "Bob@here.test"  # the client's spelling, kept for reports
    runner.settings = dataclasses.replace(runner.settings, lmtp=("/run/test/lmtp", 0))
    runner._attempt(record)
    lmtp_calls = [i for i, kw in enumerate(client.options) if kw.get("lmtp")]
    assert len(lmtp_calls) == 1 and len(client.calls) == 2
    _, rcpts, data = client.calls[lmtp_calls[0]]
    assert rcpts == ["bob@here.test", "carol@here.test", "dan@here.test"]
    assert data == b"Subject: s\n\nbody\n"  # its Return-Path is the LMTP server's to add
    assert [(r.state, r.status) for r in record.recipients] == [
        (DELIVERED, "2.0.0"),
        (PENDING, "4.2.2"),
        (FAILED, "5.1.1"),
        (DELIVERED, "2.0.0"),
    ]
    assert record.recipients[1].next_attempt == clock.now + 60
    assert reports == [("failed", ["dan@here.test"])]
    lines = {li["to"]: li for li in access.fields()}
    assert lines["<Bob@here.test>"]["relay"] == "lmtp:/run/test/lmtp"
    assert (lines["<carol@here.test>"]["outcome"], lines["<dan@here.test>"]["outcome"]) == (
        "deferred",
        "bounced",
    )
    assert lines["<e@remote.test>"]["relay"].startswith("mx.remote.test")
    assert read_record(Path(store.records, "Q1.json").read_bytes()).recipients[1].lmtp == (
        "carol@here.test"
    )


def test_an_entry_queued_for_lmtp_waits_when_no_lmtp_server_is_set(make, access):
    runner, record, client, reports, _, _ = make({"bob@here.test": (Outcome.DELIVERED, "2.0.0")})
    record.recipients[0].lmtp = "bob@here.test"
    runner._attempt(record)
    assert client.calls == [] and reports == []
    (rcpt,) = record.recipients
    assert (rcpt.state, rcpt.status) == (PENDING, "4.3.5")
    assert "delivery.lmtp is not set" in access.fields()[0]["reason"]
