"""Every field of a queue record is checked when it is read back: one that does
not fit sends the entry (record and message) to quarantine/, and the rest of
the queue loads. Records are written by the store itself, then one field is
spoiled on disk, as a disk fault or a hand edit would."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from geosmtp.queue.store import (
    ADDED_RECIPIENT_FIELDS,
    DELIVERED,
    FAILED,
    MAX_NAME,
    MAX_TEXT,
    RECIPIENT_CHECKS,
    RECORD_CHECKS,
    BadRecord,
    QueuedRecipient,
    QueueRecord,
    QueueStore,
    read_record,
)
from geosmtp.smtp.parser import SyntaxProblem, parse_mail_from
from geosmtp.storage import Spool
from geosmtp.storage.spool import UniqueNames

MESSAGE = b"Subject: x\n\nhi\n"


def full_record(queue_id: str) -> QueueRecord:
    """A record with every field set (none left at its default)."""
    return QueueRecord(
        id=queue_id,
        sender="alice@example.test",
        arrival=1_700_000_000.25,
        recipients=[
            QueuedRecipient(
                "bob@remote.test",
                "remote.test",
                notify=["DELAY", "FAILURE"],
                orcpt="rfc822;bob@remote.test",
                state=DELIVERED,
                attempts=2,
                next_attempt=1_700_000_300.0,
                status="2.0.0",
                last_error=None,
                remote_mta="dns; mx.remote.test",
                delay_warned=True,
                report_due=True,
            ),
            QueuedRecipient(
                '"odd@local"@[127.0.0.1]',
                "[127.0.0.1]",
                notify=["NEVER"],
                attempts=1,
                next_attempt=1_700_000_060,
                status="4.4.1",
                last_error="smtp; 451 4.4.1 later",
                lmtp="odd@[127.0.0.1]",
            ),
        ],
        size=len(MESSAGE),
        ret="HDRS",
        envid="QQ+2B314",
        smtputf8=True,
        body="8BITMIME",
        client="[192.0.2.1]",
        auth_user="alice",
        held=True,
    )


@pytest.fixture
def store(tmp_path: Path) -> QueueStore:
    store = QueueStore(tmp_path / ".queue")
    spool = Spool(tmp_path / ".spool", UniqueNames("host"))
    for queue_id in ("GOOD", "BAD"):
        f = spool.open()
        f.write(MESSAGE + queue_id.encode())
        store.add(f, full_record(queue_id))
        f.remove()
    return store


def spoil(store: QueueStore, change) -> None:  # type: ignore[no-untyped-def]
    """Rewrite BAD's record on disk with `change(raw)` applied to its JSON."""
    path = Path(store.records, "BAD.json")
    raw = json.loads(path.read_bytes())
    change(raw)
    path.write_text(json.dumps(raw))


def setter(path: tuple, value: Any):  # type: ignore[no-untyped-def]
    def change(raw: dict) -> None:
        *parents, last = path
        for key in parents:
            raw = raw[key]
        raw[last] = value

    return change


def deleter(path: tuple):  # type: ignore[no-untyped-def]
    def change(raw: dict) -> None:
        *parents, last = path
        for key in parents:
            raw = raw[key]
        del raw[last]

    return change


NAN, INF = float("nan"), float("inf")
#: A domain of 194 characters (labels of 60): with a 64-character local part, an
#: address the parser takes part by part, but longer than a path (256).
LONG_DOMAIN = ("a" * 60 + ".") * 3 + "remote.test"
LONGEST_LOCAL = "b" * 64
#: The longest address the SMTP core takes: 254 characters, 256 with "<>".
LONGEST_ADDRESS = f"{LONGEST_LOCAL}@{'a' * 62}.{'a' * 60}.{'a' * 60}.test"

