"""A bounce owed when the server died is made after the restart (issue 19).

The runner saves a recipient's outcome as soon as its domain's transaction
ends, and makes the reports at the end of the attempt; a `kill -9` between
the two is too narrow to hit from outside, so the queue entry is written as
it leaves it (by the queue's own `QueueStore`: b@remote.test `failed`, its
report due; d@other.test pending, its next attempt an hour away) before the
server starts, and the real server must bounce it at once, through the
pipeline into the sender's Maildir, and save that it did.
"""

from __future__ import annotations

import email
import json
import time
from pathlib import Path

from geosmtp.queue.store import FAILED, QueuedRecipient, QueueRecord, QueueStore
from tests.conftest import start_server, wait_until

MESSAGE = b"From: alice@test.example\nSubject: owed\nMessage-ID: <owed@test.example>\n\nhi\n"
QUEUE_ID = "OWED0001"


def crashed_queue(mail_dir: Path) -> Path:
    """The queue entry as the crash leaves it; its record's path."""
    now = time.time()
    failed = QueuedRecipient(
        "b@remote.test",
        "remote.test",
        state=FAILED,
        attempts=1,
        next_attempt=now,
        status="5.1.1",
        last_error="smtp; 550 5.1.1 <b@remote.test>: no such user",
        remote_mta="dns; mx.remote.test",
        report_due=True,
    )
    later = QueuedRecipient("d@other.test", "other.test", attempts=1, next_attempt=now + 3600)
    record = QueueRecord(QUEUE_ID, "alice@test.example", now - 5, [failed, later], len(MESSAGE))
    store = QueueStore(mail_dir / ".queue")
    Path(store.message_path(QUEUE_ID)).write_bytes(b"Return-Path: <alice@test.example>\n" + MESSAGE)
    store.save(record)
    return Path(store.records, f"{QUEUE_ID}.json")


def test_a_bounce_owed_at_a_crash_is_made_at_the_next_start(tmp_path: Path):
    root = tmp_path / "srv"
    path = crashed_queue(root / "mail_dir")
    server = start_server(root)
    try:
        (bounce,) = wait_until(lambda: server.messages("alice"), what="the bounce")
        report = email.message_from_bytes(bounce.read_bytes())
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1].as_string()
        assert "Final-Recipient: rfc822; b@remote.test" in status
        assert "Action: failed" in status and "Status: 5.1.1" in status
        assert "d@other.test" not in status  # still pending: nothing to report
        # Made and saved as made (so the next start makes it no more); the
        # other recipient still waits for its own attempt.
        wait_until(
            lambda: not json.loads(path.read_bytes())["recipients"][0]["report_due"],
            what="the report to be saved as made",
        )
        later = json.loads(path.read_bytes())["recipients"][1]
        assert (later["state"], later["attempts"]) == ("pending", 1)
        assert len(server.messages("alice")) == 1
    finally:
        server.process.kill()
        server.process.wait(timeout=10)
