"""Delivery status notifications (geosmtp/queue/dsn.py), read back with the
standard library's `email` package as a receiving mail client would."""

from __future__ import annotations

import ast
import email
import email.policy
import io
import re
import sys
import tracemalloc
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

import geosmtp.queue.dsn
from geosmtp.queue.dsn import (
    SUBJECTS,
    BoundaryCollision,
    RecipientStatus,
    build_dsn,
    decode_orcpt,
    decode_xtext,
    never_bounce_to,
    write_dsn,
)

BOUNDARY = "8f3a9c1e27d4b605/mail.example.org"
ORIGINAL = (
    b"Received: from client.example.org ([192.0.2.7])\n"
    b"\tby mail.example.org (geosmtp) with ESMTPSA id 1a2b3c; Mon, 1 Jan 2024 09:00:00 +0000\n"
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@example.net>, Carol <carol@example.net>\n"
    b"Subject: Lunch\n"
    b"Message-ID: <lunch.1@example.org>\n"
    b"\n"
    b"Shall we meet at noon?\n"
    b"\n"
    b"-- \n"
    b"Alice\n"
)
ORIGINAL_HEADERS = ORIGINAL[: ORIGINAL.index(b"\n\n") + 1]
UTF8_ORIGINAL = (
    "From: Jürgen <jürgen@exämple.org>\nTo: 用户@example.net\nSubject: Grüße\n\nHallo.\n"
).encode()

FAILED = RecipientStatus(
    final_recipient="bob@example.net",
    original_recipient="rfc822;Bob+2Bnews@example.net",
    action="failed",
    status="5.1.1",
    remote_mta="mx.example.net",
    diagnostic_code="550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
    last_attempt_date="Mon, 1 Jan 2024 09:05:00 +0000",
)
FAILED_NO_ORCPT = RecipientStatus(
    final_recipient="carol@example.net",
    action="failed",
    status="5.7.1",
    remote_mta="dns; mx.example.net",
    diagnostic_code="smtp; 554 5.7.1 <carol@example.net>: Relay access denied",
    last_attempt_date="Mon, 1 Jan 2024 09:05:01 +0000",
)
DELAYED = RecipientStatus(
    final_recipient="dave@example.com",
    action="delayed",
    status="4.4.1",
    diagnostic_code="X-geosmtp; connect to mx.example.com[192.0.2.25]:25: Connection refused",
    last_attempt_date="Mon, 1 Jan 2024 13:00:00 +0000",
    will_retry_until="Sat, 6 Jan 2024 09:00:00 +0000",
)
DELIVERED = RecipientStatus(
    final_recipient="erin@example.com",
    action="delivered",
    status="2.0.0",
    remote_mta="mx.example.com",
    diagnostic_code="smtp; 250 2.0.0 Ok: queued as 4TmK2x",
    last_attempt_date="Mon, 1 Jan 2024 09:00:02 +0000",
)


def make(
    recipients=(FAILED, FAILED_NO_ORCPT), kind="failed", original=ORIGINAL, **overrides
) -> bytes:
    args = {
        "reporting_mta": "mail.example.org",
        "original_envelope_id": "QQ+2B314159",
        "sender": "alice@example.org",
        "arrival_date": "Mon, 1 Jan 2024 09:00:00 +0000",
        "recipients": list(recipients),
        "kind": kind,
        "original": io.BytesIO(original) if isinstance(original, bytes) else original,
        "ret": "HDRS",
        "max_full_size": 10 * 1024 * 1024,
        "date": "Mon, 1 Jan 2024 09:05:02 +0000",
        "message_id": "<20240101090502.1a2b3c@mail.example.org>",
        "boundary": BOUNDARY,
    }
    args.update(overrides)
    return build_dsn(**args)


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def parts(msg: EmailMessage) -> list[EmailMessage]:
    assert msg.get_content_type() == "multipart/report"
    found = list(msg.iter_parts())
    assert len(found) == 3
    return found


def raw_parts(raw: bytes, boundary: str = BOUNDARY) -> list[bytes]:
    """The three body parts as octets (headers and content), split by hand."""
    body = raw.split(f"\n--{boundary}--\n".encode())[0]
    return body.split(f"\n--{boundary}\n".encode())[1:]