#: (field as BadRecord names it, its path in the JSON, bad values): wrong types, wrong values.
RECORD_CASES = {
    "id": [7, None, "", "../GOOD", "B A D", "GOOD"],
    "sender": [
        5,
        None,
        ["alice@example.test"],
        "alice@example.test\r\nRCPT TO:<x@y.test>",
        # Not addresses: the bounce parsed them and failed (issue 18).
        "../../../out/trav",
        "bob/../alice",
        "../../x@example.test",
        "bob/..@",
        "@example.test",
        "alice@exa mple.test",
        "alice@example..test",
        "alice@example.test\u2028",
        "\ud800@example.test",  # a lone surrogate: JSON's "\ud800", never UTF-8
        f"{LONGEST_LOCAL}@{LONG_DOMAIN}",  # longer than a path
        "x" * 10_000_000,  # 10 MB: loaded whole, then answered by the API
    ],
    "arrival": ["soon", None, True, NAN, INF, -1.0, 1e300, [1]],
    "size": ["15", -1, 1.5, True, None, 2**64],
    "ret": ["ALL", "hdrs", 1, True],
    "envid": [5, "two words", "x" * 101, "caf\u00e9"],
    "smtputf8": ["yes", 1, None],
    "body": ["8BIT", 8, ""],
    "client": [None, 5, ["[192.0.2.1]"], "x" * (MAX_NAME + 1), "[\udc80]"],
    "auth_user": [5, ["alice"], True, "a" * (MAX_NAME + 1), "al\ud800ice"],
    "held": ["no", 0, None],
    "version": [2, "1", None, True, 1.0],
}
RECIPIENT_CASES = {
    "address": [
        None,
        5,
        "",
        "bob",
        "bob@",
        "bob@remote.test\r\nDATA",
        "../../out@remote.test",
        "bob/..@remote.test",
        "bo b@remote.test",
        "b\udfff@remote.test",
        "b" * 65 + "@remote.test",  # a local part of at most 64 octets
        f"{LONGEST_LOCAL}@{LONG_DOMAIN}",  # longer than a path
    ],
    "domain": [None, 5, "", "other.test", "remote.test\n", "\ud800.test"],
    "notify": ["FAILURE", [], ["SOMETIMES"], ["NEVER", "FAILURE"], ["DELAY", "DELAY"], [1]],
    "orcpt": [5, "rfc822", ";bob@remote.test", "rfc822;bob @remote.test", "x" * 501],
    "state": ["sent", "PENDING", "", None, 1, True],
    "attempts": ["2", -1, 2.5, None, False, 10**30],
    "next_attempt": ["soon", None, False, INF, NAN, -5, 1e300, {}],
    "status": ["4.4", 4, "9.9.9", "4.4.1 extra", ""],
    "last_error": [5, ["x"], True, "x" * (MAX_TEXT + 1), "x" * 10_000_000, "smtp; \ud800"],
    "remote_mta": [5, ["mx"], False, "dns; " + "x" * MAX_TEXT, "dns; \udfff"],
    "delay_warned": ["false", None, 0],
    "report_due": ["true", None, 1, []],
    "lmtp": [5, "", "bob", "bob@remote.test\r\nDATA", ["bob@remote.test"]],
}
CASES = [
    (field, ("recipients", 0, field) if field in RECIPIENT_CASES else (field,), value)
    for cases in (RECORD_CASES, RECIPIENT_CASES)
    for field, values in cases.items()
    for value in values
]


def named(field: str) -> str:
    return f"recipients[0].{field}" if field in RECIPIENT_CASES else field


def assert_quarantined(store: QueueStore, field: str) -> None:
    """BAD went to quarantine/ whole (record and message, unchanged in content),
    naming `field`; GOOD loaded; nothing deleted."""
    bad_record = Path(store.records, "BAD.json").read_bytes()
    loaded = store.load()
    assert [r.id for r in loaded.records] == ["GOOD"]
    assert loaded.records[0] == full_record("GOOD")
    assert sorted(os.listdir(store.quarantine_dir)) == ["BAD", "BAD.json"]
    assert Path(store.quarantine_dir, "BAD.json").read_bytes() == bad_record
    assert Path(store.quarantine_dir, "BAD").read_bytes() == MESSAGE + b"BAD"
    assert os.listdir(store.messages) == ["GOOD"] and os.listdir(store.records) == ["GOOD.json"]
    assert loaded.orphans == 0
    (bad,) = loaded.quarantined
    assert bad.queue_id == "BAD" and bad.error is None
    assert bad.problem.startswith(f"{field}: "), bad.problem
    assert bad.moved == ["quarantine/BAD", "quarantine/BAD.json"]


