"""Delivery reports built in the queue (geosmtp.queue.reports): the report
itself, its DKIM signature, and what goes through the one port. No sockets:
the port is a function that keeps what it is given."""

from __future__ import annotations

import email
import email.policy
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from geosmtp.mail import Envelope, Mailbox, Recipient
from geosmtp.mailauth.dkim_sign import Signer, SigningKey, public_key_record
from geosmtp.mailauth.stages import sign_file
from geosmtp.queue.reports import Reporter, ReportMessage, ReportNotStored, reporting_domains
from geosmtp.queue.store import QueuedRecipient, QueueRecord, QueueStore
from geosmtp.storage import Spool
from geosmtp.storage.spool import UniqueNames

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # fast; dkimpy's minimum
HOSTNAME = "mx.example.test"
ORIGINAL = b"Return-Path: <alice@example.test>\nFrom: alice@example.test\nSubject: s\n\nbody\n"


@dataclass
class Verdict:
    delivered: bool
    temporary: bool = False
    reason: str = ""


class Port:
    """The port: keeps each report's bytes (read before the reporter removes
    the spool file) and answers `verdict`."""

    def __init__(self, verdict: Verdict | None = None) -> None:
        self.verdict = verdict or Verdict(True)
        self.got: list[tuple[ReportMessage, bytes]] = []

    def __call__(self, report: ReportMessage) -> Verdict:
        self.got.append((report, Path(report.spool.path).read_bytes()))
        return self.verdict


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / ".spool", UniqueNames("host"))


@pytest.fixture
def queue(tmp_path: Path, spool: Spool) -> tuple[QueueStore, QueueRecord]:
    """A queued message from alice@example.test to b@remote.test that failed."""
    store = QueueStore(tmp_path / ".queue")
    f = spool.open()
    f.write(ORIGINAL)
    rcpt = QueuedRecipient("b@remote.test", "remote.test", status="5.1.1")
    rcpt.last_error = "smtp; 550 5.1.1 no such user"
    record = QueueRecord("Q1", "alice@example.test", 1000.0, [rcpt])
    store.add(f, record).commit()
    f.remove()
    return store, record


def reporter(spool: Spool, store: QueueStore | None, port: Port, signer=None) -> Reporter:  # type: ignore[no-untyped-def]
    return Reporter(
        spool,
        HOSTNAME,
        port,
        open_queued=store.open_message if store else lambda queue_id: open(os.devnull, "rb"),
        sign=None if signer is None else partial(sign_file, signer, spool),
        max_full_size=1 << 20,
        max_lifetime=5 * 86400,
        clock=lambda: 1_700_000_000.0,
    )


def spool_files(spool: Spool) -> list[str]:
    return sorted(os.listdir(spool.root))


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def on_the_wire(data: bytes) -> bytes:
    """As the relay sends it: without the first line (our Return-Path), CRLF."""
    assert data.startswith(b"Return-Path: <>\n")
    return data.split(b"\n", 1)[1].replace(b"\n", b"\r\n")


