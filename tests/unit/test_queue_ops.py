"""QueueRunner's operations (list, show, hold, release, delete) on a store that records calls."""

from __future__ import annotations

import pytest

from geosmtp.queue.runner import QueueBusy, QueueRunner, RunnerSettings
from geosmtp.queue.schedule import RetrySchedule
from geosmtp.queue.store import DELIVERED, QueuedRecipient, QueueRecord

NOW = 1_800_000_000.0


class FakeStore:
    def __init__(self) -> None:
        self.saved: list[tuple[str, bool]] = []  # (id, held) as written
        self.removed: list[str] = []

    def save(self, record: QueueRecord) -> None:
        self.saved.append((record.id, record.held))

    def remove(self, queue_id: str) -> None:
        self.removed.append(queue_id)


def record(queue_id: str, arrival: float, *addresses: str) -> QueueRecord:
    return QueueRecord(
        id=queue_id,
        sender="alice@test.example",
        arrival=arrival,
        recipients=[QueuedRecipient(a, a.split("@")[1], next_attempt=NOW + 60) for a in addresses],
        size=123,
        envid="ENV1",
        client="127.0.0.1",
        auth_user="alice",
    )


@pytest.fixture
def runner() -> QueueRunner:
    settings = RunnerSettings(hostname="mx.test.example", schedule=RetrySchedule([60], 3600))
    r = QueueRunner(FakeStore(), settings, None, lambda *a: None, clock=lambda: NOW)  # type: ignore[arg-type]
    r.submit(record("B", NOW - 5, "carol@remote.test"))
    r.submit(record("A", NOW - 90, "bob@remote.test", "dave@other.test"))
    return r


def test_entries_oldest_first(runner):
    entries = runner.entries()
    assert [e["id"] for e in entries] == ["A", "B"]
    a = entries[0]
    assert (a["age_seconds"], a["size"], a["held"], a["in_flight"]) == (90.0, 123, False, False)
    assert a["arrival"] == "2027-01-15T07:58:30Z"
    assert a["recipients"][0] == {
        "address": "bob@remote.test",
        "state": "pending",
        "attempts": 0,
        "next_attempt": "2027-01-15T08:01:00Z",
        "status": None,
        "last_error": None,
    }
    assert "envid" not in a


def test_entry_has_the_whole_record(runner):
    runner.records["A"].recipients[1].state = DELIVERED
    e = runner.entry("A")
    assert (e["envid"], e["client"], e["auth_user"], e["ret"]) == (
        "ENV1",
        "127.0.0.1",
        "alice",
        None,
    )
    assert e["recipients"][1]["state"] == "delivered"
    assert e["recipients"][1]["next_attempt"] is None  # only pending ones have one
    assert e["recipients"][0]["orcpt"] is None and e["recipients"][0]["delay_warned"] is False
    assert runner.entry("nope") is None


def test_unknown_ids_are_key_errors(runner):
    for op in (runner.hold, runner.release, runner.delete):
        with pytest.raises(KeyError):
            op("nope")


def test_hold_and_release_are_saved(runner):
    store = runner.store
    assert runner.hold("A") is True
    assert runner.records["A"].held and store.saved == [("A", True)]
    assert runner.hold("A") is False  # nothing to do: not saved again
    assert runner.held_count() == 1
    assert runner.entries()[0]["recipients"][0]["next_attempt"] is None
    runner._heap.clear()
    assert runner.release("A") is True
    assert store.saved == [("A", True), ("A", False)]
    assert not runner.records["A"].held
    assert [d.queue_id for d in runner._heap] == ["A"]  # scheduled now
    assert runner.records["A"].recipients[0].next_attempt == NOW
    assert runner.release("A") is False


def test_delete(runner):
    deleted = runner.delete("B")
    assert deleted.id == "B" and "B" not in runner.records
    assert runner.store.removed == ["B"]
    assert runner.pending_count() == 1


def test_delete_refused_while_an_attempt_is_in_flight(runner):
    runner._busy.add("A")
    with pytest.raises(QueueBusy, match="queue A: a delivery attempt is in flight"):
        runner.delete("A")
    assert "A" in runner.records and runner.store.removed == []


def test_hold_in_flight_is_saved_when_the_attempt_ends(runner):
    runner._busy.add("A")
    runner.hold("A")
    assert runner.records["A"].held and runner.store.saved == []  # not while it runs
    runner._attempt_ended("A")  # what the attempt's end does
    assert runner.store.saved == [("A", True)]
