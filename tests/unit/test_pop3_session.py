"""The sans-I/O POP3 session: every command, its replies and events, whole,
byte by byte and pipelined (see `pop3_helpers.run`)."""

from __future__ import annotations

import base64

import pytest

from geosmtp.pop3 import (
    AuthRequest,
    Listing,
    LoginFailure,
    POP3Security,
    Retrieve,
    StartTLS,
    State,
    Update,
)
from geosmtp.pop3 import replies as R
from geosmtp.protocol import NEED_DATA, CloseConnection, ConnectionClosed
from geosmtp.protocol.sasl import MAX_AUTH_LINE, Credentials

from .pop3_helpers import (
    AUTH_FAILED,
    HANDSHAKE,
    HOST,
    IMPLICIT,
    LISTING,
    LOGGED_IN,
    LOGIN,
    LOGIN_REPLIES,
    MESSAGES,
    MODES,
    NEEDS_TLS,
    NOT_LOGGED_IN,
    PASS,
    PLAIN_OK,
    TOTAL,
    UNKNOWN,
    USER,
    USER_OK,
    encoded,
    logged_in,
    make_conn,
    run,
)

SIZES = [entry.size for entry in LISTING]
NEEDS_TLS_ERR = b"-ERR [AUTH] Plaintext authentication is not allowed without TLS.\r\n"
NO_SUCH = b"-ERR No such message.\r\n"
DELETED = b"-ERR Message is deleted.\r\n"
BAD_NUMBER = b"-ERR Invalid message number.\r\n"
OK = b"+OK\r\n"
ALREADY = b"-ERR Already logged in.\r\n"
SIGN_OFF = f"+OK {HOST} POP3 server signing off\r\n".encode()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def capa(*names: str) -> bytes:
    lines = "".join(f"{n}\r\n" for n in names)
    return f"+OK Capability list follows\r\n{lines}.\r\n".encode()


BASE_CAPA = ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING")
LOGIN_CAPA = ("USER", "SASL PLAIN LOGIN")
IMPL = "IMPLEMENTATION geosmtp"


def test_greeting():
    conn = make_conn()
    assert conn.greeting() == b"+OK pop.example.test POP3 server ready\r\n"
    assert conn.state is State.AUTHORIZATION and conn.user is None and not conn.tls


# ------------------------------------------------------------------------ CAPA


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("security", "names"),
    [
        (PLAIN_OK, (*BASE_CAPA, *LOGIN_CAPA, "STLS", IMPL)),
        (NEEDS_TLS, (*BASE_CAPA, "STLS", IMPL)),
        (IMPLICIT, (*BASE_CAPA, *LOGIN_CAPA, IMPL)),
        (POP3Security(), (*BASE_CAPA, IMPL)),
        (POP3Security(auth_plaintext=True), (*BASE_CAPA, *LOGIN_CAPA, IMPL)),
    ],
)
def test_capa_before_login(mode, security, names):
    res = run(b"CAPA\r\n", mode, make_conn(security))
    assert res.replies == capa(*names)
    assert res.conn.commands == 1


@pytest.mark.parametrize("mode", MODES)
def test_capa_after_stls_offers_login_and_no_stls(mode):
    res = run([b"STLS\r\n", HANDSHAKE, b"CAPA\r\n"], mode, make_conn(NEEDS_TLS))
    assert res.replies == b"+OK Begin TLS negotiation.\r\n" + capa(*BASE_CAPA, *LOGIN_CAPA, IMPL)
    assert res.conn.tls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("security", [PLAIN_OK, IMPLICIT])
def test_capa_after_login_has_no_login_or_stls(mode, security):
    res = run([*LOGIN, b"capa\r\n"], mode, make_conn(security))
    assert res.replies == LOGIN_REPLIES + capa(*BASE_CAPA, IMPL)


def test_capa_takes_no_argument():
    assert run(b"CAPA x\r\n", "whole").replies == b"-ERR Syntax: CAPA\r\n"


# ------------------------------------------------------------------ USER / PASS


@pytest.mark.parametrize("mode", MODES)
def test_user_pass_logs_in(mode):
    res = run(LOGIN, mode)
    assert res.replies == LOGIN_REPLIES
    assert res.events == [AuthRequest(Credentials("USER", "alice", "secret"))]
    assert res.events[0].credentials.password == "secret"
    conn = res.conn
    assert conn.state is State.TRANSACTION and conn.user == "alice"
    assert conn.listing == tuple(LISTING) and conn.deleted == set()


@pytest.mark.parametrize("mode", MODES)
def test_pass_takes_the_rest_of_the_line(mode):
    res = run([b"user bob\r\n", b"pass two words\r\n"], mode)
    assert res.replies == LOGIN_REPLIES
    assert res.events[0].credentials.password == "two words"


@pytest.mark.parametrize("mode", MODES)
def test_bare_lf_line_ends(mode):
    res = run([b"USER alice\n", b"PASS secret\n", b"STAT\n"], mode)
    assert res.replies == LOGIN_REPLIES + f"+OK 3 {TOTAL}\r\n".encode()