def status_blocks(raw: bytes) -> list[dict[str, str]]:
    """The delivery-status part's field groups, parsed independently of how
    the stdlib treats its content type: blank-line separated header blocks."""
    part = raw_parts(raw)[1]
    content = part.split(b"\n\n", 1)[1]
    parser = BytesParser(policy=email.policy.default)
    return [
        {k: str(v) for k, v in parser.parsebytes(block + b"\n", headersonly=True).items()}
        for block in content.strip(b"\n").split(b"\n\n")
    ]


def stdlib_status_blocks(msg: EmailMessage) -> list[dict[str, str]]:
    """message/delivery-status as the stdlib parses it: a list of header blocks."""
    part = parts(msg)[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [{k: str(v) for k, v in block.items()} for block in blocks]


def original_content(raw: bytes) -> bytes:
    """The third part's content, octet for octet."""
    return raw_parts(raw)[2].split(b"\n\n", 1)[1]


def roundtrip(raw: bytes) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, policy=email.policy.default).flatten(parse(raw))
    return out.getvalue()


# -- the report's shape -------------------------------------------------------------


def test_a_failure_report_is_a_multipart_report_of_delivery_status():
    raw = make()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg["Content-Type"].params["report-type"] == "delivery-status"
    assert msg.get_boundary() == BOUNDARY
    assert str(msg["From"]) == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert str(msg["To"]) == "alice@example.org"
    assert str(msg["Subject"]) == "Undelivered Mail Returned to Sender"
    assert b"\nDate: Mon, 1 Jan 2024 09:05:02 +0000\n" in raw  # as given
    assert str(msg["Message-ID"]) == "<20240101090502.1a2b3c@mail.example.org>"
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["MIME-Version"]) == "1.0"
    human, report, returned = parts(msg)
    assert human.get_content_type() == "text/plain"
    assert report.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert msg.defects == [] and all(p.defects == [] for p in parts(msg))
    assert b"\r" not in raw  # LF line ends, as geosmtp stores messages
    assert raw.isascii()


def test_failed_fields_per_message_and_per_recipient():
    msg = parse(make())
    blocks = stdlib_status_blocks(msg)
    assert blocks == status_blocks(make())  # the stdlib and a plain reading agree
    per_message, bob, carol = blocks
    assert per_message == {
        "Reporting-MTA": "dns; mail.example.org",
        "Original-Envelope-Id": "QQ+314159",  # ENVID xtext-decoded (RFC 3461 §6.3 (a))
        "Arrival-Date": "Mon, 1 Jan 2024 09:00:00 +0000",
    }
    assert bob == {
        "Original-Recipient": "rfc822; Bob+news@example.net",  # ORCPT, xtext-decoded
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": (
            "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown"
        ),
        "Last-Attempt-Date": "Mon, 1 Jan 2024 09:05:00 +0000",
    }
    # No ORCPT, no Original-Recipient (RFC 3461 §6.3 (d)); typed values kept as typed.
    assert carol == {
        "Final-Recipient": "rfc822; carol@example.net",
        "Action": "failed",
        "Status": "5.7.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 554 5.7.1 <carol@example.net>: Relay access denied",
        "Last-Attempt-Date": "Mon, 1 Jan 2024 09:05:01 +0000",
    }


def test_per_recipient_fields_come_in_rfc_3464_order():
    (_, bob, _) = status_blocks(make())
    assert list(bob) == [
        "Original-Recipient",
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    ]


def test_without_envid_there_is_no_original_envelope_id():
    per_message = status_blocks(make(original_envelope_id=None))[0]
    assert "Original-Envelope-Id" not in per_message


