"""Trace headers as stored: Return-Path: and Received: (RFC 5321 §4.4, RFC 6531 §3.7.3)."""

from __future__ import annotations

import email
import email.policy
import email.utils
import smtplib

import pytest

from tests.integration.wire import Wire


@pytest.fixture
def server(shared_server):
    """The run's shared server (each test sends to mailboxes of its own)."""
    return shared_server


def _stored_headers(server, box: str) -> email.message.EmailMessage:
    (path,) = server.messages(box)
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def test_return_path_is_the_reverse_path_exactly(server, box):
    sender = '"a b)(c\\\\d"@example.org'
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect(f"MAIL FROM:<{sender}>", 250)
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"Subject: odd sender\r\n\r\nbody\r\n.", 250)
    (path,) = server.messages(box)
    raw = path.read_bytes()
    assert raw.startswith(f"Return-Path: <{sender}>\n".encode())
    # The bounce address as a mail program reads it back.
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert email.utils.parseaddr(str(msg["Return-Path"]))[1] == sender


def test_smtputf8_mail_is_received_with_utf8smtp(server, box):
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.example")
        client.sendmail(
            "jörg@bücher.example",
            [f"{box}@test.example"],
            "Subject: ü\r\n\r\nbody\r\n".encode(),
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
        client.sendmail(
            "carol@remote.example", [f"{box}2@test.example"], b"Subject: a\r\n\r\nb\r\n"
        )
    utf8 = _stored_headers(server, box)
    assert utf8["Return-Path"] == "<jörg@bücher.example>"
    assert " with UTF8SMTP id " in str(utf8["Received"])
    plain = _stored_headers(server, f"{box}2")
    assert " with ESMTP id " in str(plain["Received"])