@pytest.mark.parametrize("mode", MODES)
def test_wrong_password_forgets_user(mode):
    res = run([USER, b"PASS wrong\r\n", PASS, USER, PASS], mode)
    assert res.replies == (USER_OK + AUTH_FAILED + b"-ERR Send USER first.\r\n" + LOGIN_REPLIES)
    assert res.conn.state is State.TRANSACTION
    assert len(res.of(AuthRequest)) == 2


@pytest.mark.parametrize(
    ("script", "replies"),
    [
        ([PASS], b"-ERR Send USER first.\r\n"),
        ([b"USER\r\n"], b"-ERR Syntax: USER name\r\n"),
        ([b"USER   \r\n"], b"-ERR Syntax: USER name\r\n"),
        ([USER, b"PASS\r\n"], USER_OK + b"-ERR Syntax: PASS password\r\n"),
        ([b"USER \xff\xfe\r\n"], b"-ERR [AUTH] Invalid user name.\r\n"),
        ([USER, b"PASS \xff\r\n"], USER_OK + AUTH_FAILED),
        # a second USER replaces the first
        ([b"USER bob\r\n", USER, PASS], USER_OK + LOGIN_REPLIES),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_user_pass_errors(mode, script, replies):
    res = run(script, mode)
    assert res.replies == replies


def test_after_a_bad_password_encoding_user_is_forgotten():
    res = run([USER, b"PASS \xff\r\n", PASS], "whole")
    assert res.replies == USER_OK + AUTH_FAILED + b"-ERR Send USER first.\r\n"
    assert res.events == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "line", [USER, PASS, b"AUTH\r\n", b"AUTH PLAIN\r\n", b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n"]
)
def test_login_needs_tls(mode, line):
    res = run(line, mode, make_conn(NEEDS_TLS))
    assert res.replies == NEEDS_TLS_ERR
    assert res.events == [] and res.conn.state is State.AUTHORIZATION


@pytest.mark.parametrize("mode", MODES)
def test_login_after_stls(mode):
    res = run([b"STLS\r\n", HANDSHAKE, *LOGIN], mode, make_conn(NEEDS_TLS))
    assert res.replies == b"+OK Begin TLS negotiation.\r\n" + LOGIN_REPLIES
    assert res.conn.state is State.TRANSACTION


@pytest.mark.parametrize(
    ("why", "text", "line"),
    [
        (LoginFailure.AUTH, None, AUTH_FAILED),
        (LoginFailure.IN_USE, None, b"-ERR [IN-USE] Mailbox is locked by another session.\r\n"),
        (LoginFailure.TEMP, None,
         b"-ERR [SYS/TEMP] Temporary server failure; try again later.\r\n"),
        (LoginFailure.PERM, None, b"-ERR [SYS/PERM] The mailbox cannot be opened.\r\n"),
        (LoginFailure.TEMP, "Too many failures; wait.",
         b"-ERR [SYS/TEMP] Too many failures; wait.\r\n"),
        # the shell's text is made one safe line
        (LoginFailure.PERM, "a\r\n+OK injected\x00", b"-ERR [SYS/PERM] a +OK injected\r\n"),
    ],
)  # fmt: skip
def test_login_failed_codes(why, text, line):
    def refuse(conn, event):
        conn.login_failed(why, text)

    res = run([USER, PASS, PASS], "whole", on_auth=refuse)
    assert res.replies == USER_OK + line + b"-ERR Send USER first.\r\n"
    assert res.conn.state is State.AUTHORIZATION and res.conn.user is None
    assert res.conn.bad_commands == 1  # the refused login itself is not counted


def test_login_failed_text_is_bounded():
    conn = make_conn()
    conn.receive_data(USER + PASS)
    while not isinstance(conn.next_event(), AuthRequest):
        pass
    conn.login_failed(LoginFailure.TEMP, "x" * 5000)
    line = conn.data_to_send().split(b"\r\n")[1]
    assert line.startswith(b"-ERR [SYS/TEMP] xxx") and len(line) <= R.MAX_TEXT + 20


# ------------------------------------------------------------------------ AUTH


def plain(login: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return b64(authzid + b"\0" + login + b"\0" + password)


CHALLENGE = b"+ \r\n"
ASK_USER = b"+ VXNlcm5hbWU6\r\n"
ASK_PASS = b"+ UGFzc3dvcmQ6\r\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("script", "replies", "creds"),
    [
        ([b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n"], LOGGED_IN,
         Credentials("PLAIN", "alice", "secret")),
        ([b"auth plain\r\n", plain(b"alice", b"secret") + b"\r\n"], CHALLENGE + LOGGED_IN,
         Credentials("PLAIN", "alice", "secret")),
        ([b"AUTH PLAIN " + plain(b"alice", b"secret", b"alice") + b"\r\n"], LOGGED_IN,
         Credentials("PLAIN", "alice", "secret")),
        ([b"AUTH LOGIN\r\n", b64(b"alice") + b"\r\n", b64(b"secret") + b"\r\n"],
         ASK_USER + ASK_PASS + LOGGED_IN, Credentials("LOGIN", "alice", "secret")),
        ([b"AUTH LOGIN " + b64(b"alice") + b"\r\n", b64(b"secret") + b"\r\n"],
         ASK_PASS + LOGGED_IN, Credentials("LOGIN", "alice", "secret")),
        ([b"AUTH PLAIN " + plain(b"bob", b"two words") + b"\n"], LOGGED_IN,
         Credentials("PLAIN", "bob", "two words")),
        ([b"AUTH LOGIN\r\n", b64(b"alice") + b"\r\n", b64(b"nope") + b"\r\n"],
         ASK_USER + ASK_PASS + AUTH_FAILED, Credentials("LOGIN", "alice", "nope")),
    ],
)  # fmt: skip
def test_auth(mode, script, replies, creds):
    res = run(script, mode)
    assert res.replies == replies
    assert res.events == [AuthRequest(creds)]
    assert res.events[0].credentials.password == creds.password


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("script", "replies"),
    [
        ([b"AUTH\r\n"], b"+OK Authentication mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
        ([b"AUTH PLAIN\r\n", b"*\r\n"], CHALLENGE + b"-ERR Authentication cancelled.\r\n"),
        ([b"AUTH LOGIN\r\n", b64(b"alice") + b"\r\n", b"*\r\n"],
         ASK_USER + ASK_PASS + b"-ERR Authentication cancelled.\r\n"),
        ([b"AUTH PLAIN\r\n", b"not base64!\r\n"],
         CHALLENGE + b"-ERR Cannot decode the base64 response.\r\n"),
        ([b"AUTH PLAIN not-base64\r\n"], b"-ERR Cannot decode the base64 response.\r\n"),
        # "=" is an empty initial response (RFC 5034 §4): not a valid PLAIN message
        ([b"AUTH PLAIN =\r\n"], b"-ERR Malformed authentication response.\r\n"),
        ([b"AUTH LOGIN =\r\n"], b"-ERR Malformed authentication response.\r\n"),
        ([b"AUTH PLAIN " + b64(b"alice\0secret") + b"\r\n"],
         b"-ERR Malformed authentication response.\r\n"),
        ([b"AUTH PLAIN " + plain(b"alice", b"secret", b"bob") + b"\r\n"], AUTH_FAILED),
        ([b"AUTH CRAM-MD5\r\n"], b"-ERR Unsupported authentication mechanism.\r\n"),
        ([b"AUTH \xff\xfe\r\n"], b"-ERR Unsupported authentication mechanism.\r\n"),
        ([b"AUTH PLAIN a b\r\n"], b"-ERR Syntax: AUTH [mechanism [initial-response]]\r\n"),
    ],
)  # fmt: skip
def test_auth_errors(mode, script, replies):
    res = run([*script, b"CAPA\r\n"], mode)
    assert res.replies.startswith(replies)
    assert res.replies[len(replies) :].startswith(b"+OK Capability list follows\r\n")
    assert res.events == [] and res.conn.state is State.AUTHORIZATION


@pytest.mark.parametrize("mode", ["whole", "pipelined"])
def test_auth_response_too_long(mode):
    long = b"A" * (MAX_AUTH_LINE + 10) + b"\r\n"
    res = run([b"AUTH PLAIN\r\n", long, b"CAPA\r\n"], mode)
    assert res.replies.startswith(CHALLENGE + b"-ERR Authentication line too long.\r\n+OK Cap")
    assert res.conn.commands == 2  # the response is not a command


@pytest.mark.parametrize("mode", MODES)
def test_a_long_auth_line_is_accepted(mode):
    """RFC 5034 asks clients for at most 255 octets; a longer initial response
    (a long password) is taken as SMTP takes it."""
    password = b"p" * 400
    line = b"AUTH PLAIN " + plain(b"alice", password) + b"\r\n"
    assert len(line) > 255
    res = run(line, mode, on_auth=lambda c, e: c.login_ok(LISTING))
    assert res.replies == LOGGED_IN
    assert res.events[0].credentials.password == password.decode()


def test_a_long_line_that_is_not_auth_is_too_long():
    res = run([b"USER " + b"a" * 300 + b"\r\n", b"CAPA\r\n"], "whole")
    assert res.replies.startswith(b"-ERR Line too long.\r\n+OK Capability")


# ------------------------------------------------------------------------ STLS


@pytest.mark.parametrize("mode", MODES)
def test_stls(mode):
    res = run([b"STLS\r\n", HANDSHAKE, *LOGIN], mode, make_conn(NEEDS_TLS))
    assert res.events[0] == StartTLS()
    assert res.conn.tls and res.conn.state is State.TRANSACTION


@pytest.mark.parametrize("mode", MODES)
def test_stls_discards_what_came_with_it(mode):
    """STARTTLS command injection (RFC 2595 §4; CVE-2011-0411): commands sent
    in the clear behind STLS are never run after the handshake."""
    conn = make_conn(PLAIN_OK)
    res = run([b"STLS\r\nUSER alice\r\nPASS secret\r\n", HANDSHAKE, b"CAPA\r\n"], mode, conn)
    assert res.replies == b"+OK Begin TLS negotiation.\r\n" + capa(*BASE_CAPA, *LOGIN_CAPA, IMPL)
    assert res.events == [StartTLS()]
    assert conn.state is State.AUTHORIZATION and conn.commands == 2


def test_input_during_the_handshake_is_discarded():
    conn = make_conn(PLAIN_OK)
    conn.receive_data(b"STLS\r\n")
    assert conn.next_event() == StartTLS()
    conn.receive_data(b"USER alice\r\nPASS secret\r\n")  # still in the clear
    conn.tls_started()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"+OK Begin TLS negotiation.\r\n"


def test_user_before_stls_is_forgotten():
    res = run([USER, b"STLS\r\n", HANDSHAKE, PASS], "whole", make_conn(PLAIN_OK))
    assert res.replies == USER_OK + b"+OK Begin TLS negotiation.\r\n" + b"-ERR Send USER first.\r\n"


@pytest.mark.parametrize(
    ("security", "script", "replies"),
    [
        (POP3Security(), [b"STLS\r\n"], b"-ERR TLS is not available.\r\n"),
        (IMPLICIT, [b"STLS\r\n"], b"-ERR TLS is already active.\r\n"),
        (NEEDS_TLS, [b"STLS now\r\n"], b"-ERR Syntax: STLS\r\n"),
        (PLAIN_OK, [*LOGIN, b"STLS\r\n"],
         LOGIN_REPLIES + b"-ERR STLS is only allowed before login.\r\n"),
        (NEEDS_TLS, [b"STLS\r\n", HANDSHAKE, b"STLS\r\n"],
         b"+OK Begin TLS negotiation.\r\n-ERR TLS is already active.\r\n"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mode", MODES)
def test_stls_refused(mode, security, script, replies):
    res = run(script, mode, make_conn(security))
    assert res.replies == replies
    assert res.of(StartTLS) == ([StartTLS()] if HANDSHAKE in script else [])


# ------------------------------------------------------------------------ QUIT


@pytest.mark.parametrize("mode", MODES)
def test_quit_before_login_has_no_update(mode):
    res = run([USER, b"QUIT\r\n", b"CAPA\r\n"], mode)
    assert res.replies == USER_OK + SIGN_OFF
    assert res.events == [CloseConnection(R.signing_off(HOST))]
    assert res.events[0].reply.to_bytes() == SIGN_OFF  # the reply sent, as a value
    assert res.conn.state is State.CLOSED and res.conn.closed_in is State.AUTHORIZATION


@pytest.mark.parametrize("mode", MODES)
def test_quit_with_nothing_deleted_still_updates(mode):
    res = run([*LOGIN, b"QUIT\r\n"], mode)
    assert res.events[1:] == [Update(()), CloseConnection(R.updated(HOST, 3))]
    assert (
        res.replies
        == LOGIN_REPLIES + f"+OK {HOST} POP3 server signing off (3 messages left)\r\n".encode()
    )
    assert res.conn.closed_in is State.UPDATE


@pytest.mark.parametrize("mode", MODES)
def test_quit_removes_what_was_deleted(mode):
    res = run([*LOGIN, b"DELE 3\r\n", b"DELE 1\r\n", b"QUIT\r\n", b"NOOP\r\n"], mode)
    assert res.of(Update) == [Update((0, 2))]
    assert res.replies == LOGIN_REPLIES + b"+OK Message marked to be deleted.\r\n" * 2 + (
        f"+OK {HOST} POP3 server signing off (1 message left)\r\n".encode()
    )
    assert isinstance(res.events[-1], CloseConnection)


def test_quit_with_everything_deleted():
    conn = logged_in()
    res = run([b"DELE 1\r\nDELE 2\r\nDELE 3\r\n", b"QUIT\r\n"], "whole", conn)
    assert res.replies.endswith(b"signing off (maildrop empty)\r\n")


@pytest.mark.parametrize(
    ("failed", "line"),
    [
        (0, b"-ERR [SYS/TEMP] Some deleted messages were not removed.\r\n"),
        (1, b"-ERR [SYS/TEMP] Could not remove 1 of 2 deleted messages.\r\n"),
        (2, b"-ERR [SYS/TEMP] Could not remove 2 of 2 deleted messages.\r\n"),
    ],
)
def test_update_that_failed(failed, line):
    conn = logged_in()
    conn.receive_data(b"DELE 1\r\nDELE 2\r\nQUIT\r\n")
    assert conn.next_event() == Update((0, 1))
    assert conn.state is State.UPDATE
    conn.update_result(False, failed)
    assert conn.next_event() == CloseConnection(R.not_updated(failed, 2))
    assert conn.data_to_send() == b"+OK Message marked to be deleted.\r\n" * 2 + line
    assert conn.next_event() == ConnectionClosed() and conn.state is State.CLOSED


def test_quit_takes_no_argument():
    res = run([*LOGIN, b"QUIT now\r\n"], "whole")
    assert res.replies == LOGIN_REPLIES + b"-ERR Syntax: QUIT\r\n"
    assert res.conn.state is State.TRANSACTION


# ----------------------------------------------------------------- TRANSACTION


def scan(*entries: tuple[int, int]) -> bytes:
    count, octets = len(entries), sum(size for _, size in entries)
    noun = "message" if count == 1 else "messages"
    head = f"+OK {count} {noun} ({octets} octets)\r\n"
    return (head + "".join(f"{n} {s}\r\n" for n, s in entries) + ".\r\n").encode()


def uidl(*numbers: int) -> bytes:
    lines = "".join(f"{n} uid-{n}\r\n" for n in numbers)
    return f"+OK Unique-ID listing follows\r\n{lines}.\r\n".encode()


ALL = [(1, SIZES[0]), (2, SIZES[1]), (3, SIZES[2])]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("script", "replies"),
    [
        ([b"STAT\r\n"], f"+OK 3 {TOTAL}\r\n".encode()),
        ([b"LIST\r\n"], scan(*ALL)),
        ([b"LIST 2\r\n"], f"+OK 2 {SIZES[1]}\r\n".encode()),
        ([b"UIDL\r\n"], uidl(1, 2, 3)),
        ([b"UIDL 3\r\n"], b"+OK 3 uid-3\r\n"),
        ([b"NOOP\r\n"], OK),
        ([b"stat\r\n", b"Noop\r\n"], f"+OK 3 {TOTAL}\r\n".encode() + OK),
        ([b"DELE 2\r\n", b"STAT\r\n", b"LIST\r\n", b"UIDL\r\n"],
         b"+OK Message marked to be deleted.\r\n"
         + f"+OK 2 {SIZES[0] + SIZES[2]}\r\n".encode()
         + scan(ALL[0], ALL[2]) + uidl(1, 3)),
        ([b"DELE 2\r\n", b"DELE 2\r\n", b"LIST 2\r\n", b"UIDL 2\r\n", b"RETR 2\r\n",
          b"TOP 2 1\r\n"],
         b"+OK Message marked to be deleted.\r\n" + DELETED * 5),
        ([b"DELE 1\r\n", b"DELE 3\r\n", b"RSET\r\n", b"LIST\r\n"],
         b"+OK Message marked to be deleted.\r\n" * 2
         + f"+OK maildrop has 3 messages ({TOTAL} octets)\r\n".encode() + scan(*ALL)),
        ([b"DELE 1\r\n", b"DELE 2\r\n", b"DELE 3\r\n", b"LIST\r\n", b"STAT\r\n"],
         b"+OK Message marked to be deleted.\r\n" * 3
         + b"+OK 0 messages (0 octets)\r\n.\r\n+OK 0 0\r\n"),
    ],
)  # fmt: skip
def test_transaction_commands(mode, script, replies):
    res = run([*LOGIN, *script], mode)
    assert res.replies == LOGIN_REPLIES + replies
    assert res.conn.state is State.TRANSACTION


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("number", [1, 2, 3])
def test_retr_streams_the_message(mode, number):
    res = run([*LOGIN, b"RETR %d\r\n" % number, b"NOOP\r\n"], mode)
    size = SIZES[number - 1]
    body = encoded(MESSAGES[number - 1])
    assert res.replies == LOGIN_REPLIES + b"+OK %d octets\r\n" % size + body + OK
    assert res.of(Retrieve) == [Retrieve(number, number - 1, None)]


def test_the_messages_on_the_wire():
    """The harness's three messages, as RETR sends them (byte-stuffed, CRLF)."""
    assert encoded(MESSAGES[1]) == (
        b"Subject: two\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n.\r\n"
    )
    assert encoded(MESSAGES[2]) == b"Subject: three\r\n\r\nno final line end\r\n.\r\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("number", "lines", "sent"),
    [
        (1, 0, b"Subject: one\r\nFrom: a@example.test\r\n\r\n"),
        (1, 1, b"Subject: one\r\nFrom: a@example.test\r\n\r\nHello.\r\n"),
        (1, 99, b"Subject: one\r\nFrom: a@example.test\r\n\r\nHello.\r\nSecond line.\r\n"),
        (2, 2, b"Subject: two\r\n\r\n..leading dot\r\n...two dots\r\n"),
        (3, 5, b"Subject: three\r\n\r\nno final line end\r\n"),
    ],
)
def test_top(mode, number, lines, sent):
    res = run([*LOGIN, b"TOP %d %d\r\n" % (number, lines), b"NOOP\r\n"], mode)
    assert res.replies == LOGIN_REPLIES + OK + sent + b".\r\n" + OK
    assert res.of(Retrieve) == [Retrieve(number, number - 1, lines)]


@pytest.mark.parametrize("mode", MODES)
def test_retr_in_a_pipelined_batch_waits_for_the_shell(mode):
    """Replies after a RETR come after the message the shell streamed."""
    script = [*LOGIN, b"STAT\r\n", b"RETR 1\r\n", b"DELE 1\r\n", b"TOP 2 0\r\n", b"STAT\r\n"]
    res = run(script, mode)
    assert res.replies == (
        LOGIN_REPLIES
        + f"+OK 3 {TOTAL}\r\n".encode()
        + b"+OK %d octets\r\n" % SIZES[0]
        + encoded(MESSAGES[0])
        + b"+OK Message marked to be deleted.\r\n"
        + OK
        + encoded(MESSAGES[1], 0)
        + f"+OK 2 {TOTAL - SIZES[0]}\r\n".encode()
    )


def test_nothing_is_processed_until_retrieve_result():
    conn = logged_in()
    conn.receive_data(b"RETR 1\r\nDELE 1\r\nNOOP\r\n")
    assert conn.next_event() == Retrieve(1, 0, None)
    assert conn.state is State.RETRIEVING
    assert conn.deleted == set() and conn.data_to_send() == b""
    conn.retrieve_result(True)
    assert conn.data_to_send() == b"+OK %d octets\r\n" % SIZES[0]
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"+OK Message marked to be deleted.\r\n" + OK


def test_retrieve_that_failed():
    conn = logged_in()
    conn.receive_data(b"RETR 2\r\nTOP 1 3\r\nSTAT\r\n")
    for _ in range(2):
        assert isinstance(conn.next_event(), Retrieve)
        conn.retrieve_result(False)
    assert conn.next_event() is NEED_DATA
    failed = b"-ERR [SYS/TEMP] Cannot read the message now; try again later.\r\n"
    assert conn.data_to_send() == failed * 2 + f"+OK 3 {TOTAL}\r\n".encode()
    assert conn.bad_commands == 0  # the server's failure, not the client's


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RETR 0\r\n", NO_SUCH),
        (b"RETR 4\r\n", NO_SUCH),
        (b"RETR 99999999999999999999\r\n", NO_SUCH),
        (b"RETR 00000000000000000001\r\n", NO_SUCH),  # more digits than a number has
        (b"RETR 01\r\n", b""),  # leading zero: still message 1
        (b"RETR -1\r\n", BAD_NUMBER),
        (b"RETR +1\r\n", BAD_NUMBER),
        (b"RETR 1a\r\n", BAD_NUMBER),
        (b"RETR \xd9\xa1\r\n", BAD_NUMBER),  # ARABIC-INDIC DIGIT ONE
        (b"LIST 4\r\n", NO_SUCH),
        (b"LIST x\r\n", BAD_NUMBER),
        (b"UIDL 0\r\n", NO_SUCH),
        (b"DELE 4\r\n", NO_SUCH),
        (b"TOP 4 0\r\n", NO_SUCH),
        (b"TOP x 0\r\n", BAD_NUMBER),
        (b"RETR\r\n", b"-ERR Syntax: RETR msg\r\n"),
        (b"RETR 1 2\r\n", b"-ERR Syntax: RETR msg\r\n"),
        (b"DELE\r\n", b"-ERR Syntax: DELE msg\r\n"),
        (b"DELE 1 2\r\n", b"-ERR Syntax: DELE msg\r\n"),
        (b"LIST 1 2\r\n", b"-ERR Syntax: LIST [msg]\r\n"),
        (b"UIDL 1 2\r\n", b"-ERR Syntax: UIDL [msg]\r\n"),
        (b"TOP 1\r\n", b"-ERR Syntax: TOP msg n\r\n"),
        (b"TOP 1 -1\r\n", b"-ERR Syntax: TOP msg n\r\n"),
        (b"TOP 1 x\r\n", b"-ERR Syntax: TOP msg n\r\n"),
        (b"TOP 1 2 3\r\n", b"-ERR Syntax: TOP msg n\r\n"),
        (b"STAT 1\r\n", b"-ERR Syntax: STAT\r\n"),
        (b"NOOP 1\r\n", b"-ERR Syntax: NOOP\r\n"),
        (b"RSET 1\r\n", b"-ERR Syntax: RSET\r\n"),
        (b"USER alice\r\n", ALREADY),
        (b"PASS secret\r\n", ALREADY),
        (b"AUTH PLAIN\r\n", ALREADY),
        (b"AUTH\r\n", ALREADY),
    ],
)
def test_transaction_errors(mode, line, reply):
    res = run([*LOGIN, line, b"NOOP\r\n"], mode)
    if reply:
        assert res.replies == LOGIN_REPLIES + reply + OK
        assert res.events[1:] == []
    else:
        assert res.of(Retrieve) == [Retrieve(1, 0, None)]
    assert res.conn.state is State.TRANSACTION and res.conn.deleted == set()


def test_top_with_a_huge_count_asks_for_everything():
    conn = logged_in()
    conn.receive_data(b"TOP 1 99999999999999999999\r\n")
    assert conn.next_event() == Retrieve(1, 0, 99999999999999999999)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "line", [b"STAT\r\n", b"LIST\r\n", b"RETR 1\r\n", b"DELE 1\r\n", b"NOOP\r\n", b"RSET\r\n",
             b"TOP 1 1\r\n", b"UIDL\r\n", b"uidl 1\r\n"]
)  # fmt: skip
def test_transaction_commands_need_a_login(mode, line):
    res = run(line, mode)
    assert res.replies == NOT_LOGGED_IN and res.events == []


def test_an_empty_maildrop():
    res = run([b"USER bob\r\n", b"PASS two words\r\n", b"STAT\r\n", b"LIST\r\n", b"UIDL\r\n",
               b"RETR 1\r\n", b"QUIT\r\n"], "whole")  # fmt: skip
    assert res.replies == LOGIN_REPLIES + (
        b"+OK 0 0\r\n+OK 0 messages (0 octets)\r\n.\r\n"
        b"+OK Unique-ID listing follows\r\n.\r\n"
        + NO_SUCH
        + f"+OK {HOST} POP3 server signing off (maildrop empty)\r\n".encode()
    )
    assert res.of(Update) == [Update(())]


def test_listing_total_and_sizes_of_many():
    conn = make_conn()
    listing = [Listing(n * 10, f"u{n}") for n in range(1, 101)]
    run(LOGIN, "whole", conn, on_auth=lambda c, e: c.login_ok(listing))
    assert conn.listing_total() == (100, 50500)
    run([b"DELE 100\r\n", b"DELE 1\r\n"], "whole", conn)
    assert conn.listing_total() == (98, 50500 - 1010)
    assert conn.deleted == {0, 99}


def test_multiline_replies_are_byte_stuffed():
    listing = [Listing(1, ".hidden"), Listing(2, "..")]
    conn = make_conn()
    run(LOGIN, "whole", conn, on_auth=lambda c, e: c.login_ok(listing))
    res = run(b"UIDL\r\n", "whole", conn)
    # a uid never starts a line (the message number does), but the rule holds
    assert res.replies == b"+OK Unique-ID listing follows\r\n1 .hidden\r\n2 ..\r\n.\r\n"
    assert R.multiline(R.OK, [".a", "b", "."]).to_bytes() == b"+OK\r\n..a\r\nb\r\n..\r\n.\r\n"


# ----------------------------------------------------------- lines and errors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"\r\n", b"-ERR Empty command.\r\n"),
        (b"   \r\n", b"-ERR Empty command.\r\n"),
        (b"\n", b"-ERR Empty command.\r\n"),
        (b"FOO\r\n", UNKNOWN),
        (b"APOP alice 0123456789abcdef\r\n", UNKNOWN),
        (b"STATS\r\n", UNKNOWN),
        (b"CAPABILITY\r\n", UNKNOWN),
        (b" CAPA\r\n", UNKNOWN),
        (b"CAPA\r\r\n", UNKNOWN),
        (b"\xff\xfe\r\n", UNKNOWN),
        (b"CA\x00A\r\n", b"-ERR NUL character in command.\r\n"),
        (b"NOOP\r\n", NOT_LOGGED_IN),
        (b"X" * 300 + b"\r\n", b"-ERR Line too long.\r\n"),
    ],
)
def test_bad_lines_before_login(mode, line, reply):
    res = run([line, b"QUIT\r\n"], mode)
    assert res.replies == reply + SIGN_OFF
    assert res.conn.commands == 2 and res.events == [CloseConnection(R.signing_off(HOST))]