def test_delayed_report_has_will_retry_until():
    raw = make([DELAYED], kind="delayed", ret="FULL")
    msg = parse(raw)
    assert str(msg["Subject"]) == "Delayed Mail (still being retried)"
    _, dave = stdlib_status_blocks(msg)
    assert dave == {
        "Final-Recipient": "rfc822; dave@example.com",
        "Action": "delayed",
        "Status": "4.4.1",
        "Diagnostic-Code": (
            "X-geosmtp; connect to mx.example.com[192.0.2.25]:25: Connection refused"
        ),
        "Last-Attempt-Date": "Mon, 1 Jan 2024 13:00:00 +0000",
        "Will-Retry-Until": "Sat, 6 Jan 2024 09:00:00 +0000",
    }
    # RFC 3461 §4.3: RET=FULL is for "failed" reports; a delay returns the headers.
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    text = parts(msg)[0].get_content()
    assert "not been delivered yet" in text
    assert "Sat, 6 Jan 2024 09:00:00 +0000" in text
    assert "Connection refused" in text


def test_success_report():
    raw = make([DELIVERED], kind="delivered", ret="FULL")
    msg = parse(raw)
    assert str(msg["Subject"]) == "Successful Mail Delivery Report"
    _, erin = stdlib_status_blocks(msg)
    assert erin["Action"] == "delivered"
    assert erin["Status"] == "2.0.0"
    assert erin["Remote-MTA"] == "dns; mx.example.com"
    assert erin["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4TmK2x"
    assert "Will-Retry-Until" not in erin
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert original_content(raw) == ORIGINAL_HEADERS


def test_the_explanation_names_each_recipient_and_the_remote_reply():
    text = parts(parse(make()))[0].get_content()
    assert "mail.example.org" in text
    assert "<postmaster@mail.example.org>" in text
    assert "<bob@example.net>: delivery failed (status 5.1.1)" in text
    assert "mx.example.net said: 550 5.1.1 <bob@example.net>: Recipient address" in text
    assert "<carol@example.net>: delivery failed (status 5.7.1)" in text
    assert "Relay access denied" in text
    assert all(len(line) <= 78 for line in text.splitlines())
    custom = parts(parse(make(postmaster_address="help@example.org")))[0].get_content()
    assert "<help@example.org>" in custom


@pytest.mark.parametrize("kind", ["failed", "delayed", "delivered"])
def test_subjects(kind):
    recipient = {"failed": FAILED, "delayed": DELAYED, "delivered": DELIVERED}[kind]
    assert str(parse(make([recipient], kind=kind))["Subject"]) == SUBJECTS[kind]


# -- what of the original is returned -------------------------------------------------


@pytest.mark.parametrize("ret", ["HDRS", "hdrs", None])
def test_hdrs_returns_only_the_header_section(ret):
    raw = make(ret=ret)
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert original_content(raw) == ORIGINAL_HEADERS
    assert returned.get_content() == ORIGINAL_HEADERS.decode()
    assert b"Shall we meet" not in raw


def test_full_returns_the_whole_original_byte_exact():
    raw = make(ret="FULL")
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "message/rfc822"
    assert original_content(raw) == ORIGINAL
    inner = returned.get_content()
    assert str(inner["Message-ID"]) == "<lunch.1@example.org>"
    assert inner.get_content() == "Shall we meet at noon?\n\n-- \nAlice\n"
    assert "Your message is attached." in parts(parse(raw))[0].get_content()


@pytest.mark.parametrize(
    "original",
    [
        b"Subject: no final newline\n\nbody",
        b"Subject: no body\n",
        b"\nA message with no header section.\n",
        b"",
    ],
)
def test_full_is_byte_exact_at_the_edges(original):
    raw = make(original=original, ret="FULL")
    assert original_content(raw) == original
    assert parts(parse(raw))[2].get_content_type() == "message/rfc822"


@pytest.mark.parametrize(
    ("original", "headers"),
    [
        (b"Subject: no body\n", b"Subject: no body\n"),
        (b"Subject: no body, no newline", b"Subject: no body, no newline"),
        (b"\nno header section\n", b""),
        (b"", b""),
    ],
)
def test_hdrs_at_the_edges(original, headers):
    raw = make(original=original)
    assert original_content(raw) == headers
    roundtrip(raw)


def test_full_over_the_size_cap_falls_back_to_headers():
    raw = make(ret="FULL", max_full_size=len(ORIGINAL) - 1)
    msg = parse(raw)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert original_content(raw) == ORIGINAL_HEADERS
    assert "too large to be returned whole" in parts(msg)[0].get_content()
    # At the cap exactly, it is still returned whole.
    at_cap = make(ret="FULL", max_full_size=len(ORIGINAL))
    assert original_content(at_cap) == ORIGINAL


def test_the_original_is_read_from_its_current_position():
    f = io.BytesIO(b"QUEUE-RECORD\n" + ORIGINAL)
    f.seek(len(b"QUEUE-RECORD\n"))
    raw = make(original=f, ret="FULL")
    assert original_content(raw) == ORIGINAL


def test_a_long_header_section_is_cut_at_a_line_end():
    original = b"".join(b"X-Filler-%04d: %s\n" % (i, b"y" * 60) for i in range(100)) + b"\nbody\n"
    raw = make(original=original, max_header_size=1000)
    returned = original_content(raw)
    assert len(returned) <= 1000
    assert returned.endswith(b"\n")
    assert original.startswith(returned)
    assert returned.count(b"\n") == 1000 // len(b"X-Filler-0000: " + b"y" * 60 + b"\n")


@pytest.mark.parametrize("kind", ["failed", "delayed", "delivered"])
def test_body_text_after_the_header_fields_is_not_returned(kind):
    """A message with no empty line: the header section ends at its first
    line that is not a header field, not at the end of the message."""
    original = b"Subject: hi\nthis is body text: secret\nX-Looks: like a field\n" * 50
    returned = original_content(make(kind=kind, original=original))
    assert returned == b"Subject: hi\n"


FOLDED = b"Subject: a\n long\n\tfold\nTo : b@example.org\n"


@pytest.mark.parametrize(
    ("original", "section"),
    [
        # Folded lines belong to their field; white space before the colon is allowed.
        (FOLDED + b"\nbody\n", FOLDED),
        (FOLDED + b"body\n", FOLDED),
        (b"Subject: a\n   \nX: hidden\n", b"Subject: a\n"),  # a blank-looking line ends it
        (b" starts folded: x\nSubject: a\n\nbody\n", b""),  # nothing to fold into
        (b"From alice@example.org Mon Jan  1 09:00:00 2024\nSubject: a\n", b""),  # mbox
        (b"Subject: no newline at the end", b"Subject: no newline at the end"),
        (b"\nSubject: not a header\n", b""),
        (b"X: y\n--" + BOUNDARY.encode() + b"--\nZ: w\n\nbody\n", b"X: y\n"),
    ],
)
def test_the_header_section_is_its_field_lines(original, section):
    assert original_content(make(original=original)) == section


def test_a_header_line_over_the_limit_is_not_returned():
    original = b"Subject: short\nX-Long: " + b"y" * 2000 + b"\n\nbody\n"
    assert original_content(make(original=original, max_header_size=1000)) == b"Subject: short\n"


WITH_RETURN_PATH = b"Return-Path: <alice@example.org>\n" + ORIGINAL


@pytest.mark.parametrize("kind", ["failed", "delayed", "delivered"])
def test_our_return_path_is_not_in_the_returned_headers(kind):
    returned = original_content(make(kind=kind, original=WITH_RETURN_PATH))
    assert returned == ORIGINAL_HEADERS


def test_our_return_path_is_not_in_the_returned_message():
    raw = make(original=WITH_RETURN_PATH, ret="FULL")
    assert parts(parse(raw))[2].get_content_type() == "message/rfc822"
    assert original_content(raw) == ORIGINAL


def test_every_return_path_field_is_dropped_with_its_folded_lines():
    original = b"return-path :\n <a@example.org>\nSubject: x\nReturn-Path: <b@x>\nTo: c@y\n\nb\n"
    assert original_content(make(original=original)) == b"Subject: x\nTo: c@y\n"
    full = original_content(make(original=original, ret="FULL"))
    assert full == b"Subject: x\nTo: c@y\n\nb\n"


def test_a_return_path_in_the_body_is_returned_whole():
    original = b"Subject: x\n\nReturn-Path: <kept@example.org>\n"
    assert original_content(make(original=original, ret="FULL")) == original


# -- internationalised mail (RFC 6533) -------------------------------------------------


@pytest.mark.parametrize(
    ("ret", "returned_type"), [("FULL", "message/global"), ("HDRS", "message/global-headers")]
)
def test_a_utf8_original_gives_the_global_types(ret, returned_type):
    buf = io.BytesIO()
    info = write_dsn(
        buf,
        reporting_mta="mail.example.org",
        original_envelope_id=None,
        sender="jürgen@exämple.org",
        arrival_date="Mon, 1 Jan 2024 09:00:00 +0000",
        recipients=[
            RecipientStatus(
                "用户@example.net",
                "failed",
                "5.1.1",
                original_recipient="utf-8;\\x{7528}\\x{6237}@example.net",
                diagnostic_code="550 5.1.1 用户不存在",
            ),
            FAILED,
        ],
        kind="failed",
        original=io.BytesIO(UTF8_ORIGINAL),
        ret=ret,
        max_full_size=1 << 20,
        date="Mon, 1 Jan 2024 09:05:02 +0000",
        message_id="dsn.1@mail.example.org",
        boundary=BOUNDARY,
    )
    raw = buf.getvalue()
    assert info.utf8 and info.eight_bit and info.smtputf8  # the sender's address is UTF-8
    assert info.size == len(raw)
    msg = parse(raw)
    # RFC 6522 §3: report-type is the subtype of the second part.
    assert msg["Content-Type"].params["report-type"] == "global-delivery-status"
    human, report, returned = parts(msg)
    assert report.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == returned_type
    assert human.get_content_charset() == "utf-8"
    _, first, second = status_blocks(raw)
    assert first["Final-Recipient"] == "utf-8; 用户@example.net"
    assert first["Original-Recipient"] == "utf-8; 用户@example.net"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 用户不存在"
    assert second["Final-Recipient"] == "rfc822; bob@example.net"
    expected = UTF8_ORIGINAL if ret == "FULL" else UTF8_ORIGINAL.split(b"\n\n")[0] + b"\n"
    assert original_content(raw) == expected
    assert str(msg["To"]) == "jürgen@exämple.org"
    roundtrip(raw)


def test_a_utf8_recipient_alone_gives_the_global_types():
    rcpt = RecipientStatus("josé@example.org", "failed", "5.1.1")
    msg = parse(make([rcpt]))
    assert msg["Content-Type"].params["report-type"] == "global-delivery-status"
    assert [p.get_content_type() for p in parts(msg)][1:] == [
        "message/global-delivery-status",
        "message/global-headers",
    ]


def test_an_8bit_body_under_ascii_headers_stays_message_rfc822():
    original = b"Subject: plain\nContent-Type: text/plain; charset=utf-8\n\nGr\xc3\xbc\xc3\x9fe\n"
    buf = io.BytesIO()
    info = write_dsn(
        buf,
        reporting_mta="mail.example.org",
        original_envelope_id=None,
        sender="alice@example.org",
        arrival_date="d",
        recipients=[FAILED],
        kind="failed",
        original=io.BytesIO(original),
        ret="FULL",
        max_full_size=1 << 20,
        date="d",
        message_id="m@x",
        boundary=BOUNDARY,
    )
    raw = buf.getvalue()
    assert (info.utf8, info.eight_bit, info.smtputf8) == (False, True, False)
    msg = parse(raw)
    assert msg["Content-Type"].params["report-type"] == "delivery-status"
    returned = parts(msg)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert str(returned["Content-Transfer-Encoding"]) == "8bit"
    assert str(msg["Content-Transfer-Encoding"]) == "8bit"
    assert original_content(raw) == original


# -- nothing from a client can add a header field ----------------------------------------


INJECTIONS = ["\r\nX-Evil: 1", "\nX-Evil: 1", "\rX-Evil: 1", "\u2028X-Evil: 1", "\x85X-Evil: 1"]


@pytest.mark.parametrize("crlf", INJECTIONS)
def test_line_breaks_in_client_data_cannot_add_a_header(crlf):
    rcpt = RecipientStatus(
        final_recipient=f"bob@example.net{crlf}",
        original_recipient=f"rfc822;bob@example.net{crlf}",
        action="failed",
        status="5.1.1",
        remote_mta=f"mx.example.net{crlf}",
        diagnostic_code=f"550 5.1.1 unknown{crlf}\n\nX-Body: 1",
        last_attempt_date=f"Mon, 1 Jan 2024{crlf}",
    )
    raw = make(
        [rcpt],
        sender=f"alice@example.org{crlf}",
        original_envelope_id=f"id{crlf}",
        message_id=f"m@x{crlf}",
        date=f"Mon, 1 Jan 2024{crlf}",
    )
    _check_no_evil(raw)


def test_xtext_encoded_line_breaks_cannot_add_a_header():
    """ENVID and ORCPT are decoded: +0D+0A must not become a line break."""
    rcpt = RecipientStatus(
        "bob@example.net", "failed", "5.1.1", original_recipient="rfc822;b+0D+0AX-Evil:+201@x"
    )
    raw = make([rcpt], original_envelope_id="id+0D+0AX-Evil:+201+0A+0AX-Evil:+202")
    _check_no_evil(raw)
    per_message, bob = status_blocks(raw)
    assert per_message["Original-Envelope-Id"] == "id  X-Evil: 1  X-Evil: 2"
    assert bob["Original-Recipient"] == "rfc822; b  X-Evil: 1@x"


def test_unicode_escaped_line_breaks_cannot_add_a_header():
    rcpt = RecipientStatus(
        "bob@example.net", "failed", "5.1.1", original_recipient="utf-8;b\\x{D}\\x{A}X-Evil: 1@x"
    )
    _check_no_evil(make([rcpt]))


def _check_no_evil(raw: bytes) -> None:
    assert not re.search(rb"^X-(Evil|Body)", raw, re.MULTILINE), raw.decode("utf-8", "replace")
    assert b"\r" not in raw
    for sep in ("\u2028", "\u2029", "\x85"):
        assert sep.encode() not in raw
    msg = parse(raw)
    assert "X-Evil" not in msg
    for part in parts(msg):
        assert "X-Evil" not in part
    for block in status_blocks(raw):
        assert "X-Evil" not in block and "X-Body" not in block
    assert len(status_blocks(raw)) == 2  # still one per-message and one recipient block
    roundtrip(raw)


def test_control_characters_become_question_marks():
    rcpt = RecipientStatus("bob@example.net", "failed", "5.1.1", diagnostic_code="550 a\x00b\x1bc")
    (_, bob) = status_blocks(make([rcpt]))
    assert bob["Diagnostic-Code"] == "smtp; 550 a?b?c"


def test_long_values_are_folded_and_unfold_to_the_same_text():
    reply = "550 5.1.1 " + " ".join(f"word{i}" for i in range(120))
    rcpt = RecipientStatus("bob@example.net", "failed", "5.1.1", diagnostic_code=reply)
    raw = make([rcpt])
    report = raw_parts(raw)[1]
    assert all(len(line) <= 78 for line in report.split(b"\n"))
    assert status_blocks(raw)[1]["Diagnostic-Code"] == "smtp; " + reply
    assert stdlib_status_blocks(parse(raw))[1]["Diagnostic-Code"] == "smtp; " + reply


def test_an_unbreakable_word_still_keeps_lines_under_998_octets():
    word = "é" * 2000  # 4000 octets, no space to fold at
    rcpt = RecipientStatus("bob@example.net", "failed", "5.1.1", diagnostic_code="550 " + word)
    raw = make([rcpt])
    assert max(len(line) for line in raw.split(b"\n")) <= 998
    got = status_blocks(raw)[1]["Diagnostic-Code"]
    assert got.replace(" ", "") == ("smtp;550" + word)  # cut with spaces, nothing lost


# -- sending form and round trips ---------------------------------------------------------

VARIANTS = {
    "failed-hdrs": {},
    "failed-full": {"ret": "FULL"},
    "failed-full-capped": {"ret": "FULL", "max_full_size": 10},
    "delayed": {"recipients": [DELAYED], "kind": "delayed"},
    "delivered": {"recipients": [DELIVERED], "kind": "delivered"},
    "utf8-full": {"original": UTF8_ORIGINAL, "ret": "FULL"},
    "utf8-hdrs": {"original": UTF8_ORIGINAL},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_report_round_trips_through_the_bytes_generator(variant):
    raw = make(**VARIANTS[variant])
    again = roundtrip(raw)
    if VARIANTS[variant].get("ret") != "FULL" and variant != "utf8-hdrs":
        # Byte for byte, except where the stdlib rewrites what it parsed as a
        # message: it refolds a returned message's headers, and gives
        # message/global-headers an empty body.
        assert again == raw
    assert shape(parse(again)) == shape(parse(raw))


def shape(msg: EmailMessage) -> list:
    """Content types, subject, the report's fields, the returned headers."""
    returned = parts(msg)[2]
    if returned.get_content_maintype() == "message":
        headers = [(k, str(v)) for k, v in returned.get_payload()[0].items()]
    else:
        headers = returned.get_content().replace("\r\n", "\n")
    return [
        [p.get_content_type() for p in parts(msg)],
        str(msg["Subject"]),
        status_blocks(msg.as_bytes(policy=email.policy.default.clone(linesep="\n"))),
        headers,
    ]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_crlf_for_sending(variant):
    lf = make(**VARIANTS[variant])
    crlf = make(**VARIANTS[variant], crlf=True)
    assert crlf == lf.replace(b"\n", b"\r\n")
    assert b"\n" not in crlf.replace(b"\r\n", b"")
    assert shape(parse(crlf)) == shape(parse(lf))


def test_the_info_tells_what_was_written():
    buf = io.BytesIO()
    info = write_dsn(
        buf,
        reporting_mta="mail.example.org",
        original_envelope_id=None,
        sender="<alice@example.org>",
        arrival_date="d",
        recipients=[FAILED],
        kind="failed",
        original=io.BytesIO(ORIGINAL),
        ret="FULL",
        max_full_size=1 << 20,
        date="d",
        message_id="m@x",
        boundary=BOUNDARY,
        crlf=True,
    )
    assert info.returned == "full"
    assert (info.utf8, info.eight_bit, info.smtputf8) == (False, False, False)
    assert info.size == len(buf.getvalue())
    assert str(parse(buf.getvalue())["To"]) == "alice@example.org"  # brackets not doubled


# -- no bounce to a bounce, and other refusals ---------------------------------------------


@pytest.mark.parametrize(
    ("sender", "never"),
    [
        ("", True),
        ("<>", True),
        (" <> ", True),
        (None, True),
        ("alice@example.org", False),
        ("<alice@example.org>", False),
    ],
)
def test_never_bounce_to_the_null_reverse_path(sender, never):
    assert never_bounce_to(sender) is never


@pytest.mark.parametrize("sender", ["", "<>"])
def test_no_report_is_built_for_the_null_reverse_path(sender):
    with pytest.raises(ValueError, match="null reverse-path"):
        make(sender=sender)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "bounced"},
        {"ret": "BODY"},
        {"recipients": []},
        {"boundary": "with space"},
        {"boundary": "x" * 71},
        {"boundary": ""},
    ],
)
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        make(**bad)