def test_a_bounce_is_built_and_handed_to_the_port_once(spool, queue):
    store, record = queue
    port = Port()
    reporter(spool, store, port).queued(record, record.recipients, "failed")
    ((report, data),) = port.got
    assert report.to == "alice@example.test" and report.size == len(data)
    head, _, _ = data.partition(b"\n\n")
    assert head.startswith(b"Return-Path: <>\nReceived: by mx.example.test (geosmtp) id ")
    assert head.count(b"Return-Path:") == 1
    msg = parsed(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.test"
    assert msg.get_content_type() == "multipart/report"
    assert b"Action: failed" in data and b"Status: 5.1.1" in data
    assert b"Final-Recipient: rfc822; b@remote.test" in data
    assert b"Subject: s" in data  # the original's header section comes back
    assert "DKIM-Signature" not in msg  # no signer: not signed
    assert spool_files(spool) == []  # the reporter's spool file is gone


def test_a_success_on_a_local_recipient_is_a_delivered_report(spool, tmp_path):
    original = spool.open()
    original.write(ORIGINAL)
    original.flush()
    local = Recipient(Mailbox("bob", "example.test"), "bob", notify=frozenset({"SUCCESS"}))
    other = Recipient(Mailbox("carol", "example.test"), "carol")  # asked for nothing
    env = Envelope(
        "client", True, Mailbox("alice", "example.test"), {"ENVID": "e1"}, (local, other)
    )

    @dataclass
    class Delivered:
        envelope: Envelope
        queue_id: str
        spool: object

    port = Port()
    reporter(spool, None, port).delivered_locally(Delivered(env, "Q2", original))
    ((report, data),) = port.got
    assert report.to == "alice@example.test"
    assert b"Action: delivered" in data and b"Original-Envelope-Id: e1" in data
    assert b"bob@example.test" in data and b"carol@example.test" not in data
    assert parsed(data)["Subject"] == "Successful Mail Delivery Report"
    # From <>, or with nobody asking: nothing at all.
    reporter(spool, None, port).delivered_locally(
        Delivered(Envelope("client", True, None, recipients=(local,)), "Q3", original)
    )
    reporter(spool, None, port).delivered_locally(
        Delivered(
            Envelope("c", True, Mailbox("alice", "example.test"), recipients=(other,)),
            "Q4",
            original,
        )
    )
    assert len(port.got) == 1
    original.remove()
    assert spool_files(spool) == []


@pytest.mark.parametrize("domain", ["mx.example.test", "example.test"])
def test_a_report_is_dkim_signed_with_the_reporting_domains_key(spool, queue, domain):
    """A key for the host name, or for the domain above it, signs the report;
    dkimpy verifies the signature against the key's DNS record."""
    store, record = queue
    port = Port()
    signer = Signer({domain: SigningKey(domain, "sel", KEY)})
    reporter(spool, store, port, signer).queued(record, record.recipients, "failed")
    ((report, data),) = port.got
    assert report.size == len(data)
    assert data.startswith(b"Return-Path: <>\nDKIM-Signature: v=1; a=rsa-sha256;")
    assert f"d={domain}; s=sel;".encode() in data
    asked = []

    def dns(name: bytes, timeout: int = 5) -> str:
        asked.append(name)
        return public_key_record(KEY)

    assert dkim.verify(on_the_wire(data), dnsfunc=dns)
    assert asked == [f"sel._domainkey.{domain}.".encode()]
    assert spool_files(spool) == []  # neither the unsigned nor the signed file is left


def test_a_key_for_another_domain_does_not_sign_the_report(spool, queue):
    store, record = queue
    port = Port()
    signer = Signer({"other.test": SigningKey("other.test", "sel", KEY)})
    reporter(spool, store, port, signer).queued(record, record.recipients, "failed")
    ((_, data),) = port.got
    assert b"DKIM-Signature" not in data


def test_reporting_domains_go_up_to_two_labels():
    assert reporting_domains("mx.mail.example.org") == [
        "mx.mail.example.org",
        "mail.example.org",
        "example.org",
    ]
    assert reporting_domains("Example.ORG.") == ["example.org"]
    assert reporting_domains("localhost") == ["localhost"]


def test_a_report_the_port_cannot_store_raises_and_leaves_nothing(spool, queue):
    """A temporary failure of the port (a full disk) is `ReportNotStored`: the
    runner then keeps the message; the report's spool file is removed."""
    store, record = queue
    port = Port(Verdict(False, temporary=True, reason="No space left on device"))
    with pytest.raises(ReportNotStored, match="No space left"):
        reporter(spool, store, port).queued(record, record.recipients, "failed")
    assert len(port.got) == 1 and spool_files(spool) == []


def test_a_sender_there_is_no_way_to_is_dropped_not_retried(spool, queue):
    store, record = queue
    port = Port(Verdict(False, temporary=False, reason="550 no such user here"))
    reporter(spool, store, port).queued(record, record.recipients, "failed")  # no raise
    assert len(port.got) == 1 and spool_files(spool) == []


def test_a_spool_that_cannot_be_written_is_report_not_stored(spool, queue, monkeypatch):
    from geosmtp.storage import SpoolFile, StorageError

    def full(self, data):  # type: ignore[no-untyped-def]
        raise StorageError(28, "No space left on device", self.path)

    store, record = queue
    monkeypatch.setattr(SpoolFile, "write", full)
    port = Port()
    with pytest.raises(ReportNotStored, match="No space left"):
        reporter(spool, store, port).queued(record, record.recipients, "failed")
    assert port.got == [] and spool_files(spool) == []


def test_a_success_over_lmtp_is_delivered_and_over_smtp_relayed(spool, queue):
    """RFC 3461 §6.2.2: an LMTP server took the mail into the mailbox (the
    final delivery: `delivered`); a next SMTP hop that did not take the DSN
    request only had it relayed (`relayed`)."""
    store, record = queue
    relayed = QueuedRecipient("b@remote.test", "remote.test", status="2.0.0")
    local = QueuedRecipient("c@example.test", "example.test", status="2.0.0", lmtp="c@example.test")
    port = Port()
    reporter(spool, store, port).queued(record, [relayed, local], "delivered")
    ((_, data),) = port.got
    blocks = data.split(b"Final-Recipient: ")[1:]
    assert [b.split(b"\n")[0].strip() for b in blocks] == [
        b"rfc822; b@remote.test",
        b"rfc822; c@example.test",
    ]
    assert b"Action: relayed" in blocks[0] and b"Action: delivered" in blocks[1]