@pytest.mark.parametrize("mode", MODES)
def test_a_long_line_is_skipped_to_its_end(mode):
    """A line over 255 octets gets one -ERR; the session stays in step."""
    long = b"LIST " + b"1" * 5000 + b"\r\n"
    res = run([*LOGIN, long, b"STAT\r\n"], mode, make_conn(POP3Security(auth_plaintext=True)))
    assert res.replies == LOGIN_REPLIES + b"-ERR Line too long.\r\n" + f"+OK 3 {TOTAL}\r\n".encode()


@pytest.mark.parametrize("mode", MODES)
def test_the_longest_line(mode):
    line = b"NOOP" + b" " * (255 - 6) + b"\r\n"  # 255 octets: blank arguments
    assert len(line) == 255
    res = run([*LOGIN, line, line[:-2] + b" \r\n"], mode)
    assert res.replies == LOGIN_REPLIES + OK + b"-ERR Line too long.\r\n"


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_a_long_line_before_login_without_auth(mode):
    conn = make_conn(POP3Security())
    res = run([b"A" * 100_000 + b"\r\n", b"CAPA\r\n"], mode, conn)
    assert res.replies.startswith(b"-ERR Line too long.\r\n+OK Capability list follows\r\n")
    assert len(conn._buf) == 0