@pytest.mark.parametrize(
    ("action", "status"),
    [("bounced", "5.1.1"), ("failed", "550"), ("failed", "5.1"), ("failed", "6.0.0")],
)
def test_recipient_status_is_checked(action, status):
    with pytest.raises(ValueError):
        RecipientStatus("bob@example.net", action, status)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ret", "line"),
    [
        ("FULL", b"\n--" + BOUNDARY.encode()),
        ("FULL", b"\r--" + BOUNDARY.encode()),
        # A line that starts with "--" ends the header section (it is not a
        # field): only a bare CR inside a field's line gets it returned.
        ("HDRS", b"\r--" + BOUNDARY.encode()),
    ],
)
def test_a_boundary_inside_the_original_is_refused_before_writing(line, ret):
    original = b"Subject: x" + line + b"--\nX: y\n\nbody\n"
    out = io.BytesIO()
    with pytest.raises(BoundaryCollision):
        write_dsn(
            out,
            reporting_mta="mail.example.org",
            original_envelope_id=None,
            sender="alice@example.org",
            arrival_date="d",
            recipients=[FAILED],
            kind="failed",
            original=io.BytesIO(original),
            ret=ret,
            max_full_size=1 << 20,
            date="d",
            message_id="m@x",
            boundary=BOUNDARY,
        )
    assert out.getvalue() == b""


