"""`delivery.lmtp`: local mail goes to a private Dovecot's LMTP server.

geosmtp takes mail over SMTP (smtplib), queues it, and hands it to Dovecot's
LMTP service (Debian's `dovecot-lmtpd`, started by the test on a loopback
port or a UNIX socket in its temp dir); what Dovecot stored is read back
through Dovecot's own POP3 server. Skipped, with the reason, when Dovecot's
POP3 or LMTP server is not installed.
"""

from __future__ import annotations

import poplib
import re
import smtplib
from collections.abc import Iterator

import pytest

from tests.conftest import HOSTNAME, listeners, wait_until
from tests.integration.dovecot import Dovecot, require_dovecot_lmtp
from tests.integration.test_lmtp import send

PASSWORD = "pw"
USERS = {"alice": PASSWORD, "bob": PASSWORD}
BODY = b"first line\r\n.a line that starts with a dot\r\n\r\n  spaced  \r\nlast line\r\n"


def message(subject: str) -> bytes:
    return (
        f"From: bob@test.example\r\nTo: alice@test.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@test.example>\r\n\r\n"
    ).encode() + BODY


def pop3_messages(dc: Dovecot, user: str) -> list[bytes]:
    """Every message of `user`'s INBOX, read through Dovecot's POP3 server
    (CRLF line ends, the byte-stuffing undone by poplib)."""
    client = poplib.POP3(dc.host, dc.port, timeout=10)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        return [b"\r\n".join(client.retr(n + 1)[1]) + b"\r\n" for n in range(count)]
    finally:
        client.quit()


def delivered_count(dc: Dovecot) -> int:
    """How many mails Dovecot's LMTP saved, by its log."""
    return dc.log().count("saved mail to INBOX")


def lmtp_connections(dc: Dovecot) -> int:
    """LMTP connections Dovecot accepted, by its log (`start()`'s probe included)."""
    return len(re.findall(r"lmtp\(\d+\): Info: Connect from", dc.log()))


def access_lines(server, *words: str, count: int = 1) -> list[str]:  # type: ignore[no-untyped-def]
    """The access log's lines with all of `words`, once there are `count` (a
    worker's lines reach the file through the master a moment later)."""
    return wait_until(
        lambda: (
            len(
                found := [
                    li for li in server.access_log().splitlines() if all(w in li for w in words)
                ]
            )
            >= count
            and found
        ),
        what=f"{count} access line(s) with {words}",
    )


def queue_empty(server) -> bool:  # type: ignore[no-untyped-def]
    return not any((server.mail_dir / ".queue" / "records").glob("*.json"))


def geosmtp_config(lmtp: str) -> dict:
    return {
        "listeners": listeners("mx"),
        "workers": 1,  # one queue runner: one connection cache to count
        "delivery": {"lmtp": lmtp},
        "relay": {"retry_schedule": [0.3], "connection_cache_time": 5},
    }


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    require_dovecot_lmtp()
    dc = Dovecot(None, USERS, lmtp=True)
    try:
        yield dc.start()
    finally:
        dc.cleanup()


@pytest.fixture(scope="module")
def server(dovecot, make_module_server):  # type: ignore[no-untyped-def]
    """geosmtp with its local mail going to Dovecot's LMTP over TCP."""
    return make_module_server(geosmtp_config(f"{dovecot.host}:{dovecot.lmtp_port}"))


def test_mail_for_two_users_is_readable_through_dovecots_pop3(dovecot, server):
    """(a) Both recipients' mail is in Dovecot, with the header geosmtp adds
    and the body byte for byte; the access log says it went by LMTP and what
    Dovecot answered."""
    before = {u: len(pop3_messages(dovecot, u)) for u in USERS}
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        client.sendmail(
            "carol@example.org", ["alice@test.example", "bob@test.example"], message("two")
        )
    got = wait_until(
        lambda: (
            all(len(pop3_messages(dovecot, u)) == before[u] + 1 for u in USERS)
            and {u: pop3_messages(dovecot, u)[-1] for u in USERS}
        ),
        what="both users' mail in Dovecot",
    )
    for user, text in got.items():
        header, _, body = text.partition(b"\r\n\r\n")
        assert body == BODY, user
        assert re.search(rb"^Received: from .*\r\n\s+by " + HOSTNAME.encode(), header, re.M), user
        assert header.count(b"Return-Path:") == 1  # Dovecot's, from MAIL FROM: not a second
        assert b"Return-Path: <carol@example.org>" in header
        assert b"Subject: two" in header
    wait_until(lambda: queue_empty(server), what="the queue to empty")
    for user in USERS:
        line = access_lines(server, "outcome=sent", f"to=<{user}@test.example>")[-1]
        assert f"relay=lmtp:{dovecot.host}[{dovecot.host}]:{dovecot.lmtp_port}" in line
        assert "Saved" in line or "saved" in line  # Dovecot's own reply