def test_a_record_with_every_field_set_loads_back(store: QueueStore):
    loaded = store.load()
    assert loaded.records == [full_record("BAD"), full_record("GOOD")]
    assert loaded.quarantined == []


@pytest.mark.parametrize(
    "sender",
    [
        "",  # the null sender <>
        "bob/x@example.test",  # "/" is atext (RFC 5322)
        '"odd ../ name"@example.test',
        "\u00e5lice@ex\u00e4mple.test",  # SMTPUTF8
        "alice@[IPv6:2001:db8::1]",
        LONGEST_ADDRESS,
    ],
)
def test_what_the_smtp_core_takes_as_a_sender_loads(tmp_path: Path, sender: str):
    record = dataclasses.replace(full_record("X"), sender=sender)
    assert read_record(record.to_json()) == record


def test_the_longest_fields_load(tmp_path: Path):
    record = full_record("X")
    record.client = "c" * MAX_NAME
    record.auth_user = "a" * MAX_NAME
    record.recipients[1].last_error = "e" * MAX_TEXT
    record.recipients[1].remote_mta = "m" * MAX_TEXT
    address = LONGEST_ADDRESS.replace("@a", "@\u00e4")  # SMTPUTF8: 254 characters, 255 octets
    record.recipients[0].address, record.recipients[0].domain = address, address.split("@")[1]
    record.sender = address
    assert read_record(record.to_json()) == record


def test_the_longest_address_is_what_the_smtp_core_takes():
    """The bound on addresses is no smaller than the core's (a path of 256)."""
    assert len(LONGEST_ADDRESS) == 254
    assert str(parse_mail_from(f"FROM:<{LONGEST_ADDRESS}>".encode())[0]) == LONGEST_ADDRESS
    with pytest.raises(SyntaxProblem, match="path too long"):
        parse_mail_from(f"FROM:<b{LONGEST_ADDRESS}>".encode())


def test_every_field_of_a_record_is_checked_and_has_cases():
    """A new field needs its check (else every record with it is quarantined)
    and its cases here."""
    record_fields = {f.name for f in dataclasses.fields(QueueRecord)}
    recipient_fields = {f.name for f in dataclasses.fields(QueuedRecipient)}
    assert set(RECORD_CHECKS) | {"version", "recipients"} == record_fields
    assert set(RECIPIENT_CHECKS) == recipient_fields
    assert set(RECORD_CASES) | {"recipients"} == record_fields
    assert set(RECIPIENT_CASES) == recipient_fields


@pytest.mark.parametrize(("field", "path", "value"), CASES, ids=repr)
def test_a_field_of_the_wrong_type_or_value_is_quarantined(store, field, path, value):
    spoil(store, setter(path, value))
    assert_quarantined(store, named(field))


@pytest.mark.parametrize(
    "field", [*RECORD_CASES, *(f for f in RECIPIENT_CASES if f not in ADDED_RECIPIENT_FIELDS)]
)
def test_a_missing_field_is_quarantined(store, field):
    spoil(store, deleter(("recipients", 0, field) if field in RECIPIENT_CASES else (field,)))
    assert_quarantined(store, named(field))


def test_a_record_written_before_report_due_loads_as_nothing_owed(store):
    """A record of the code before `report_due` (the field absent): its failed
    and delivered recipients load as reported, as that code treated them (a
    restart never reported them), so an upgrade bounces nothing twice."""
    assert ADDED_RECIPIENT_FIELDS["report_due"] is False

    def older(raw: dict) -> None:
        raw["recipients"][1]["state"] = FAILED
        for rcpt in raw["recipients"]:
            del rcpt["report_due"]

    spoil(store, older)
    loaded = store.load()
    assert loaded.quarantined == []
    bad = next(r for r in loaded.records if r.id == "BAD")
    assert [(r.state, r.report_due) for r in bad.recipients] == [
        (DELIVERED, False),
        (FAILED, False),
    ]
    assert bad.unreported == [] and bad.done