def test_a_boundary_straddling_two_reads_is_found(monkeypatch):
    import geosmtp.queue.dsn as dsn

    monkeypatch.setattr(dsn, "CHUNK_SIZE", 7)
    original = b"Subject: x\n\nbody\n--" + BOUNDARY.encode() + b"--\n"
    with pytest.raises(BoundaryCollision):
        make(original=original, ret="FULL")
    # A mere mention, not at a line start, is fine.
    fine = b"Subject: x\n\nsee --" + BOUNDARY.encode() + b"\n"
    assert original_content(make(original=fine, ret="FULL")) == fine


def test_small_reads_give_the_same_report(monkeypatch):
    import geosmtp.queue.dsn as dsn

    expected = {ret: make(ret=ret, original=UTF8_ORIGINAL + ORIGINAL) for ret in ("FULL", "HDRS")}
    monkeypatch.setattr(dsn, "CHUNK_SIZE", 3)
    for ret, raw in expected.items():
        assert make(ret=ret, original=UTF8_ORIGINAL + ORIGINAL) == raw


# -- xtext --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("rfc822;bob@example.net", ("rfc822", "bob@example.net")),
        ("rfc822;bob+2B1@example.net", ("rfc822", "bob+1@example.net")),
        ("RFC822;a+3Db@x", ("RFC822", "a=b@x")),
        ("rfc822;j+C3+BCrgen@x", ("rfc822", "jürgen@x")),
        ("utf-8;j\\x{FC}rgen@x", ("utf-8", "jürgen@x")),
        ("utf-8;josé@x", ("utf-8", "josé@x")),
        ("x400;/C=de/", ("x400", "/C=de/")),
        ("bob@example.net", ("rfc822", "bob@example.net")),
        ("rfc822;bad+ZZhex@x", ("rfc822", "bad+ZZhex@x")),
    ],
)
def test_decode_orcpt(value, decoded):
    assert decode_orcpt(value) == decoded