@pytest.mark.parametrize("mode", MODES)
def test_too_many_bad_commands_in_a_row(mode):
    res = run([b"FOO\r\n"] * 9 + [b"BAR\r\n", b"CAPA\r\n"], mode)
    assert res.replies == UNKNOWN * 10 + b"-ERR Too many bad commands.\r\n"
    assert res.events == [CloseConnection(R.TOO_MANY_BAD_COMMANDS)]
    assert res.conn.state is State.CLOSED and res.conn.commands == 10


@pytest.mark.parametrize("mode", MODES)
def test_a_good_command_starts_the_count_again(mode):
    script = [b"FOO\r\n"] * 9 + [USER] + [b"FOO\r\n"] * 9
    res = run(script, mode)
    assert res.replies == UNKNOWN * 9 + USER_OK + UNKNOWN * 9
    assert res.conn.state is State.AUTHORIZATION and res.conn.bad_commands == 9


@pytest.mark.parametrize("mode", MODES)
def test_max_bad_commands_is_a_setting(mode):
    conn = logged_in(max_bad_commands=3)
    res = run([b"RETR 9\r\n", b"DELE x\r\n", b"TOP\r\n", b"STAT\r\n"], mode, conn)
    assert res.replies.endswith(b"-ERR Syntax: TOP msg n\r\n-ERR Too many bad commands.\r\n")
    assert (
        res.events == [CloseConnection(R.TOO_MANY_BAD_COMMANDS)]
        and res.conn.closed_in is State.TRANSACTION
    )
    assert res.conn.deleted == set()


