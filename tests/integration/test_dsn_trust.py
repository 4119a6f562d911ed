"""Success notices (RFC 3461 NOTIFY=SUCCESS) only for clients the server knows.

A stranger on the mx listener may name anyone as the reverse-path: a success
report would be mail from us, with the stranger's header section, to whoever
that is. Its NOTIFY=SUCCESS is accepted (250) and not honoured; a client that
logged in, or is in `trusted_networks`, gets its report. The report returns
only the header section (never body text) and never our own `Return-Path:`.
"""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from tests.conftest import listeners, users, wait_until

PASSWORD = "dsn-trust-pw"
MESSAGE = b"Subject: notify me\r\nMessage-ID: <n@test.example>\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def dsn_server(make_module_server):
    return make_module_server(
        {
            "listeners": listeners("mx"),
            "users": users(alice=PASSWORD, bob=None),
            "auth": {"allow_plaintext": True},
            # 127.0.0.2 is trusted; 127.0.0.1 (a stranger) is not.
            "trusted_networks": ["127.0.0.2/32"],
        }
    )


def send(server, sender: str, message: bytes = MESSAGE, *, source="127.0.0.1", login=False):  # type: ignore[no-untyped-def]
    sock_source = (source, 0)
    with smtplib.SMTP(timeout=10, source_address=sock_source) as client:
        client.connect("127.0.0.1", server.ports["mx"])
        client.ehlo("client.example")
        if login:
            client.login("alice", PASSWORD)
        assert client.mail(sender, ["RET=HDRS", "ENVID=QQ1"])[0] == 250
        code, text = client.rcpt("bob@test.example", ["NOTIFY=SUCCESS"])
        assert code == 250, text  # accepted either way (RFC 3461)
        code, text = client.data(message)
        assert code == 250, text


def reports(server) -> list[email.message.EmailMessage]:  # type: ignore[no-untyped-def]
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        for p in server.messages("alice")
    ]


def queued(server) -> list:  # type: ignore[no-untyped-def]
    return sorted((server.mail_dir / ".queue" / "records").glob("*.json"))


def test_a_strangers_notify_success_gets_no_report(dsn_server):
    """The forged sender gets nothing: not in a local mailbox, not through the
    queue to a remote one. The report of a trusted client's message, sent
    after, shows the stranger's would have been there by now (the report is
    made before the 250 to the final dot)."""
    before = len(reports(dsn_server))
    send(dsn_server, "alice@test.example")
    send(dsn_server, "victim@elsewhere.example")
    assert not [r for r in queued(dsn_server) if "victim@" in r.read_text()]
    send(dsn_server, "alice@test.example", source="127.0.0.2")
    wait_until(lambda: len(reports(dsn_server)) > before, what="the trusted client's report")
    assert len(reports(dsn_server)) == before + 1
    log = wait_until(
        lambda: (
            "not honoured for <victim@elsewhere.example>" in dsn_server.server_log()
            and dsn_server.server_log()
        ),
        what="the DEBUG line",
    )
    assert "NOTIFY=SUCCESS/DELAY not honoured for <alice@test.example>" in log
    assert "report to <victim@elsewhere.example>" not in log


def test_a_logged_in_client_gets_its_report(dsn_server):
    before = len(reports(dsn_server))
    send(dsn_server, "alice@test.example", login=True)
    got = wait_until(lambda: reports(dsn_server)[before:], what="the report")
    (report,) = got
    assert report["Subject"] == "Successful Mail Delivery Report"
    _, status, _ = report.iter_parts()
    per_message, recipient = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "QQ1"
    assert recipient["Action"] == "delivered"


def test_a_trusted_client_gets_a_report_for_a_remote_sender(dsn_server):
    """The report to a remote sender goes into the queue."""
    send(dsn_server, "someone@elsewhere.example", source="127.0.0.2")
    wait_until(
        lambda: [r for r in queued(dsn_server) if '"someone@elsewhere.example"' in r.read_text()],
        what="the report in the queue",
    )


def returned_headers(report) -> bytes:  # type: ignore[no-untyped-def]
    _, _, original = report.iter_parts()
    assert original.get_content_type() == "text/rfc822-headers"
    return original.get_payload(decode=True)


def test_the_report_returns_header_fields_only_and_no_return_path(dsn_server):
    """A message with no empty line: its second line is body text, which is
    not returned; nor is the Return-Path our delivery put at the top."""
    before = len(reports(dsn_server))
    message = (
        b"Subject: no blank line\r\n"
        b"this is body text, secret: 12345\r\n"
        b"From: looks-like-a-header@example.org\r\n"
    )
    send(dsn_server, "alice@test.example", message, login=True)
    (report,) = wait_until(lambda: reports(dsn_server)[before:], what="the report")
    returned = returned_headers(report)
    assert b"Subject: no blank line\n" in returned
    assert b"secret" not in returned and b"looks-like-a-header" not in returned
    assert b"Return-Path" not in returned
    assert returned.startswith(b"Received: from ")


def test_a_delivered_message_keeps_its_return_path(dsn_server):
    """The report drops the Return-Path; the delivered message itself keeps it."""
    before = len(dsn_server.messages("bob"))
    send(dsn_server, "alice@test.example", login=True)
    newest = wait_until(lambda: dsn_server.messages("bob")[before:], what="the delivery")
    assert all(p.read_bytes().startswith(b"Return-Path: <alice@test.example>\n") for p in newest)
