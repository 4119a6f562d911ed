"""The six manual cases of the original C project's test report, automated.

They share one server, each with mailboxes of its own."""

from __future__ import annotations

import mailbox
import os
import smtplib

import pytest

from tests.conftest import stored_since
from tests.integration.wire import Wire


@pytest.fixture
def server(shared_server):
    """The run's shared server (each test sends to mailboxes of its own)."""
    return shared_server


def _bodies(server, box: str) -> list[bytes]:
    return [path.read_bytes() for path in server.messages(box)]


def _body_of(raw: bytes) -> bytes:
    """The message body: what follows the first blank line."""
    return raw.split(b"\n\n", 1)[1]


def test_plain_mail(server, box):
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        refused = client.sendmail(
            "carol@remote.example",
            [f"{box}@test.example"],
            b"Subject: plain\r\nFrom: carol@remote.example\r\n\r\nHello Alice.\r\n",
        )
    assert refused == {}
    (raw,) = _bodies(server, box)
    assert _body_of(raw) == b"Hello Alice.\n"
    msg = mailbox.Maildir(server.mail_dir / box, create=False).get_message(
        server.messages(box)[0].name
    )
    assert msg["Subject"] == "plain"
    assert msg["Return-Path"] == "<carol@remote.example>"
    assert server.tmp_files() == []


def test_error_sequence(server, box):
    with Wire.connect(server.host, server.port) as w:
        code, text = w.cmd(f"RCPT TO:<{box}@test.example>")
        assert code == 503 and text.startswith("5.5.1"), text
        code, text = w.cmd("MAIL FROM:<carol@remote.example>")
        assert code == 503 and "HELO" in text, text
        w.expect("EHLO client.example", 250)
        code, text = w.cmd("DATA")
        assert code == 503, text
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        code, text = w.cmd("DATA")
        assert code == 503 and "RCPT" in text, text
        w.expect("RSET", 250)
        code, text = w.cmd("MAIL FROM: user")
        assert code == 501, text
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        code, text = w.cmd("RCPT TO:")
        assert code == 501, text
        code, text = w.cmd("BOGUS something")
        assert code == 500, text
        # After all those errors the session still works.
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"Subject: after errors\r\n\r\nstill fine\r\n.", 250)
        w.expect("QUIT", 221)
    assert [_body_of(b) for b in _bodies(server, box)] == [b"still fine\n"]


def test_two_concurrent_sessions_mail_each_other(server, box):
    """Two sockets open at once, their commands interleaved step by step."""
    with (
        Wire.connect(server.host, server.port) as a,
        Wire.connect(server.host, server.port) as b,
    ):
        a.expect("EHLO alice.example", 250)
        b.expect("EHLO bob.example", 250)
        a.expect("MAIL FROM:<alice@test.example>", 250)
        b.expect("MAIL FROM:<bob@test.example>", 250)
        b.expect(f"RCPT TO:<{box}@test.example>", 250)
        a.expect(f"RCPT TO:<{box}2@test.example>", 250)
        a.expect("DATA", 354)
        b.expect("DATA", 354)
        a.send(b"Subject: to bob\r\n\r\nfirst half, ")
        b.send(b"Subject: to alice\r\n\r\nhello ")
        a.send(b"second half\r\n")
        b.send(b"alice\r\n")
        b.expect(".", 250)
        a.expect(".", 250)
        a.expect("QUIT", 221)
        b.expect("QUIT", 221)
    assert [_body_of(m) for m in _bodies(server, f"{box}2")] == [b"first half, second half\n"]
    assert [_body_of(m) for m in _bodies(server, box)] == [b"hello alice\n"]
    (to_bob,) = _bodies(server, f"{box}2")
    assert b"Return-Path: <alice@test.example>" in to_bob
    (to_alice,) = _bodies(server, box)
    assert b"Return-Path: <bob@test.example>" in to_alice


def test_one_mail_to_five_recipients_is_one_hard_linked_file(server, box):
    names = [f"{box}{n}" for n in range(5)]
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        refused = client.sendmail(
            "sender@remote.example",
            [f"{n}@test.example" for n in names],
            b"Subject: to five\r\n\r\nfive copies?\r\n",
        )
    assert refused == {}
    paths = []
    for name in names:
        (path,) = server.messages(name)
        assert _body_of(path.read_bytes()) == b"five copies?\n"
        paths.append(path)
    stats = [os.stat(p) for p in paths]
    # Same filesystem, so the spool is linked, never copied: one inode, five links.
    assert len({(s.st_dev, s.st_ino) for s in stats}) == 1
    assert stats[0].st_nlink == 5
    assert server.tmp_files() == []


def test_empty_body(server, box):
    with Wire.connect(server.host, server.port) as w:
        w.expect("HELO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect(f"RCPT TO:<{box}2@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(".", 250)
        w.expect("QUIT", 221)
    (raw,) = _bodies(server, f"{box}2")
    # Only the trace headers this server adds; nothing of the (empty) message.
    assert raw.startswith(b"Return-Path: <carol@remote.example>\nReceived: ")
    assert all(
        line.startswith((b"Return-Path:", b"Received:", b"\t")) for line in raw.split(b"\n")[:-1]
    )
    assert raw.endswith(b"\n")


def test_repeated_commands(server, box):
    before = server.all_messages()
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO first.example", 250)
        w.expect("EHLO second.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        code, text = w.cmd("MAIL FROM:<carol@remote.example>")
        assert code == 503, text
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect(f"RCPT TO:<{box.upper()}@TEST.EXAMPLE>", 250)
        w.expect("DATA", 354)
        w.expect(b"Subject: twice\r\n\r\nonce only\r\n.", 250)
        w.expect("QUIT", 221)
    (raw,) = _bodies(server, box)
    assert _body_of(raw) == b"once only\n"
    assert b"Received: from second.example " in raw  # the second EHLO counts
    assert stored_since(server, before) == server.messages(box)
