"""The pipeline: stages, router, destinations; one verdict; all or nothing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from geosmtp.mail import Envelope, Mailbox, Recipient
from geosmtp.pipeline import (
    Accept,
    MaildirDestination,
    Message,
    Pipeline,
    Reject,
    Replace,
    Router,
    TempFail,
)
from geosmtp.storage import MaildirStore, Spool, StorageError
from geosmtp.storage.maildir import Delivery
from geosmtp.storage.spool import UniqueNames

ALICE = Recipient(Mailbox("alice", "example.test"), "alice")
BOB = Recipient(Mailbox("bob", "example.test"), "bob")
REMOTE = Recipient(Mailbox("carol", "elsewhere.example"), None)


@pytest.fixture
def parts(tmp_path: Path):
    names = UniqueNames("host")
    store = MaildirStore(tmp_path / "mail", names=names)
    spool = Spool(tmp_path / "mail" / ".spool", names)
    return store, spool


def message(spool: Spool, *recipients: Recipient, data: bytes = b"Subject: s\n\nbody\n"):
    f = spool.open()
    f.write(data)
    env = Envelope("client.example", True, Mailbox("s", "example.org"), recipients=recipients)
    return Message(env, f, "Q1", len(data))


def stored(store: MaildirStore) -> dict[str, list[bytes]]:
    return {
        box.name: sorted(p.read_bytes() for p in (box / "new").iterdir())
        for box in sorted(store.root.iterdir())
        if not box.name.startswith(".")
    }


def test_local_recipients_are_delivered_and_the_spool_is_emptied(parts):
    store, spool = parts
    verdict = Pipeline(Router(MaildirDestination(store))).process(message(spool, ALICE, BOB))
    assert verdict.delivered and verdict.destinations == ("maildir",)
    assert stored(store) == {"alice": [b"Subject: s\n\nbody\n"], "bob": [b"Subject: s\n\nbody\n"]}
    assert list(spool.root.iterdir()) == []


def test_a_recipient_without_a_route_is_a_temporary_failure(parts):
    store, spool = parts
    verdict = Pipeline(Router(MaildirDestination(store))).process(message(spool, ALICE, REMOTE))
    assert not verdict.delivered and verdict.temporary
    assert "no route to <carol@elsewhere.example>" in verdict.reason
    assert stored(store) == {} and list(spool.root.iterdir()) == []


class Failing:
    """A second destination that refuses: the first must take its copies back."""

    name = "failing"

    def __init__(self, no_space: bool) -> None:
        self.errno = errno.ENOSPC if no_space else errno.EIO

    def deliver(self, message, recipients) -> Delivery:
        raise StorageError(self.errno, os.strerror(self.errno))


class TwoWays(Router):
    def __init__(self, first, second) -> None:
        super().__init__(first)
        self.second = second

    def route(self, recipients):
        return [(self.local, recipients[:1]), (self.second, recipients[1:])]


@pytest.mark.parametrize("no_space", [True, False])
def test_one_failed_destination_takes_the_others_back(parts, no_space):
    store, spool = parts
    pipeline = Pipeline(TwoWays(MaildirDestination(store), Failing(no_space)))
    verdict = pipeline.process(message(spool, ALICE, BOB))
    assert not verdict.delivered and verdict.temporary and verdict.no_space is no_space
    assert list(store.root.glob("*/new/*")) == []  # alice's copy was taken back
    assert list(spool.root.iterdir()) == []


class Stage:
    def __init__(self, name, result) -> None:
        self.name = name
        self.result = result
        self.seen: list[bytes] = []

    def process(self, message):
        with open(message.spool.path, "rb") as f:
            message.spool.flush()
            self.seen.append(f.read())
        return self.result(message) if callable(self.result) else self.result


def test_stages_run_in_order_and_may_replace_the_message(parts):
    store, spool = parts

    def rewrite(msg):
        new = spool.open()
        new.write(b"Subject: [tagged] s\n\nbody\n")
        return Replace(new)

    first, second = Stage("tag", rewrite), Stage("check", Accept())
    pipeline = Pipeline(Router(MaildirDestination(store)), [first, second])
    original = message(spool, ALICE)
    assert pipeline.process(original).delivered
    assert second.seen == [b"Subject: [tagged] s\n\nbody\n"]
    assert stored(store) == {"alice": [b"Subject: [tagged] s\n\nbody\n"]}
    assert list(spool.root.iterdir()) == []  # the original and the rewrite both gone


@pytest.mark.parametrize(
    ("result", "temporary", "reply"),
    [
        (TempFail("scanner down"), True, None),
        (Reject("virus", text="Message refused: virus found"), False, (554, "5.7.1")),
        (TempFail("busy", 451, "4.7.1", "Try later"), True, (451, "4.7.1")),
    ],
)
def test_a_stage_that_refuses_decides(parts, result, temporary, reply):
    store, spool = parts
    never = Stage("never", Accept())
    pipeline = Pipeline(Router(MaildirDestination(store)), [Stage("filter", result), never])
    verdict = pipeline.process(message(spool, ALICE))
    assert not verdict.delivered and verdict.temporary is temporary
    assert verdict.reason.startswith("filter: ")
    assert ((verdict.code, verdict.status) if verdict.text else None) == reply
    assert never.seen == [] and stored(store) == {} and list(spool.root.iterdir()) == []


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def stage_done(self, stage, verdict, failure, seconds) -> None:
        assert seconds >= 0
        self.seen.append((stage, verdict, failure))


class Choosy(Stage):
    """A stage that applies only to messages with two recipients or more."""

    def applies(self, message) -> bool:
        return len(message.envelope.recipients) > 1


def test_what_each_stage_said_is_recorded_and_observed(parts):
    store, spool = parts
    observer = Recorder()
    stages = [
        Stage("plain", Accept()),  # no applies(): runs for every message
        Choosy("choosy", Reject("never")),
        Stage("failed", Accept(failure="timeout")),
        Stage("last", TempFail("busy", failure="busy")),
    ]
    pipeline = Pipeline(Router(MaildirDestination(store)), stages, observer=observer)
    msg = message(spool, ALICE)
    verdict = pipeline.process(msg)
    assert not verdict.delivered and verdict.temporary and verdict.stage == "last"
    assert [str(v) for v in msg.verdicts] == [
        "plain:accept",
        "failed:accept(timeout)",
        "last:tempfail(busy)",
    ]
    assert observer.seen == [
        ("plain", "accept", None),
        ("failed", "accept", "timeout"),
        ("last", "tempfail", "busy"),
    ]
    assert stages[1].seen == []  # choosy did not apply


def test_a_refusal_names_the_group_of_its_stage_for_the_metrics(parts):
    store, spool = parts
    grouped = Stage("sender-checks", Reject("dmarc=fail (reject)", 550))
    grouped.group = "sender-checks"  # type: ignore[attr-defined]
    for stage, group in (
        (grouped, "sender-checks"),
        (Stage("sender-checks", TempFail("x")), "filter"),
    ):
        verdict = Pipeline(Router(MaildirDestination(store)), [stage]).process(
            message(spool, ALICE)
        )
        assert (verdict.stage, verdict.group) == ("sender-checks", group)


def test_a_refusal_without_words_keeps_its_code(parts):
    store, spool = parts
    pipeline = Pipeline(Router(MaildirDestination(store)), [Stage("r", Reject("spam"))])
    verdict = pipeline.process(message(spool, ALICE))
    assert (verdict.code, verdict.status, verdict.text) == (554, "5.7.1", None)


@pytest.mark.parametrize("no_space", [True, False])
def test_a_stage_that_cannot_write_is_a_temporary_failure(parts, no_space):
    store, spool = parts
    made = []

    def broken(msg):
        new = spool.open()
        made.append(new.path)
        raise StorageError(errno.ENOSPC if no_space else errno.EIO, "cannot write")

    observer = Recorder()
    pipeline = Pipeline(Router(MaildirDestination(store)), [Stage("w", broken)], observer=observer)
    verdict = pipeline.process(message(spool, ALICE))
    assert not verdict.delivered and verdict.temporary and verdict.no_space is no_space
    assert verdict.code is None and verdict.stage == "w" and verdict.group is None  # "storage"
    assert observer.seen == [("w", "tempfail", "storage")]
    assert stored(store) == {}
    assert [p for p in spool.root.iterdir() if str(p) not in made] == []


def test_a_rewrite_is_flushed_before_the_next_stage_reads_it(parts):
    store, spool = parts

    def rewrite(msg):
        new = spool.open()
        new.write(b"Subject: new\n\nbody\n")  # gathered, not yet written
        return Replace(new)

    class Reader:
        name = "reader"

        def process(self, msg):
            self.data = Path(msg.spool.path).read_bytes()  # no flush of its own
            return Accept()

    reader = Reader()
    pipeline = Pipeline(Router(MaildirDestination(store)), [Stage("w", rewrite), reader])
    assert pipeline.process(message(spool, ALICE)).delivered
    assert reader.data == b"Subject: new\n\nbody\n"


# ------------------------------------------- the port reports come in by


def test_deliver_routes_alone_no_stage_and_no_after_delivery(parts):
    """`pipeline.deliver`, the port the queue's reports are injected by: the
    router's destinations, all or nothing, and nothing else; a stage that
    refuses everything and the after-delivery hook are not reached, so a
    report never comes back through the pipeline (issue 20's one-way path)."""
    from geosmtp.pipeline import deliver

    store, spool = parts
    hooked = []
    pipeline = Pipeline(
        Router(MaildirDestination(store)),
        [type("Refuse", (), {"name": "refuse", "process": lambda self, m: Reject("no")})()],
        after_delivery=hooked.append,
    )
    report = message(spool, ALICE)
    verdict = deliver(pipeline.router, report)
    assert verdict.delivered and verdict.destinations == ("maildir",)
    assert stored(store) == {"alice": [b"Subject: s\n\nbody\n"]}
    assert hooked == [] and report.verdicts == []
    assert os.path.exists(report.spool.path)  # the caller (the reporter) removes it
    report.spool.remove()
    unroutable = message(spool, REMOTE)
    verdict = deliver(pipeline.router, unroutable)
    assert not verdict.delivered and verdict.temporary
    unroutable.spool.remove()


# ------------------------------------------------ one verdict per recipient (LMTP)


class FailingBox(MaildirDestination):
    """The Maildir destination, with one mailbox that cannot take a message."""

    def __init__(self, store: MaildirStore, box: str) -> None:
        super().__init__(store)
        self.box = box
        self.calls: list[tuple[str, ...]] = []

    def deliver(self, message, recipients) -> Delivery:
        self.calls.append(tuple(r.mailbox.address for r in recipients))
        if any(r.box == self.box for r in recipients):
            raise StorageError(errno.EIO, os.strerror(errno.EIO))
        return super().deliver(message, recipients)


def test_process_each_fails_a_failing_mailbox_alone(parts):
    store, spool = parts
    carol = Recipient(Mailbox("carol", "example.test"), "carol")
    delivered = []
    destination = FailingBox(store, "bob")
    pipeline = Pipeline(Router(destination), after_delivery=delivered.append)
    verdicts = pipeline.process_each(message(spool, carol, BOB, ALICE))
    assert [v.delivered for v in verdicts] == [True, False, True]
    assert verdicts[1].temporary and "Input/output error" in verdicts[1].reason
    body = [b"Subject: s\n\nbody\n"]
    assert stored(store) == {"alice": body, "carol": body}
    assert list(spool.root.iterdir()) == []
    # One delivery per mailbox; the success report sees the delivered ones only.
    assert destination.calls == [
        ("carol@example.test",),
        ("bob@example.test",),
        ("alice@example.test",),
    ]
    assert [r.box for r in delivered[0].envelope.recipients] == ["carol", "alice"]


class OneEntryQueue(MaildirDestination):
    """A destination that, like the outbound queue, files a message under its
    queue id once: a second delivery of that id is a fault."""

    def __init__(self, store: MaildirStore) -> None:
        super().__init__(store)
        self.calls: list[tuple[str, ...]] = []

    def deliver(self, message, recipients) -> Delivery:
        if self.calls:
            raise StorageError(errno.EEXIST, f"queue entry {message.queue_id} exists")
        self.calls.append(tuple(r.mailbox.address for r in recipients))
        return super().deliver(message, recipients)


def test_process_each_through_the_queue_makes_one_entry_for_every_recipient(parts):
    """delivery.lmtp: the queue is the local destination too (the router's
    local is its remote); LMTP's recipients go into one queue entry, each
    with its own (equal) verdict."""
    store, spool = parts
    queue = OneEntryQueue(store)
    delivered = []
    pipeline = Pipeline(Router(queue, queue), after_delivery=delivered.append)
    verdicts = pipeline.process_each(message(spool, ALICE, BOB))
    assert [v.delivered for v in verdicts] == [True, True]
    assert queue.calls == [("alice@example.test", "bob@example.test")]
    assert len(delivered) == 1 and len(delivered[0].envelope.recipients) == 2
    assert list(spool.root.iterdir()) == []


def test_process_each_gives_the_recipients_of_one_mailbox_one_copy(parts):
    store, spool = parts
    other = Recipient(Mailbox("Alice", "example.test"), "alice")  # the same mailbox
    verdicts = Pipeline(Router(MaildirDestination(store))).process_each(
        message(spool, ALICE, BOB, other)
    )
    assert [v.delivered for v in verdicts] == [True, True, True]
    assert stored(store) == {"alice": [b"Subject: s\n\nbody\n"], "bob": [b"Subject: s\n\nbody\n"]}


def test_process_each_gives_a_stage_refusal_to_every_recipient(parts):
    store, spool = parts
    refusal = Reject("virus", text="Message refused: virus found")
    pipeline = Pipeline(Router(MaildirDestination(store)), [Stage("filter", refusal)])
    verdicts = pipeline.process_each(message(spool, ALICE, BOB))
    assert len(verdicts) == 2 and verdicts[0] is verdicts[1]
    assert not verdicts[0].delivered and verdicts[0].code == 554
    assert stored(store) == {} and list(spool.root.iterdir()) == []


class Killed(BaseException):
    """The greenlet killed at a stop (gevent's GreenletExit is a BaseException too)."""


class KilledAtBox(MaildirDestination):
    def __init__(self, store: MaildirStore, box: str) -> None:
        super().__init__(store)
        self.box = box

    def deliver(self, message, recipients) -> Delivery:
        if any(r.box == self.box for r in recipients):
            raise Killed
        return super().deliver(message, recipients)


def test_process_each_stopped_half_way_keeps_no_copy(parts):
    store, spool = parts
    pipeline = Pipeline(Router(KilledAtBox(store, "bob")))
    with pytest.raises(Killed):
        pipeline.process_each(message(spool, ALICE, BOB))
    # alice's delivery was made before the kill, but no reply went out: the
    # client sends the message again, so alice must not keep this copy.
    assert list(store.root.glob("*/new/*")) == []
    assert list(spool.root.iterdir()) == []


# ------------------------------------------------------------------ LMTP


def test_with_lmtp_the_queue_takes_every_recipient_in_one_entry(parts, tmp_path):
    """`delivery.lmtp`: local recipients are queued with the remote ones, in
    one entry (one queue id: never two records for one message), each local
    one marked with the mailbox the LMTP server is to be given; the runner
    gets the entry only once the whole message is accepted."""
    from geosmtp.queue.destination import QueueDestination
    from geosmtp.queue.store import QueueStore

    _, spool = parts
    submitted = []

    class Runner:
        def submit(self, record):  # type: ignore[no-untyped-def]
            submitted.append(record)

    store = QueueStore(tmp_path / "queue")
    queue = QueueDestination(store, Runner(), lmtp_domain="mx.example.test")  # type: ignore[arg-type]
    postmaster = Recipient(Mailbox("postmaster", ""), "alice")
    shouting = Recipient(Mailbox("BOB", "example.test"), "bob")
    verdict = Pipeline(Router(local=queue, remote=queue)).process(
        message(spool, ALICE, shouting, REMOTE, postmaster)
    )
    assert verdict.delivered and verdict.destinations == ("queue",)
    (record,) = submitted
    assert [(r.address, r.domain, r.lmtp) for r in record.recipients] == [
        ("alice@example.test", "example.test", "alice@example.test"),
        ("BOB@example.test", "example.test", "bob@example.test"),
        ("carol@elsewhere.example", "elsewhere.example", None),
        ("postmaster@mx.example.test", "mx.example.test", "alice@mx.example.test"),
    ]
    assert [r.id for r in store.load().records] == ["Q1"]
    with store.open_message("Q1") as f:
        assert f.read() == b"Subject: s\n\nbody\n"