def test_decode_xtext():
    assert decode_xtext("QQ+2B314159") == "QQ+314159"
    assert decode_xtext("plain") == "plain"
    assert decode_xtext("+FF") == "\ufffd"  # not UTF-8


# -- a large original, in bounded memory ---------------------------------------------------


def test_a_20_mb_original_is_returned_whole_in_bounded_memory(tmp_path):
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-+=()[]{}<>\n"
    block = line * (65536 // len(line))
    size = 20 * 1024 * 1024
    original_path = tmp_path / "original"
    with original_path.open("wb") as f:
        f.write(ORIGINAL_HEADERS + b"\n")
        written = len(ORIGINAL_HEADERS) + 1
        while written < size:
            f.write(block)
            written += len(block)
    out_path = tmp_path / "dsn"
    with original_path.open("rb") as original, out_path.open("wb") as out:
        tracemalloc.start()
        try:
            info = write_dsn(
                out,
                reporting_mta="mail.example.org",
                original_envelope_id=None,
                sender="alice@example.org",
                arrival_date="d",
                recipients=[FAILED],
                kind="failed",
                original=original,
                ret="FULL",
                max_full_size=32 * 1024 * 1024,
                date="d",
                message_id="m@x",
                boundary=BOUNDARY,
                crlf=True,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, f"peak {peak} octets"  # ~0.15 MB: a few 64 KiB pieces
    assert info.returned == "full"
    raw = out_path.read_bytes()
    assert info.size == len(raw)
    _, sep, rest = raw.partition(b"Content-Type: message/rfc822\r\n\r\n")
    assert sep
    assert rest == original_path.read_bytes().replace(b"\n", b"\r\n") + (
        f"\r\n--{BOUNDARY}--\r\n".encode()
    )


# -- purity --------------------------------------------------------------------------------


def test_the_builder_is_pure():
    """Standard library only, and no clock, randomness, files or sockets: the
    caller passes the time, the ids and the files."""
    path = Path(geosmtp.queue.dsn.__file__)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    forbidden = {"time", "datetime", "random", "secrets", "uuid", "os", "socket", "pathlib"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, "imports nothing of geosmtp"
            names = [node.module]
        else:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", f"line {node.lineno} calls open()"
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__", name
            assert top not in forbidden, name