def test_report_due_on_a_finished_recipient_keeps_the_entry(store):
    """A finished recipient with its report due is work left: the entry is
    not done (the runner makes the report before it removes the entry)."""
    spoil(store, setter(("recipients", 1, "state"), FAILED))
    bad = next(r for r in store.load().records if r.id == "BAD")
    assert [r.address for r in bad.unreported] == ["bob@remote.test"]
    assert not bad.pending and not bad.done


@pytest.mark.parametrize(
    ("path", "field"),
    [(("priority",), "priority"), (("recipients", 1, "priority"), "recipients[1].priority")],
)
def test_an_unknown_field_is_quarantined(store, path, field):
    spoil(store, setter(path, "high"))
    assert_quarantined(store, field)


def test_a_record_without_recipients_is_quarantined(store):
    spoil(store, deleter(("recipients",)))
    assert_quarantined(store, "recipients")


@pytest.mark.parametrize("value", [[], {}, "bob@remote.test", [5], ["bob@remote.test"], None])
def test_recipients_not_a_list_of_recipients_is_quarantined(store, value):
    spoil(store, setter(("recipients",), value))
    field = "recipients[0]" if isinstance(value, list) and value else "recipients"
    assert_quarantined(store, field)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"id": "BAD", "recip',  # cut short (a full disk, a crash of an editor)
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion limit
        b"[]",
        b"null",
        b'"BAD"',
    ],
    ids=["empty", "truncated", "not-utf8", "deep", "list", "null", "string"],
)
def test_a_record_that_is_not_a_json_object_is_quarantined(store, data):
    Path(store.records, "BAD.json").write_bytes(data)
    assert_quarantined(store, "json")


def test_a_record_without_its_message_is_quarantined_and_the_message_never_removed(store):
    os.unlink(store.message_path("BAD"))
    loaded = store.load()
    assert [r.id for r in loaded.records] == ["GOOD"]
    assert sorted(os.listdir(store.quarantine_dir)) == ["BAD.json"]
    (bad,) = loaded.quarantined
    assert bad.problem.startswith("message: ") and "missing" in bad.problem


def test_a_record_that_is_a_link_or_a_fifo_is_quarantined_without_waiting(store):
    good = Path(store.records, "GOOD.json")
    bad = Path(store.records, "BAD.json")
    bad.unlink()
    bad.symlink_to(good)  # a record read through a link could be any file
    (link,) = store.load().quarantined
    assert link.problem.startswith("file: cannot be read")
    assert Path(store.quarantine_dir, "BAD.json").is_symlink()  # moved, not followed
    os.rename(Path(store.quarantine_dir, "BAD"), store.message_path("BAD"))
    os.mkfifo(bad)  # open() would wait for a writer for ever
    (fifo,) = store.load().quarantined
    assert fifo.problem == "file: not a regular file"
    assert good.exists() and store.load().records == [full_record("GOOD")]


def test_a_second_quarantine_of_an_id_overwrites_nothing(store, tmp_path):
    Path(store.quarantine_dir, "BAD").write_bytes(b"an earlier one")
    Path(store.quarantine_dir, "BAD.json").write_bytes(b"{}")
    Path(store.quarantine_dir, "BAD.1.json").write_bytes(b"{}")
    spoil(store, setter(("arrival",), "yesterday"))
    (bad,) = store.load().quarantined
    assert bad.moved == ["quarantine/BAD.2", "quarantine/BAD.2.json"]
    assert Path(store.quarantine_dir, "BAD").read_bytes() == b"an earlier one"
    assert Path(store.quarantine_dir, "BAD.2").read_bytes() == MESSAGE + b"BAD"
    assert store.quarantined_count() == 3