def test_a_recipient_dovecot_refuses_is_bounced_and_the_other_delivered(dovecot, server):
    """(c) Dovecot has no user `nobody`: 550 5.1.1 after the data. The SMTP
    client still got its 250; alice gets the mail; the sender (bob, a local
    user) gets a DSN, itself delivered by LMTP, naming nobody and 5.1.1."""
    before = {u: len(pop3_messages(dovecot, u)) for u in USERS}
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        refused = client.sendmail(
            "bob@test.example", ["alice@test.example", "nobody@test.example"], message("half")
        )
    assert refused == {}  # 250 for both at SMTP: the message was accepted
    bounce = wait_until(
        lambda: (
            len(pop3_messages(dovecot, "bob")) == before["bob"] + 1
            and pop3_messages(dovecot, "bob")[-1]
        ),
        what="the bounce in bob's mailbox",
    )
    assert b"Content-Type: multipart/report; report-type=delivery-status" in bounce
    assert b"Final-Recipient: rfc822; nobody@test.example" in bounce
    assert b"Action: failed" in bounce and b"Status: 5.1.1" in bounce
    alice = pop3_messages(dovecot, "alice")
    assert len(alice) == before["alice"] + 1 and b"Subject: half" in alice[-1]
    wait_until(lambda: queue_empty(server), what="the queue to empty")
    (line,) = access_lines(server, "to=<nobody@test.example>")
    assert "outcome=bounced" in line and "status=5.1.1" in line
    assert "User doesn't exist" in line  # Dovecot's reply


def test_several_messages_in_a_row_share_one_lmtp_connection(dovecot, server):
    """(d) Connection reuse: three messages, each delivered before the next is
    sent, go over at most one new LMTP connection (an idle one a test before
    left in the cache may carry them all), RSET between them."""
    connections = lmtp_connections(dovecot)
    saved = delivered_count(dovecot)
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        for n in range(3):
            client.sendmail("carol@example.org", ["alice@test.example"], message(f"row{n}"))
            wait_until(lambda n=n: delivered_count(dovecot) == saved + n + 1, what=f"mail {n}")
    assert lmtp_connections(dovecot) - connections <= 1
    assert delivered_count(dovecot) == saved + 3


def test_a_dovecot_that_is_down_gets_the_mail_from_the_queue_once_up(make_server):
    """(b) Dovecot is not running yet (its UNIX socket is not there): the SMTP
    client still gets 250, the message waits in geosmtp's queue, deferred, and
    nothing is in Dovecot; once Dovecot is up, the queue delivers it, once."""
    require_dovecot_lmtp()
    dc = Dovecot(None, USERS, lmtp=True)
    try:
        server = make_server(geosmtp_config(str(dc.lmtp_socket)))
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
            client.sendmail("carol@example.org", ["alice@test.example"], message("later"))
        deferred = access_lines(server, "outcome=deferred", "to=<alice@test.example>")
        assert str(dc.lmtp_socket) in deferred[0]  # "connect to <socket>: No such file..."
        assert not queue_empty(server)
        assert not list(dc.mail_dir.glob("*/new/*")) and not list(dc.mail_dir.glob("*/cur/*"))
        dc.start()
        wait_until(lambda: queue_empty(server), timeout=15, what="the queue to deliver")
        mails = pop3_messages(dc, "alice")
        assert len(mails) == 1 and b"Subject: later" in mails[0]
        assert mails[0].endswith(b"\r\n\r\n" + BODY)
        (sent,) = access_lines(server, "outcome=sent")
        assert f"relay=lmtp:{dc.lmtp_socket}" in sent
    finally:
        dc.cleanup()


def test_lmtp_in_with_delivery_lmtp_queues_one_entry_and_delivers_every_recipient_once(
    dovecot, make_server
):
    """An `lmtp` listener in front of `delivery.lmtp` (geosmtp between an MTA
    and Dovecot): a transaction for two users is one queue entry, each
    recipient gets its 250, and Dovecot gets the message once for each."""
    config = geosmtp_config(f"{dovecot.host}:{dovecot.lmtp_port}")
    config["listeners"] = listeners("mx", "lmtp")
    server = make_server(config)
    before = {u: len(pop3_messages(dovecot, u)) for u in USERS}
    with smtplib.LMTP("127.0.0.1", server.ports["lmtp"], timeout=10) as client:
        replies = send(client, [f"{user}@test.example" for user in USERS], message("relayed"))
    assert [code for code, _ in replies] == [250, 250], replies  # one per recipient
    wait_until(lambda: queue_empty(server), what="the queue to deliver")
    for user in USERS:
        mails = pop3_messages(dovecot, user)
        assert len(mails) == before[user] + 1
        assert b"Subject: relayed" in mails[-1] and mails[-1].endswith(b"\r\n\r\n" + BODY)
    sent = access_lines(server, "outcome=sent", count=2)
    assert len({re.search(r" queue=(\S+)", line)[1] for line in sent}) == 1  # type: ignore[index]