def test_max_bad_commands_must_be_positive():
    with pytest.raises(ValueError):
        make_conn(max_bad_commands=0)


def test_client_input_is_never_echoed():
    marker = b"Zq8Marker"
    conn = logged_in(max_bad_commands=100)
    lines = [
        marker, b"LIST " + marker, b"RETR " + marker, b"TOP 1 " + marker, b"DELE 1" + marker,
        b"UIDL " + marker, b"USER " + marker, b"AUTH " + marker, b"STAT " + marker,
        marker * 40,
    ]  # fmt: skip
    res = run(b"".join(line + b"\r\n" for line in lines), "whole", conn)
    before = make_conn(POP3Security(auth_plaintext=True))
    res2 = run([b"USER " + marker + b"\r\n", b"AUTH " + marker + b"\r\n", b"AUTH LOGIN "
                + marker + b"\r\n", b"STLS " + marker + b"\r\n"], "whole", before)  # fmt: skip
    assert res.replies.count(b"-ERR") == len(lines)
    assert marker not in res.replies and marker.lower() not in res.replies.lower()
    assert marker not in res2.replies


# ---------------------------------------------------------------- end of input


def ended(steps: list[bytes], mode: str) -> tuple:
    """Feed `steps` then the end of input; what the shell saw."""
    conn = make_conn()
    res = run(steps, mode, conn)
    events = list(res.events)
    replies = res.replies
    if conn.state is not State.CLOSED:
        conn.receive_data(b"")
        while True:
            event = conn.next_event()
            events.append(event)
            if isinstance(event, ConnectionClosed | CloseConnection):
                break
            if isinstance(event, Update):
                conn.update_result(True)
        replies += conn.data_to_send()
    return conn, replies, events