def test_an_entry_that_cannot_be_moved_stays_in_place_with_its_message(store, monkeypatch):
    spoil(store, setter(("recipients", 0, "state"), "sent"))

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    loaded = store.load()
    monkeypatch.undo()
    (bad,) = loaded.quarantined
    assert bad.error is not None and bad.moved == []
    assert [r.id for r in loaded.records] == ["GOOD"]
    # Not loaded, not deleted: the message is no orphan (its record is there).
    assert sorted(os.listdir(store.messages)) == ["BAD", "GOOD"]
    assert loaded.orphans == 0


def test_the_quarantine_is_made_durable(store, monkeypatch):
    spoil(store, setter(("size",), "big"))
    synced: list[str] = []
    monkeypatch.setattr("geosmtp.queue.store.fsync_path", lambda p, **kw: synced.append(p))
    store.load()
    assert {store.quarantine_dir, store.messages, store.records} <= set(synced)


def test_a_record_is_written_as_every_field_of_its_dataclasses():
    """`to_json` (built field by field, for speed) writes what `dataclasses.asdict`
    gives: every field of the record and of each recipient, nothing else."""
    rec = full_record("X")
    assert json.loads(rec.to_json()) == dataclasses.asdict(rec)
    assert rec.to_json() == json.dumps(dataclasses.asdict(rec), sort_keys=True).encode()


def test_bad_record_names_the_field_and_shows_the_value_escaped():
    raw = json.loads(full_record("X").to_json())
    raw["recipients"][1]["next_attempt"] = "soon\u2028forged"
    with pytest.raises(BadRecord) as caught:
        read_record(json.dumps(raw).encode())
    assert caught.value.field == "recipients[1].next_attempt"
    assert str(caught.value) == ("recipients[1].next_attempt: not a number ('soon\\u2028forged')")
    assert str(caught.value).isprintable()


def test_the_runner_starts_reports_each_quarantined_entry_and_delivers_the_rest(store):
    """What stopped the start (a `next_attempt` the schedule cannot compare)
    is one warning and a count; the good entry is tracked."""
    from geosmtp.metrics import Metrics
    from geosmtp.queue.runner import QueueRunner, RunnerSettings
    from geosmtp.queue.schedule import RetrySchedule

    spoil(store, setter(("recipients", 1, "next_attempt"), "soon"))
    metrics = Metrics()
    runner = QueueRunner(
        store,
        RunnerSettings("mx.example.test", RetrySchedule([60], 3600)),
        resolver=None,  # type: ignore[arg-type]
        report=lambda *args: None,
        metrics=metrics,
        clock=lambda: 1_000.0,  # before every next_attempt: nothing is tried
    )
    lines: list[str] = []
    handler = logger.add(lines.append, level="INFO", format="{level} {message}")
    try:
        runner.start()
    finally:
        logger.remove(handler)
        runner.stop(timeout=0)
    assert list(runner.records) == ["GOOD"]
    assert [line for line in lines if line.startswith("WARNING")] == [
        "WARNING queue BAD: records/BAD.json cannot be used (recipients[1].next_attempt: "
        "not a number ('soon')): moved to quarantine/BAD, quarantine/BAD.json\n"
    ]
    assert metrics.registry.get_sample_value("geosmtp_queue_quarantined_total") == 1.0
    assert store.quarantined_count() == 1


def test_a_record_written_before_lmtp_loads_as_remote_recipients(store):
    """A record of the code before `delivery.lmtp` (no `lmtp` field): every
    recipient loads as a remote one, relayed by SMTP as that code would."""
    assert ADDED_RECIPIENT_FIELDS["lmtp"] is None

    def older(raw: dict) -> None:
        for rcpt in raw["recipients"]:
            del rcpt["lmtp"]

    spoil(store, older)
    loaded = store.load()
    assert loaded.quarantined == []
    bad = next(r for r in loaded.records if r.id == "BAD")
    assert [r.lmtp for r in bad.recipients] == [None, None]
