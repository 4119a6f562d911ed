"""The sans-I/O LMTP core (RFC 2033): bytes in, replies and events out.

Every script runs as the SMTP core's do (`smtp_helpers.run`): each step
whole, byte by byte, and pipelined in one chunk between two NOOPs; the
replies and events must not depend on how the bytes were cut up.
"""

from __future__ import annotations

import pytest

from geosmtp.lmtp import LMTPConnection, delivered
from geosmtp.mail import Envelope
from geosmtp.protocol import ProtocolError
from geosmtp.smtp import (
    Extensions,
    Limits,
    MessageEnd,
    RecipientPolicy,
    State,
    TransactionAborted,
    TransactionRejected,
)
from geosmtp.smtp import replies as R
from geosmtp.smtp.trace import trace_headers, with_protocol
from tests.unit.smtp_helpers import HOST, MODES, run

LHLO = b"LHLO mta.example.org\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
BODY = b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"
LHLO_REPLY = (
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-VRFY\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
)
SENDER_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
LHLO_ONLY = b"500 5.5.1 Error: this is LMTP; use LHLO\r\n"
UNKNOWN = b"500 5.5.2 Error: command not recognized\r\n"
NOT_LOCAL = b"550 5.1.1 Recipient address rejected: not a local mailbox\r\n"
UNKNOWN_USER = b"550 5.1.1 Recipient address rejected: user unknown\r\n"


def make_lmtp(**kwargs) -> LMTPConnection:
    policy = RecipientPolicy(
        local_domains=frozenset({"example.test"}),
        users=frozenset({"alice", "bob", "carol"}),
        accept_unknown=False,
    )
    # Every extension on: STARTTLS, AUTH and DSN are the LMTP core's to switch off.
    return LMTPConnection(HOST, policy, Limits(), Extensions(), **kwargs)


def rcpt(user: str, domain: str = "example.test") -> bytes:
    return f"RCPT TO:<{user}@{domain}>\r\n".encode()


def ok(address: str) -> bytes:
    return f"250 2.0.0 Ok: Q1 delivered to <{address}>\r\n".encode()


def outcomes(failing: dict[str, R.Reply]):
    """A shell whose mailboxes in `failing` fail with their reply; the rest are stored."""

    def on_end(conn: LMTPConnection, event: MessageEnd) -> None:
        conn.recipients_delivered(
            [
                failing.get(r.box or "", delivered("Q1", r.mailbox.address))
                for r in event.envelope.recipients
            ]
        )

    return on_end


def test_the_greeting_names_lmtp():
    assert make_lmtp().greeting() == b"220 mx.example.test LMTP geosmtp\r\n"


@pytest.mark.parametrize("mode", MODES)
def test_lhlo_is_answered_as_ehlo_without_starttls_auth_or_dsn(mode):
    res = run([LHLO], mode, make_lmtp())
    assert res.replies == LHLO_REPLY
    assert res.conn.state is State.GREETED and res.conn.helo == "mta.example.org"


@pytest.mark.parametrize("mode", MODES)
def test_lhlo_without_a_name_is_told_the_lhlo_syntax(mode):
    """Not EHLO's syntax: the client would be told to use a verb LMTP refuses."""
    res = run([b"LHLO\r\n", LHLO], mode, make_lmtp())
    assert res.replies == b"501 5.5.4 Syntax: LHLO hostname\r\n" + LHLO_REPLY
    assert res.conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_ehlo_and_helo_are_refused(mode, verb):
    res = run([verb + b" mta.example.org\r\n", MAIL], mode, make_lmtp())
    # Not greeted: MAIL then needs the LHLO first.
    assert res.replies == LHLO_ONLY + b"503 5.5.1 Error: send LHLO first\r\n"
    assert res.conn.state is State.CONNECTED


@pytest.mark.parametrize("mode", MODES)
def test_no_starttls_no_auth(mode):
    steps = [LHLO, b"STARTTLS\r\n", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"HELP\r\n"]
    res = run(steps, mode, make_lmtp())
    assert res.replies.startswith(LHLO_REPLY + UNKNOWN + UNKNOWN)
    assert b"214-LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP BDAT\r\n" in res.replies
    assert b"STARTTLS" not in res.replies and b"AUTH" not in res.replies


@pytest.mark.parametrize("mode", MODES)
def test_dsn_parameters_are_not_taken(mode):
    res = run([LHLO, b"MAIL FROM:<s@example.org> RET=FULL\r\n"], mode, make_lmtp())
    assert res.replies == LHLO_REPLY + R.BAD_PARAMETER.to_bytes()


@pytest.mark.parametrize("mode", MODES)
def test_one_reply_per_recipient_after_data_in_rcpt_order(mode):
    steps = [LHLO, MAIL, rcpt("carol"), rcpt("alice"), rcpt("bob"), b"DATA\r\n", BODY]
    on_end = outcomes({"alice": R.LOCAL_ERROR, "bob": R.INSUFFICIENT_STORAGE})
    res = run(steps, mode, make_lmtp(), on_end=on_end)
    assert res.replies == (
        LHLO_REPLY
        + SENDER_OK
        + RCPT_OK * 3
        + GO_AHEAD
        + ok("carol@example.test")
        + R.LOCAL_ERROR.to_bytes()
        + R.INSUFFICIENT_STORAGE.to_bytes()
    )
    assert res.messages == [b"Subject: hi\n\n.dot\nbody\n"]
    # The transaction is over; each failed recipient counts as an error, as a
    # failed SMTP message does (the session's error budget, limits.max_errors).
    assert res.conn.state is State.GREETED and res.conn.envelope is None
    assert res.conn.errors == 2