@pytest.mark.parametrize("mode", MODES)
def test_a_dropped_connection_deletes_nothing(mode):
    conn, replies, events = ended([*LOGIN, b"DELE 1\r\n", b"DELE 2\r\n", b"QUI"], mode)
    assert replies.endswith(b"+OK Message marked to be deleted.\r\n")
    assert [type(e) for e in events] == [AuthRequest, ConnectionClosed]
    assert conn.state is State.CLOSED and conn.closed_in is State.TRANSACTION
    assert conn.deleted == {0, 1}  # marked, never removed: no Update was asked for
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("mode", MODES)
def test_quit_then_close_still_updates(mode):
    _, replies, events = ended([*LOGIN, b"DELE 1\r\nQUIT\r\n"], mode)
    assert [type(e) for e in events] == [AuthRequest, Update, CloseConnection]
    assert replies.endswith(b"(2 messages left)\r\n")


@pytest.mark.parametrize("mode", MODES)
def test_end_of_input_before_login(mode):
    conn, replies, events = ended([USER, b"PASS sec"], mode)
    assert replies == USER_OK and events == [ConnectionClosed()]
    assert conn.closed_in is State.AUTHORIZATION


def test_end_of_input_in_an_auth_exchange():
    _, replies, events = ended([b"AUTH LOGIN\r\n"], "whole")
    assert replies == ASK_USER and events == [ConnectionClosed()]


def test_end_of_input_with_commands_all_in_one_read():
    conn = logged_in()
    conn.receive_data(b"STAT\r\nDELE 1\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert (
        conn.data_to_send()
        == f"+OK 3 {TOTAL}\r\n".encode() + b"+OK Message marked to be deleted.\r\n"
    )


def test_end_of_input_while_retrieving():
    conn = logged_in()
    conn.receive_data(b"RETR 1\r\nNOOP\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Retrieve(1, 0, None)
    conn.retrieve_result(True)
    assert conn.next_event() == ConnectionClosed()
    assert conn.data_to_send() == b"+OK %d octets\r\n" % SIZES[0] + OK


def test_commands_counter():
    res = run([*LOGIN, b"AUTH PLAIN\r\n", b"STAT\r\n", b"x" * 300 + b"\r\n", b"\r\n"], "whole")
    assert res.conn.commands == 6