@pytest.mark.parametrize("mode", MODES)
def test_refused_recipients_get_no_reply_after_data(mode):
    steps = [
        LHLO,
        MAIL,
        rcpt("alice"),
        rcpt("alice", "elsewhere.example"),  # LMTP never relays
        rcpt("zed"),  # no such user
        rcpt("bob"),
        b"DATA\r\n",
        BODY,
    ]
    res = run(steps, mode, make_lmtp(), on_end=outcomes({}))
    assert res.replies == (
        LHLO_REPLY
        + SENDER_OK
        + RCPT_OK
        + NOT_LOCAL
        + UNKNOWN_USER
        + RCPT_OK
        + GO_AHEAD
        + ok("alice@example.test")
        + ok("bob@example.test")
    )
    refused = [(e.address, e.reply.code) for e in res.of(TransactionRejected)]
    assert refused == [("alice@elsewhere.example", 550), ("zed@example.test", 550)]


@pytest.mark.parametrize("mode", MODES)
def test_bdat_last_is_answered_per_recipient(mode):
    steps = [LHLO, MAIL, rcpt("alice"), rcpt("bob"), b"BDAT 6\r\nhello\n", b"BDAT 4 LAST\r\nbye\n"]
    res = run(steps, mode, make_lmtp(), on_end=outcomes({"bob": R.LOCAL_ERROR}))
    assert res.replies == (
        LHLO_REPLY
        + SENDER_OK
        + RCPT_OK * 2
        + b"250 2.0.0 Ok: 6 octets received\r\n"
        + ok("alice@example.test")
        + R.LOCAL_ERROR.to_bytes()
    )
    assert res.messages == [b"hello\nbye\n"]


@pytest.mark.parametrize("mode", MODES)
def test_message_stored_and_failed_answer_every_recipient(mode):
    steps = [LHLO, MAIL, rcpt("alice"), rcpt("bob"), b"DATA\r\n", BODY] * 2

    ended: list[MessageEnd] = []

    def on_end(conn: LMTPConnection, event: MessageEnd) -> None:
        ended.append(event)  # the first message is stored, the second is not
        if len(ended) == 1:
            conn.message_stored("Q1")
        else:
            conn.message_failed(R.INSUFFICIENT_STORAGE)

    res = run(steps, mode, make_lmtp(), on_end=on_end)
    after = res.replies.split(GO_AHEAD)
    assert after[1].startswith(ok("alice@example.test") + ok("bob@example.test"))
    assert after[2] == R.INSUFFICIENT_STORAGE.to_bytes() * 2


@pytest.mark.parametrize("mode", MODES)
def test_a_new_lhlo_abandons_the_transaction(mode):
    res = run([LHLO, MAIL, rcpt("alice"), LHLO], mode, make_lmtp())
    assert res.replies == LHLO_REPLY + SENDER_OK + RCPT_OK + LHLO_REPLY
    assert [e.by for e in res.of(TransactionAborted)] == ["LHLO"]


def ended_message() -> tuple[LMTPConnection, MessageEnd]:
    conn = make_lmtp()
    conn.greeting()
    conn.receive_data(LHLO + MAIL + rcpt("alice") + rcpt("bob") + b"DATA\r\n" + BODY)
    while not isinstance(event := conn.next_event(), MessageEnd):
        pass
    return conn, event


def test_a_verdict_with_the_wrong_number_of_replies_is_a_misuse():
    conn, _ = ended_message()
    with pytest.raises(ProtocolError, match="1 replies for 2 recipients"):
        conn.recipients_delivered([delivered("Q1", "alice@example.test")])
    assert conn.state is State.ERROR


def test_a_verdict_with_a_3xx_reply_is_a_misuse():
    conn, _ = ended_message()
    with pytest.raises(ProtocolError):
        conn.recipients_delivered([R.START_DATA, R.LOCAL_ERROR])
    assert conn.state is State.ERROR


def test_a_verdict_nobody_asked_for_is_a_misuse():
    conn = make_lmtp()
    conn.greeting()
    with pytest.raises(ProtocolError):
        conn.recipients_delivered([])
    assert conn.state is State.ERROR


@pytest.mark.parametrize(
    ("smtputf8", "tls", "keyword"),
    [(False, False, "LMTP"), (False, True, "LMTPS"), (True, False, "UTF8LMTP")],
)
def test_the_received_field_says_lmtp(smtputf8, tls, keyword):
    env = Envelope("mta.example.org", True, None, smtputf8=smtputf8)
    assert with_protocol(env, tls=tls, protocol="lmtp") == keyword
    raw = trace_headers(
        env, hostname=HOST, client_ip="unix", queue_id="Q1", date="d", tls=tls, protocol="lmtp"
    )
    assert f"(geosmtp) with {keyword} id Q1".encode() in raw


@pytest.mark.parametrize("mode", MODES)
def test_too_many_errors_closes_after_the_last_recipients_reply(mode):
    # max_errors 2: the budget runs out among the replies after the message. The
    # 421 must come after all of them, or every later reply would be read as
    # the next recipient's (a 250 for a recipient whose delivery failed).
    conn = LMTPConnection(
        HOST,
        make_lmtp().policy,
        Limits(max_errors=2),
        Extensions(),
    )
    steps = [LHLO, MAIL, rcpt("alice"), rcpt("bob"), rcpt("carol"), b"DATA\r\n", BODY]
    on_end = outcomes({"alice": R.LOCAL_ERROR, "bob": R.LOCAL_ERROR})
    res = run([*steps, b"NOOP\r\n"], mode, conn, on_end=on_end)
    assert res.replies.split(GO_AHEAD)[1] == (
        R.LOCAL_ERROR.to_bytes() * 2 + ok("carol@example.test") + R.TOO_MANY_ERRORS.to_bytes()
    )
    assert res.conn.state is State.CLOSED
