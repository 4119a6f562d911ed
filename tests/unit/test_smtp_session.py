"""The sans-I/O SMTP session: replies, state, limits, DATA, trace headers.

Every protocol case runs in three modes (see `smtp_helpers.run`): each step
fed whole, every octet fed on its own, and the whole script pipelined in one
chunk between two other commands. The replies and events must not depend on
how the bytes were cut up.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import email.utils
import random
import re

import pytest

from geosmtp.mail import Envelope, Mailbox, Recipient
from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, ConnectionClosed, ProtocolError
from geosmtp.smtp import (
    Extensions,
    Limits,
    MessageData,
    MessageEnd,
    MessageStart,
    Security,
    SMTPConnection,
    State,
    TransactionRejected,
)
from geosmtp.smtp import replies as R
from geosmtp.smtp.trace import header_safe, trace_headers, with_protocol

from .smtp_helpers import (
    DATA,
    DOMAIN,
    EHLO,
    GO_AHEAD,
    HOST,
    MAIL,
    MODES,
    OK,
    QUEUED,
    RCPT,
    RCPT_OK,
    SENDER_OK,
    TXN,
    Result,
    after_ehlo,
    drain,
    feed,
    make_conn,
    run,
    store_q1,
)

# ------------------------------------------------------------ greeting, EHLO


def test_greeting_is_220_without_enhanced_code():
    assert make_conn().greeting() == b"220 mx.example.test ESMTP geosmtp\r\n"


@pytest.mark.parametrize("mode", MODES)
def test_ehlo_multiline_250(mode):
    res = run(EHLO, mode)
    assert res.lines == [
        b"250-mx.example.test",
        b"250-PIPELINING",
        b"250-SIZE 10485760",
        b"250-VRFY",
        b"250-ENHANCEDSTATUSCODES",
        b"250-8BITMIME",
        b"250-DSN",
        b"250-SMTPUTF8",
        b"250 CHUNKING",
    ]
    assert res.conn.state is State.GREETED
    assert res.conn.esmtp and res.conn.helo == "client.example.org"


@pytest.mark.parametrize("mode", MODES)
def test_ehlo_advertises_configured_size_and_extensions(mode):
    conn = make_conn(
        Limits(max_message_size=1234),
        Extensions(
            pipelining=False,
            eightbitmime=False,
            enhancedstatuscodes=False,
            smtputf8=False,
            chunking=False,
            dsn=False,
        ),
    )
    res = run([EHLO, b"NOOP\r\n"], mode, conn)
    assert res.lines == [b"250-mx.example.test", b"250-SIZE 1234", b"250 VRFY", b"250 Ok"]


@pytest.mark.parametrize("mode", MODES)
def test_helo_single_line_250(mode):
    # RFC 2034 §3: no enhanced code in the reply to HELO or EHLO.
    res = run(b"HELO client.example.org\r\n", mode)
    assert res.replies == b"250 mx.example.test\r\n"
    assert res.conn.state is State.GREETED and not res.conn.esmtp


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cmd", [b"EHLO\r\n", b"HELO\r\n", b"EHLO a b\r\n", b"HELO  \r\n"])
def test_greeting_needs_one_name(mode, cmd):
    res = run(cmd, mode)
    assert res.replies.startswith(b"501 5.5.4 Syntax: ")
    assert res.conn.state is State.CONNECTED and res.conn.helo is None


# ---------------------------------------------------------- simple commands


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cmd", [b"NOOP\r\n", b"noop\r\n", b"NoOp with an argument\r\n"])
def test_noop(mode, cmd):
    res = run(cmd, mode)
    assert res.replies == OK
    assert res.conn.state is State.CONNECTED


@pytest.mark.parametrize("mode", MODES)
def test_help_is_multiline_214(mode):
    res = run(b"help\r\n", mode)
    lines = res.lines
    assert lines[0].startswith(b"214-2.0.0 mx.example.test")
    assert all(line.startswith(b"214-") for line in lines[:-1])
    assert lines[-1].startswith(b"214 ")
    verbs = b" ".join(lines)
    for verb in (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT"):
        assert verb in verbs
    assert res.codes == [214]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quit_", [b"QUIT\r\n", b"quit\r\n", b"Quit \r\n"])
def test_quit_221_closes_and_nothing_after_runs(mode, quit_):
    res = run([EHLO, MAIL, quit_, RCPT, b"NOOP\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + b"221 2.0.0 mx.example.test closing connection\r\n"
    assert res.conn.state is State.CLOSED
    closes = res.of(CloseConnection)
    assert len(closes) == 1 and closes[0].reply.code == 221
    assert res.events[-1] == closes[0]
    assert res.conn.next_event() == ConnectionClosed()  # over: nothing more will happen


@pytest.mark.parametrize("mode", MODES)
def test_quit_with_argument_is_501_and_keeps_session(mode):
    res = run([b"QUIT now\r\n", b"NOOP\r\n"], mode)
    assert res.replies == b"501 5.5.4 Syntax: QUIT\r\n" + OK
    assert res.conn.state is State.CONNECTED
    assert not res.of(CloseConnection)


def test_after_close_input_is_refused():
    """Feeding a closed connection is the shell's mistake: it raises, and the
    input is neither kept nor run."""
    res = run(b"QUIT\r\n", "whole")
    conn = res.conn
    with pytest.raises(ProtocolError):
        conn.receive_data(b"NOOP\r\n")
    assert conn.state is State.CLOSED  # a closed connection stays closed
    assert conn.next_event() == ConnectionClosed()
    assert conn.data_to_send() == b""
    assert len(conn._buf) == 0


def test_close_with_queues_421_once():
    conn = make_conn()
    conn.close_with(R.TIMEOUT)
    conn.close_with(R.SHUTTING_DOWN)
    assert conn.data_to_send() == b"421 4.4.2 Error: timeout exceeded; closing connection\r\n"
    event = conn.next_event()
    assert isinstance(event, CloseConnection) and event.reply is R.TIMEOUT
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "line",
    [b"FOO\r\n", b"\r\n", b" NOOP\r\n", b"NO\x00OP\r\n", b"N\xc3\x96OP\r\n", b"NOOP\rQUIT\r\n"],
)
def test_unknown_command_500(mode, line):
    res = run([line, b"NOOP\r\n"], mode)
    assert res.replies[:10] == b"500 5.5.2 "
    assert res.replies.endswith(OK) and res.codes == [500, 250]
    assert res.conn.state is State.CONNECTED  # a bare CR does not end "NOOP" and run QUIT


@pytest.mark.parametrize("mode", MODES)
def test_bare_lf_ends_a_command_line(mode):
    res = run([b"NOOP\n", b"NOOP\r\n"], mode)
    assert res.replies == OK * 2


# -------------------------------------------------------------------- VRFY


@pytest.mark.parametrize("mode", MODES)
def test_vrfy_disabled_is_252(mode):
    res = run([b"VRFY alice\r\n", b"vrfy nobody@elsewhere.test\r\n"], mode)
    assert res.replies == (
        b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n" * 2
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("arg", "accept_unknown", "expected"),
    [
        (b"alice", True, b"250 2.1.5 <alice@example.test>\r\n"),
        (b"<Alice@Other.Example.Test>", True, b"250 2.1.5 <alice@other.example.test>\r\n"),
        (b"postmaster", False, b"250 2.1.5 <postmaster@example.test>\r\n"),
        (b"carol", True, b"252 2.0.0 "),
        (b"carol", False, b"550 5.1.1 User unknown\r\n"),
        (b"carol@elsewhere.test", False, b"252 2.0.0 "),
        (b"../etc", True, b"550 5.1.1 User unknown\r\n"),
        (b"a@b@", True, b"501 5.5.4 Syntax: VRFY address\r\n"),
    ],
)
def test_vrfy_enabled(mode, arg, accept_unknown, expected):
    conn = make_conn(vrfy=True, accept_unknown=accept_unknown)
    res = run(b"VRFY " + arg + b"\r\n", mode, conn)
    assert res.replies.startswith(expected)
    assert res.codes == [int(expected[:3])]


@pytest.mark.parametrize("mode", MODES)
def test_vrfy_needs_an_argument(mode):
    res = run(b"VRFY\r\n", mode)
    assert res.replies == b"501 5.5.4 Syntax: VRFY address\r\n"


# -------------------------------------------------------- case-insensitivity


@pytest.mark.parametrize("mode", MODES)
def test_verbs_and_keywords_are_case_insensitive(mode):
    res = run(
        [
            b"ehlo client.example.org\r\n",
            b"mail from:<sender@example.org> size=10 body=8bitmime\r\n",
            b"Rcpt To:<alice@example.test>\r\n",
            b"rset\r\n",
            b"MaIl FrOm:<>\r\n",
            b"rcpt to:<bob@example.test>\r\n",
            b"data\r\n",
            b"x\r\n.\r\n",
            b"vrfy bob\r\n",
            b"hElP\r\n",
        ],
        mode,
    )
    assert res.codes == [250, 250, 250, 250, 250, 250, 354, 250, 252, 214]
    assert res.of(MessageEnd)[0].envelope.mail_params == {}
    assert res.messages == [b"x\n"]


# ---------------------------------------------------------------- sequence


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("setup", "cmd", "expected"),
    [
        ([], MAIL, b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        ([], RCPT, b"503 5.5.1 Error: need MAIL command\r\n"),
        ([], DATA, b"503 5.5.1 Error: need MAIL command\r\n"),
        ([EHLO], RCPT, b"503 5.5.1 Error: need MAIL command\r\n"),
        ([EHLO], DATA, b"503 5.5.1 Error: need MAIL command\r\n"),
        ([EHLO, MAIL], DATA, b"503 5.5.1 Error: need RCPT command\r\n"),
        ([EHLO, MAIL], MAIL, b"503 5.5.1 Error: nested MAIL command\r\n"),
        ([EHLO, MAIL, RCPT], MAIL, b"503 5.5.1 Error: nested MAIL command\r\n"),
        ([EHLO, MAIL, RCPT], b"MAIL FROM:<>\r\n", b"503 5.5.1 Error: nested MAIL command\r\n"),
    ],
)
def test_bad_sequence_503_leaves_state(mode, setup, cmd, expected):
    before = run(setup, "whole").conn
    res = run([*setup, cmd], mode)
    assert res.replies.endswith(expected)
    assert res.conn.state is before.state
    env, env_before = res.conn.envelope, before.envelope
    assert (env and (env.sender, env.recipients)) == (
        env_before and (env_before.sender, env_before.recipients)
    )


@pytest.mark.parametrize("mode", MODES)
def test_nested_mail_keeps_the_first_transaction(mode):
    res = run([EHLO, MAIL, b"MAIL FROM:<other@example.org>\r\n", RCPT, DATA, b"hi\r\n.\r\n"], mode)
    assert after_ehlo(res) == (
        SENDER_OK + b"503 5.5.1 Error: nested MAIL command\r\n" + RCPT_OK + GO_AHEAD + QUEUED
    )
    (end,) = res.of(MessageEnd)
    assert end.envelope.sender == Mailbox("sender", "example.org")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("reset", "helo"),
    [
        (b"RSET\r\n", "client.example.org"),
        (b"EHLO again.example.org\r\n", "again.example.org"),
        (b"HELO again\r\n", "again"),
    ],
)
def test_rset_and_greeting_reset_the_transaction(mode, reset, helo):
    res = run([EHLO, MAIL, RCPT, reset, RCPT, DATA, MAIL, RCPT, DATA, b".\r\n"], mode)
    tail = res.replies[res.replies.index(b"503 5.5.1 Error: need MAIL command\r\n") :]
    assert tail == (
        b"503 5.5.1 Error: need MAIL command\r\n" * 2 + SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    )
    assert res.codes[-7] == 250  # the reset itself
    (end,) = res.of(MessageEnd)
    assert end.envelope.helo == helo
    assert [r.box for r in end.envelope.recipients] == ["alice"]


@pytest.mark.parametrize("mode", MODES)
def test_rset_before_greeting_keeps_connected(mode):
    res = run([b"RSET\r\n", MAIL], mode)
    assert res.replies == OK + b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    assert res.conn.state is State.CONNECTED


@pytest.mark.parametrize("mode", MODES)
def test_rset_with_argument_is_501_and_keeps_transaction(mode):
    res = run([EHLO, MAIL, b"RSET all\r\n", RCPT], mode)
    assert after_ehlo(res) == SENDER_OK + b"501 5.5.4 Syntax: RSET\r\n" + RCPT_OK
    assert res.conn.state is State.RCPT


# ------------------------------------------------------------------ syntax


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("setup", "cmd", "expected"),
    [
        ([EHLO], b"MAIL FROM: user@example.org\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:user@example.org\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<user@example.org\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<user@example.org>SIZE=10\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<no-domain>\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<a b@example.org>\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<user@-bad-.org>\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<user@exa mple.org>\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<\xff@example.org>\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<" + b"x" * 65 + b"@example.org>\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL FROM:<x@" + b"a." * 127 + b"org>\r\n", b"501 5.1.7 "),
        ([EHLO], b"MAIL\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        ([EHLO], b"MAIL TO:<a@example.org>\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        ([EHLO], b"MAIL FROM :<a@example.org>\r\n", b"501 5.5.4 "),
        ([EHLO, MAIL], b"RCPT TO:\r\n", b"501 5.1.3 "),
        ([EHLO, MAIL], b"RCPT TO: alice@example.test\r\n", b"501 5.1.3 "),
        ([EHLO, MAIL], b"RCPT TO:<>\r\n", b"501 5.1.3 "),
        ([EHLO, MAIL], b"RCPT TO:<alice>\r\n", b"501 5.1.3 "),
        ([EHLO, MAIL], b"RCPT\r\n", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        ([EHLO, MAIL], b"RCPT FROM:<alice@example.test>\r\n", b"501 5.5.4 "),
        ([EHLO, MAIL, RCPT], b"DATA now\r\n", b"501 5.5.4 Syntax: DATA\r\n"),
        ([EHLO, MAIL, RCPT], b"EHLO\r\n", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
        ([EHLO, MAIL, RCPT], b"HELO a\tb\r\n", b"501 5.5.4 Syntax: HELO hostname\r\n"),
    ],
)
def test_bad_syntax_501_leaves_state(mode, setup, cmd, expected):
    before = run(setup, "whole").conn
    res = run([*setup, cmd], mode)
    last = res.lines[-1] + b"\r\n"
    assert last.startswith(expected)
    assert res.conn.state is before.state
    assert res.conn.errors == 1
    if before.envelope is not None:
        assert res.conn.envelope.sender == before.envelope.sender
        assert res.conn.envelope.recipients == before.envelope.recipients
    else:
        assert res.conn.envelope is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (b"MAIL FROM:<s@example.org> FOO=BAR\r\n", b"555 5.5.4 "),
        (b"MAIL FROM:<s@example.org> SIZE=10 MT-PRIORITY=1\r\n", b"555 5.5.4 "),
        (b"MAIL FROM:<s@example.org> RET=ALL\r\n", b"501 5.5.4 Bad parameter value\r\n"),
        (b"MAIL FROM:<s@example.org> ENVID=a+zz\r\n", b"501 5.5.4 Bad parameter value\r\n"),
        (b"MAIL FROM:<s@example.org> ENVID=" + b"x" * 101 + b"\r\n", b"501 5.5.4 "),
        (b"MAIL FROM:<s@example.org> SIZE=abc\r\n", b"501 5.5.4 Bad parameter value\r\n"),
        (b"MAIL FROM:<s@example.org> SIZE\r\n", b"501 5.5.4 Bad parameter value\r\n"),
        (b"MAIL FROM:<s@example.org> SIZE=-1\r\n", b"501 5.5.4 Bad parameter value\r\n"),
        ("MAIL FROM:<s@example.org> SIZE=\u00b2\r\n".encode(), b"501 5.5.4 Bad parameter value"),
        ("MAIL FROM:<s@example.org> SIZE=\u0661\r\n".encode(), b"501 5.5.4 Bad parameter value"),
        (b"MAIL FROM:<s@example.org> SIZE=" + b"1" * 21 + b"\r\n", b"501 5.5.4 "),
        (b"MAIL FROM:<s@example.org> BODY=BINARYMIME\r\n", b"501 5.5.4 "),
        (b"MAIL FROM:<s@example.org> SIZE=10485761\r\n", b"552 5.3.4 "),
    ],
)
def test_mail_parameters_refused(mode, cmd, expected):
    res = run([EHLO, cmd, RCPT], mode)
    assert after_ehlo(res).startswith(expected)
    assert after_ehlo(res).endswith(b"503 5.5.1 Error: need MAIL command\r\n")
    (rejected,) = res.of(TransactionRejected)
    assert rejected.stage == "MAIL" and rejected.reply.code == int(expected[:3])
    assert res.conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
def test_mail_parameters_accepted(mode):
    res = run([EHLO, b"MAIL FROM:<s@example.org> size=10485760 BODY=7bit\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK
    assert res.conn.envelope.mail_params == {"SIZE": "10485760", "BODY": "7bit"}


@pytest.mark.parametrize("mode", MODES)
def test_esmtp_parameters_need_ehlo(mode):
    res = run([b"HELO client\r\n", b"MAIL FROM:<s@example.org> SIZE=10\r\n"], mode)
    assert res.lines[-1].startswith(b"555 5.5.4 ")


@pytest.mark.parametrize("mode", MODES)
def test_dsn_parameters_are_kept(mode):
    """RFC 3461: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT, stored as received."""
    mail = b"MAIL FROM:<s@example.org> RET=HDRS ENVID=QQ+2B1\r\n"
    rcpt = (
        b"RCPT TO:<alice@example.test> NOTIFY=SUCCESS,delay ORCPT=rfc822;Alice+2Bx@example.test\r\n"
    )
    res = run([EHLO, mail, rcpt, b"RCPT TO:<bob@example.test> NOTIFY=NEVER\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + RCPT_OK
    env = res.conn.envelope
    assert env.mail_params == {"RET": "HDRS", "ENVID": "QQ+2B1"}
    alice, bob = env.recipients
    assert alice.notify == {"SUCCESS", "DELAY"} and alice.orcpt == "rfc822;Alice+2Bx@example.test"
    assert bob.notify == {"NEVER"} and bob.orcpt is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "param",
    [
        b"NOTIFY=NEVER,SUCCESS",
        b"NOTIFY=SOMETIMES",
        b"NOTIFY",
        b"ORCPT=alice@example.test",
        b"ORCPT=rfc822;a+zz",
        b"ORCPT=;x",
    ],
)
def test_bad_dsn_parameters_are_501(mode, param):
    res = run([EHLO, MAIL, b"RCPT TO:<alice@example.test> " + param + b"\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + b"501 5.5.4 Bad parameter value\r\n"


@pytest.mark.parametrize("mode", MODES)
def test_rcpt_parameters_555(mode):
    res = run([EHLO, MAIL, b"RCPT TO:<alice@example.test> MT-PRIORITY=1\r\n", DATA], mode)
    assert after_ehlo(res) == (
        SENDER_OK
        + b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"
        + b"503 5.5.1 Error: need RCPT command\r\n"
    )


# ------------------------------------------------------------------- paths


@pytest.mark.parametrize("mode", MODES)
def test_null_reverse_path(mode):
    res = run([EHLO, b"MAIL FROM:<>\r\n", RCPT, DATA, b"bounce\r\n.\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    (end,) = res.of(MessageEnd)
    assert end.envelope.sender is None and end.envelope.sender_address == ""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "rcpt",
    [
        b"RCPT TO:<postmaster>\r\n",
        b"RCPT TO:<Postmaster>\r\n",
        b"RCPT TO:<POSTMASTER@example.test>\r\n",
    ],
)
def test_postmaster_is_always_accepted(mode, rcpt):
    # §4.5.1; even when unknown users are refused.
    conn = make_conn(accept_unknown=False, users=())
    res = run([EHLO, MAIL, rcpt], mode, conn)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK
    assert [r.box for r in res.conn.envelope.recipients] == ["postmaster"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        (b"RCPT TO:<bob@elsewhere.test>\r\n", b"550 5.7.1 Relay access denied\r\n"),
        (b"RCPT TO:<postmaster@elsewhere.test>\r\n", b"550 5.7.1 Relay access denied\r\n"),
        (b"RCPT TO:<bob@example.test.evil.org>\r\n", b"550 5.7.1 Relay access denied\r\n"),
        (b"RCPT TO:<bob@[127.0.0.1]>\r\n", b"550 5.7.1 Relay access denied\r\n"),
        (b"RCPT TO:<@example.test:bob@elsewhere.test>\r\n", b"550 5.7.1 "),
        (b'RCPT TO:<"../bob"@example.test>\r\n', b"550 5.1.3 "),
        (b'RCPT TO:<"a b"@example.test>\r\n', b"550 5.1.3 "),
        (b"RCPT TO:<carol@example.test>\r\n", b"550 5.1.1 "),
    ],
)
def test_rcpt_refused_by_policy(mode, rcpt, expected):
    conn = make_conn(accept_unknown=False)
    res = run([EHLO, MAIL, RCPT, rcpt, DATA, b".\r\n"], mode, conn)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + res.lines[-3] + b"\r\n" + GO_AHEAD + QUEUED
    assert res.lines[-3].startswith(expected.rstrip(b"\r\n"))
    (rejected,) = res.of(TransactionRejected)
    assert rejected.stage == "RCPT" and rejected.reply.code == 550
    assert rejected.address and "@" in rejected.address
    (end,) = res.of(MessageEnd)
    assert [r.box for r in end.envelope.recipients] == ["alice"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("rcpt", "box"),
    [
        (b"RCPT TO:<Alice@EXAMPLE.TEST>\r\n", "alice"),
        (b"RCPT TO:<bob@Other.Example.Test>\r\n", "bob"),
        (b"RCPT TO:<@relay.example.org,@b.example.org:bob@example.test>\r\n", "bob"),
        (b'RCPT TO:<"bob"@example.test>\r\n', "bob"),
        (b"RCPT TO:  <carol.smith+tag@example.test>\r\n", "carol.smith+tag"),
    ],
)
def test_rcpt_accepted_for_local_domains(mode, rcpt, box):
    res = run([EHLO, MAIL, rcpt], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK
    assert [r.box for r in res.conn.envelope.recipients] == [box]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("mail", "address"),
    [
        (b"MAIL FROM:<user@[IPv6:2001:db8::1]>\r\n", "user@[IPv6:2001:db8::1]"),
        (b"MAIL FROM:<user@[192.0.2.1]>\r\n", "user@[192.0.2.1]"),
        (b'MAIL FROM:<"odd@x:"@example.org>\r\n', '"odd@x:"@example.org'),
        (b'MAIL FROM:<"a>b"@example.org>\r\n', '"a>b"@example.org'),
        (b"MAIL FROM:<@a.example,@b.example:user@Example.ORG>\r\n", "user@example.org"),
    ],
)
def test_sender_forms(mode, mail, address):
    # The IPv6 and quoted cases were mangled by a source-route strip that was not anchored.
    res = run([EHLO, mail], mode)
    assert after_ehlo(res) == SENDER_OK
    assert res.conn.envelope.sender_address == address


@pytest.mark.parametrize("mode", MODES)
def test_too_many_recipients_is_452_and_not_an_error(mode):
    # §4.5.3.1.10: a temporary failure; the accepted ones still get the message.
    conn = make_conn(Limits(max_recipients=2, max_errors=1))
    rcpts = [b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(4)]
    res = run([EHLO, MAIL, *rcpts, DATA, b"x\r\n.\r\n"], mode, conn)
    assert after_ehlo(res) == (
        SENDER_OK
        + RCPT_OK * 2
        + b"452 4.5.3 Error: too many recipients\r\n" * 2
        + GO_AHEAD
        + QUEUED
    )
    (end,) = res.of(MessageEnd)
    assert [r.box for r in end.envelope.recipients] == ["r0", "r1"]
    assert res.conn.errors == 0


# ------------------------------------------------------------ error budget


@pytest.mark.parametrize("mode", MODES)
def test_error_budget_ends_with_421(mode):
    conn = make_conn(Limits(max_errors=3))
    res = run([b"FOO\r\n", MAIL, b"EHLO\r\n", b"NOOP\r\n", b"QUIT\r\n"], mode, conn)
    assert res.codes == [500, 503, 501, 421]
    assert res.lines[-1] == b"421 4.7.0 Error: too many errors; closing connection"
    (close,) = res.of(CloseConnection)
    assert close.reply.code == 421
    assert res.conn.state is State.CLOSED


@pytest.mark.parametrize("mode", MODES)
def test_error_budget_rejection_event_comes_before_close(mode):
    # The shell stops at CloseConnection; the refused recipient must reach the log first.
    conn = make_conn(Limits(max_errors=1))
    res = run([EHLO, MAIL, b"RCPT TO:<x@elsewhere.test>\r\n", RCPT], mode, conn)
    assert [type(e) for e in res.events] == [TransactionRejected, CloseConnection]
    assert res.codes[-2:] == [550, 421]


@pytest.mark.parametrize("mode", MODES)
def test_errors_do_not_reset_between_transactions(mode):
    conn = make_conn(Limits(max_errors=2))
    res = run([EHLO, b"FOO\r\n", MAIL, RCPT, DATA, b".\r\n", b"BAR\r\n"], mode, conn)
    assert res.codes == [250, 500, 250, 250, 354, 250, 500, 421]
    assert res.conn.state is State.CLOSED


# ------------------------------------------------------------ command limits


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_command_line_limit_512_including_crlf(mode, eol):
    fits = b"NOOP " + b"x" * (510 - 5)
    assert len(fits + b"\r\n") == 512
    res = run([fits + eol, b"NOOP x" + b"x" * 505 + eol, b"NOOP\r\n"], mode)
    assert res.replies == OK + b"500 5.5.2 Error: command line too long\r\n" + OK


@pytest.mark.parametrize("mode", MODES)
def test_command_line_limit_is_configurable(mode):
    conn = make_conn(Limits(command_line=16))
    res = run([b"NOOP 123456789\r\n", b"NOOP 1234567890\r\n", b"NOOP\r\n"], mode, conn)
    assert res.codes == [250, 500, 250]


@pytest.mark.parametrize("mode", MODES)
def test_overlong_command_is_not_executed(mode):
    # The tail of an over-long line must not run as a command of its own.
    res = run([b"NOOP " + b"x" * 600 + b" QUIT\r\n", b"NOOP\r\n"], mode)
    assert res.codes == [500, 250]
    assert res.conn.state is State.CONNECTED


def test_command_buffer_stays_bounded_without_newline():
    conn = make_conn()
    chunk = b"A" * 65536
    for _ in range(64):  # 4 MiB
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
        assert len(conn._buf) <= conn.limits.command_line
    conn.receive_data(b"\r\nNOOP\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"500 5.5.2 Error: command line too long\r\n" + OK


# ----------------------------------------------------------------- DATA


MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: hi\r\n"
    b"Message-ID: <1234@example.org>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"\r\n"
    b"bye\r\n"
)


@pytest.mark.parametrize("mode", MODES)
def test_message_accepted_with_lf_endings(mode):
    res = run([*TXN, MESSAGE + b".\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    assert [type(e) for e in res.events if not isinstance(e, MessageData)] == [
        MessageStart,
        MessageEnd,
    ]
    assert res.messages == [MESSAGE.replace(b"\r\n", b"\n")]
    (end,) = res.of(MessageEnd)
    env = end.envelope
    assert env.helo == "client.example.org" and env.esmtp
    assert env.sender == Mailbox("sender", "example.org")
    assert env.recipients == (Recipient(Mailbox("alice", DOMAIN), "alice"),)
    assert res.message_ids == ["<1234@example.org>"]
    assert end.size == len(MESSAGE)
    assert res.conn.state is State.GREETED and res.conn.envelope is None


@pytest.mark.parametrize("mode", MODES)
def test_empty_message(mode):
    res = run([*TXN, b".\r\n"], mode)
    assert after_ehlo(res).endswith(GO_AHEAD + QUEUED)
    assert res.messages == [b""]
    assert res.of(MessageEnd)[0].size == 0


@pytest.mark.parametrize("mode", MODES)
def test_dot_unstuffing(mode):
    # §4.5.2: a leading dot is removed from every line that has one.
    body = b"..\r\n...\r\n..leading\r\n.x\r\nmid.dle\r\n . \r\n"
    res = run([*TXN, body + b".\r\n"], mode)
    assert res.messages == [b".\n..\n.leading\nx\nmid.dle\n . \n"]
    assert res.of(MessageEnd)[0].size == len(body) - 4  # RFC 1870: without them


@pytest.mark.parametrize("mode", MODES)
def test_two_messages_pipelined(mode):
    res = run(
        [
            *TXN,
            b"one\r\n.\r\n",
            b"MAIL FROM:<>\r\n",
            b"RCPT TO:<bob@example.test>\r\n",
            DATA,
            b"two\r\n.\r\n",
            b"QUIT\r\n",
        ],
        mode,
    )
    assert after_ehlo(res) == (
        (SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED) * 2
        + b"221 2.0.0 mx.example.test closing connection\r\n"
    )
    assert res.messages == [b"one\n", b"two\n"]
    first, second = res.of(MessageEnd)
    assert first.envelope is not second.envelope
    assert [r.box for r in second.envelope.recipients] == ["bob"]
    assert second.envelope.sender is None


# SMTP smuggling (RFC 5321 §4.1.1.4): only <CRLF>.<CRLF> ends the data.
SMUGGLING_ENDS = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n\x00.\r\n",
    b"\r\n .\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.. \r\n",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fake_end", SMUGGLING_ENDS, ids=repr)
def test_smuggled_end_of_data_is_not_an_end(mode, fake_end):
    smuggled = (
        b"MAIL FROM:<admin@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\n"
        b"DATA\r\n"
        b"From: admin@example.test\r\n"
        b"\r\n"
        b"smuggled\r\n"
    )
    res = run([*TXN, b"Subject: one\r\n\r\nbody" + fake_end + smuggled + b".\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    assert len(res.of(MessageStart)) == 1 and len(res.of(MessageEnd)) == 1
    (message,) = res.messages
    assert b"RCPT TO:<bob@example.test>\nDATA\n" in message
    assert message.endswith(b"\nsmuggled\n")
    (end,) = res.of(MessageEnd)
    assert end.envelope.sender_address == "sender@example.org"
    assert [r.box for r in end.envelope.recipients] == ["alice"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fake_end", SMUGGLING_ENDS, ids=repr)
def test_smuggled_end_at_the_start_of_data(mode, fake_end):
    # The same sequences right after 354, where the data starts a line.
    res = run([*TXN, fake_end + b"NOOP\r\n.\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    assert len(res.messages) == 1 and b"NOOP" in res.messages[0]


@pytest.mark.parametrize("mode", MODES)
def test_bare_cr_and_lf_are_data(mode):
    res = run([*TXN, b"a\rb\nc\r\n.\r\n"], mode)
    assert res.messages == [b"a\rb\nc\n"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "text",
    [
        b"a\r\r\nb\r\n",  # a stray CR before the line end
        b"Subject: x\r\r\nFrom: y\r\n\r\nbody\r\r\r\n",
        b"\r\r\n\r\n",
        b"..dot\r\r\n\r\r\n",
        b"a\rb\r\r\nc\r\n\r\r\n",
    ],
)
def test_stored_message_reads_back_as_sent(mode, text):
    """Read back by the Maildir rule (a LF alone becomes CRLF, a CRLF stays: POP3,
    Dovecot) the stored message is the very bytes sent, a CR before a CRLF too."""
    wire = text.replace(b"\r\n.", b"\r\n..")
    wire = b"." + wire if wire.startswith(b".") else wire
    res = run([*TXN, wire + b".\r\n"], mode)
    (stored,) = res.messages
    assert re.sub(rb"(?<!\r)\n", b"\r\n", stored) == text


def test_pipelined_commands_wait_for_the_verdict():
    """After MessageEnd the core pauses; the next command runs only after the 250."""
    conn = make_conn()
    conn.receive_data(b"".join(TXN) + b"x\r\n.\r\nNOOP\r\n")
    kinds = []
    while not isinstance(event := conn.next_event(), MessageEnd):
        assert event is not NEED_DATA and event is not PAUSED
        kinds.append(type(event))
    assert kinds == [MessageStart, MessageData]
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    assert conn.data_to_send().endswith(GO_AHEAD)  # no 250 yet, NOOP not run
    conn.message_stored("Q7")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as Q7\r\n" + OK


@pytest.mark.parametrize("mode", MODES)
def test_message_failed_is_451_and_session_goes_on(mode):
    def on_end(conn, event):
        conn.message_failed()

    res = run([*TXN, b"x\r\n.\r\n", MAIL, RCPT], mode, on_end=on_end)
    assert after_ehlo(res) == (
        SENDER_OK
        + RCPT_OK
        + GO_AHEAD
        + b"451 4.3.0 Error: local error in processing; try again later\r\n"
        + SENDER_OK
        + RCPT_OK
    )
    assert res.conn.state is State.RCPT


# ------------------------------------------------------------ DATA limits


@pytest.mark.parametrize("mode", MODES)
def test_oversize_message_is_read_to_its_end_and_refused(mode):
    body = b"0123456789\r\n" * 10  # 120 octets
    conn = make_conn(Limits(max_message_size=119))
    res = run([*TXN, body + b"QUIT\r\n.\r\n", MAIL, RCPT, DATA, b"small\r\n.\r\n"], mode, conn)
    assert after_ehlo(res) == (
        SENDER_OK
        + RCPT_OK
        + GO_AHEAD
        + b"552 5.3.4 Error: message exceeds fixed maximum message size\r\n"
        + SENDER_OK
        + RCPT_OK
        + GO_AHEAD
        + QUEUED
    )
    kinds = [type(e) for e in res.events if not isinstance(e, MessageData)]
    assert kinds == [MessageStart, TransactionRejected, MessageStart, MessageEnd]
    rejected = res.of(TransactionRejected)[0]
    assert rejected.stage == "DATA" and rejected.reply.code == 552
    assert res.messages == [b"small\n"]


@pytest.mark.parametrize("mode", MODES)
def test_message_of_exactly_the_maximum_size_is_accepted(mode):
    body = b"..012345678\r\n" * 10  # 130 octets on the wire, 120 without the doubled dots
    conn = make_conn(Limits(max_message_size=120))
    res = run([*TXN, body + b".\r\n"], mode, conn)
    assert after_ehlo(res).endswith(GO_AHEAD + QUEUED)
    assert res.of(MessageEnd)[0].size == 120


def test_oversize_data_memory_is_bounded():
    conn = make_conn(Limits(max_message_size=1000))
    run(TXN, "whole", conn)
    line = b"x" * 78 + b"\r\n"
    kept = 0
    for _ in range(200):
        conn.receive_data(line * 100)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, MessageData):
                kept += len(event.data)
        assert len(conn._buf) <= conn.limits.text_line
    assert kept <= 1000
    conn.receive_data(b".\r\n")
    assert isinstance(conn.next_event(), TransactionRejected)
    assert conn.data_to_send() == R.MESSAGE_TOO_BIG.to_bytes()


@pytest.mark.parametrize("mode", MODES)
def test_text_line_limit_1000_including_crlf(mode):
    fits = b"x" * 998 + b"\r\n"
    res = run([*TXN, fits + b"." + fits + b".\r\n"], mode)  # the doubled dot is not counted
    assert after_ehlo(res).endswith(GO_AHEAD + QUEUED)
    assert res.messages == [(b"x" * 998 + b"\n") * 2]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("long_line", [b"x" * 999 + b"\r\n", b".." + b"x" * 998 + b"\r\n"])
def test_text_line_too_long_refuses_the_message(mode, long_line):
    res = run([*TXN, b"ok\r\n" + long_line + b"ok\r\n.\r\n", MAIL], mode)
    assert after_ehlo(res) == (
        SENDER_OK
        + RCPT_OK
        + GO_AHEAD
        + b"500 5.5.2 Error: message has a line longer than the limit\r\n"
        + SENDER_OK
    )
    assert not res.of(MessageEnd)
    assert res.of(TransactionRejected)[0].stage == "DATA"


@pytest.mark.parametrize("mode", MODES)
def test_text_line_limit_is_configurable(mode):
    conn = make_conn(Limits(text_line=10))
    res = run([*TXN, b"12345678\r\n.\r\n", MAIL, RCPT, DATA, b"123456789\r\n.\r\n"], mode, conn)
    assert res.codes[3:] == [354, 250, 250, 250, 354, 500]


def test_data_buffer_stays_bounded_without_newline():
    conn = make_conn()
    run(TXN, "whole", conn)
    chunk = b"y" * 65536
    for _ in range(64):  # 4 MiB in one line
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
        assert len(conn._buf) <= conn.limits.text_line
    conn.receive_data(b"\r\n.\r\nNOOP\r\n")
    rejected = conn.next_event()
    assert isinstance(rejected, TransactionRejected) and rejected.stage == "DATA"
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().endswith(
        b"500 5.5.2 Error: message has a line longer than the limit\r\n" + OK
    )


@pytest.mark.parametrize("mode", MODES)
def test_long_line_ending_in_bare_cr_does_not_hide_the_end(mode):
    res = run([*TXN, b"z" * 1500 + b"\r\r\n.\r\n", MAIL], mode)
    assert res.codes[-2:] == [500, 250]


# --------------------------------------------------------------- Message-ID


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("message", "msgid"),
    [
        (b"Message-ID: <a@b.example>\r\n\r\nbody\r\n", "<a@b.example>"),
        (b"message-id:<a@b.example>\r\n\r\n", "<a@b.example>"),
        (
            b"Subject: x\r\nMESSAGE-ID:\r\n  <folded@b.example>\r\nTo: y\r\n\r\n",
            "<folded@b.example>",
        ),
        (b"Subject: x\r\nX-Message-ID: <no@b.example>\r\n\r\n", None),
        (b"Subject: no id\r\n\r\nMessage-ID: <body@b.example>\r\n", None),
        (b"\r\nMessage-ID: <body@b.example>\r\n", None),
        (b"Subject: x\r\n\r\n", None),
    ],
)
def test_message_id_is_sniffed_from_the_header_only(mode, message, msgid):
    res = run([*TXN, message + b".\r\n"], mode)
    assert len(res.of(MessageEnd)) == 1
    assert res.message_ids == [msgid]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("limits", "body"),
    [
        (Limits(max_message_size=100), b"x" * 200 + b"\r\n"),  # 552
        (Limits(text_line=100), b"x" * 200 + b"\r\n"),  # 500: line too long
        (Limits(text_line=100), b"Subject: " + b"x" * 200 + b"\r\n"),  # ... in the header
    ],
)
def test_message_id_of_a_refused_message_does_not_depend_on_the_cut(mode, limits, body):
    # The access log shows it for refused messages too: it must not depend on
    # whether the header arrived in the same read as what got the message refused.
    message = b"Message-ID: <r@b.example>\r\n" + body + b"\r\n" + body
    res = run([*TXN, message + b".\r\n"], mode, make_conn(limits))
    assert len(res.of(TransactionRejected)) == 1
    assert res.message_ids == ["<r@b.example>"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("padding", "found"), [(60_000, True), (70_000, False)])
def test_message_id_is_looked_for_in_the_first_64k_only(mode, padding, found):
    header = b"".join(b"X-Pad: " + b"p" * 90 + b"\r\n" for _ in range(padding // 99))
    message = header + b"Message-ID: <late@b.example>\r\n\r\nbody\r\n"
    res = run([*TXN, message + b".\r\n"], mode, make_conn(Limits(max_message_size=10**6)))
    assert len(res.of(MessageEnd)) == 1
    assert res.message_ids == ["<late@b.example>" if found else None]


# ---------------------------------------------------------- enhanced codes


ENHANCED_RE = re.compile(rb"^([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3} ")


def test_every_reply_carries_an_enhanced_code():
    conn = make_conn(Limits(max_recipients=1, max_message_size=50), vrfy=True)
    script = [
        b"FOO\r\n",
        MAIL,
        b"HELO x\r\n",
        b"EHLO client.example.org\r\n",
        b"MAIL FROM:bad\r\n",
        b"MAIL FROM:<a@b.example> FOO=1\r\n",
        MAIL,
        b"RCPT TO:<x@elsewhere.test>\r\n",
        RCPT,
        b"RCPT TO:<bob@example.test>\r\n",
        DATA,
        b"x" * 60 + b"\r\n.\r\n",
        b"NOOP\r\n",
        b"RSET\r\n",
        b"VRFY alice\r\n",
        b"VRFY carol\r\n",
        b"HELP\r\n",
        MAIL,
        RCPT,
        DATA,
        b"x\r\n.\r\n",
        b"x" * 600 + b"\r\n",
        b"QUIT\r\n",
    ]
    res = run(script, "whole", conn)
    replies: list[list[bytes]] = [[]]
    for line in res.lines:
        replies[-1].append(line)
        if line[3:4] == b" ":
            replies.append([])
    replies.pop()
    checked = set()
    for reply in replies:
        first = reply[0]
        if first.startswith((b"250-mx.example.test", b"250 mx.example.test", b"354 ")):
            # RFC 2034 §3: not on the replies to EHLO and HELO; 3xx has none
            assert not any(ENHANCED_RE.match(line) for line in reply)
            continue
        assert ENHANCED_RE.match(first), first
        checked.add(first[:3])
    assert checked == {
        b"500", b"503", b"501", b"555", b"550", b"452", b"552", b"250", b"252", b"214", b"221"
    }  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_no_enhanced_codes_when_disabled(mode):
    conn = make_conn(extensions=Extensions(enhancedstatuscodes=False))
    res = run([EHLO, MAIL, b"FOO\r\n"], mode, conn)
    assert b"ENHANCEDSTATUSCODES" not in res.replies
    assert res.lines[-2:] == [b"250 Ok", b"500 Error: command not recognized"]


# ------------------------------------------------------------ trace headers


DATE = "Tue, 04 Jun 2024 10:00:00 +0000"


def _envelope(helo: str, sender: Mailbox | None, *rcpts: Mailbox) -> Envelope:
    return Envelope(
        helo, esmtp=True, sender=sender, recipients=tuple(Recipient(m, m.local_part) for m in rcpts)
    )


def _headers(raw: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(raw + b"Subject: s\n\nbody\n", policy=email.policy.default)
    return [(k, str(v)) for k, v in msg.items()]


def test_trace_headers_shape():
    env = _envelope("client.example.org", Mailbox("s", "example.org"), Mailbox("alice", DOMAIN))
    raw = trace_headers(env, hostname=HOST, client_ip="192.0.2.7", queue_id="Q1", date=DATE)
    assert raw == (
        b"Return-Path: <s@example.org>\n"
        b"Received: from client.example.org ([192.0.2.7])\n"
        b"\tby mx.example.test (geosmtp) with ESMTP id Q1\n"
        b"\tfor <alice@example.test>; " + DATE.encode() + b"\n"
    )
    assert [k for k, _ in _headers(raw)] == ["Return-Path", "Received", "Subject"]


def test_trace_headers_null_sender_and_several_recipients():
    env = dataclasses.replace(
        _envelope("c", None, Mailbox("a", DOMAIN), Mailbox("b", DOMAIN)), esmtp=False
    )
    raw = trace_headers(env, hostname=HOST, client_ip="::1", queue_id="Q2", date=DATE)
    lines = raw.split(b"\n")
    assert lines[0] == b"Return-Path: <>"
    assert lines[2] == b"\tby mx.example.test (geosmtp) with SMTP id Q2;"
    assert b"for <" not in raw


@pytest.mark.parametrize(
    "evil",
    [
        "x\r\nX-Injected: yes",
        "x\nX-Injected: yes",
        "x\rX-Injected: yes",
        "x\x85X-Injected: yes",
        "x\u2028X-Injected: yes",
        "x\u2029X-Injected: yes",
        "x\x0bX-Injected: yes",
        "x\x0cX-Injected: yes",
        "x\x1cX-Injected: yes",
        "x) (X-Injected: yes",
        "x\\",
    ],
    ids=repr,
)
def test_trace_headers_cannot_be_injected(evil):
    env = _envelope(evil, Mailbox(evil, evil), Mailbox(evil, evil))
    raw = trace_headers(env, hostname=HOST, client_ip=evil, queue_id="Q1", date=DATE)
    text = raw.decode("utf-8")
    assert text.splitlines() == text.split("\n")[:-1]  # no line break but the LFs we put
    assert len(text.splitlines()) == 4
    assert all(
        line.startswith(("Return-Path: ", "Received: ", "\t")) for line in text.split("\n")[:-1]
    )
    assert [k for k, _ in _headers(raw)] == ["Return-Path", "Received", "Subject"]
    received_from = text.split("\n")[1]
    # The client's HELO sits in a comment "( ... )" with the IP; it must not close it.
    assert received_from.count("(") == received_from.count(")") == 1
    assert "\\" not in received_from


@pytest.mark.parametrize("mode", MODES)
def test_trace_headers_from_a_real_session(mode):
    res = run(
        [b"EHLO evil(name)\\\r\n", b'MAIL FROM:<"a)(b"@example.org>\r\n', RCPT, DATA, b".\r\n"],
        mode,
    )
    (end,) = res.of(MessageEnd)
    raw = trace_headers(
        end.envelope, hostname=HOST, client_ip="192.0.2.1", queue_id="Q1", date=DATE
    )
    assert b"from evil?name??" in raw
    # The reverse-path is copied exactly: a bounce must reach this very address.
    assert raw.startswith(b'Return-Path: <"a)(b"@example.org>\n')
    assert raw.count(b"\n") == 4


@pytest.mark.parametrize("mode", MODES)
def test_trace_headers_copy_paths_exactly(mode):
    sender = '"a b)(c\\\\d"@example.org'  # quoted: space, parentheses, an escaped backslash
    res = run([EHLO, f"MAIL FROM:<{sender}>\r\n".encode(), RCPT, DATA, b".\r\n"], mode)
    (end,) = res.of(MessageEnd)
    raw = trace_headers(
        end.envelope, hostname=HOST, client_ip="192.0.2.1", queue_id="Q1", date=DATE
    ).decode()
    assert raw.startswith(f"Return-Path: <{sender}>\n")
    # The forward-path in "for <...>" too (a valid quoted local part, as a policy
    # that maps it to a mailbox would see it).
    env = _envelope("c", None, Mailbox("x)(y", DOMAIN))
    raw = trace_headers(env, hostname=HOST, client_ip="::1", queue_id="Q2", date=DATE)
    assert f'\tfor <"x)(y"@{DOMAIN}>; '.encode() in raw


@pytest.mark.parametrize(
    ("esmtp", "smtputf8", "tls", "auth", "keyword"),
    [
        (False, False, False, False, "SMTP"),
        (True, False, False, False, "ESMTP"),
        (True, False, True, True, "ESMTPSA"),
        (True, True, False, False, "UTF8SMTP"),
        (True, True, True, False, "UTF8SMTPS"),
        (True, True, False, True, "UTF8SMTPA"),
        (True, True, True, True, "UTF8SMTPSA"),
    ],
)
def test_with_protocol_keywords(esmtp, smtputf8, tls, auth, keyword):
    """RFC 3848 and, for SMTPUTF8 mail, RFC 6531 §3.7.3."""
    env = Envelope("c", esmtp=esmtp, smtputf8=smtputf8)
    assert with_protocol(env, tls=tls, authenticated=auth) == keyword


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u2029", "\x9b"], ids=repr)
@pytest.mark.parametrize("mode", MODES)
def test_line_separators_are_not_allowed_in_utf8_addresses(char, mode):
    mail = f'MAIL FROM:<"a{char}b"@example.org> SMTPUTF8\r\n'.encode()
    res = run([EHLO, mail], mode)
    assert res.lines[-1] == b"501 5.1.7 Bad sender address syntax"


def test_header_safe_keeps_ordinary_text():
    assert header_safe("mail.example.org [1.2.3.4] é") == "mail.example.org [1.2.3.4] é"


def test_with_protocol_rfc3848():
    env = Envelope("h", esmtp=True)
    assert with_protocol(env) == "ESMTP"
    assert with_protocol(env, tls=True, authenticated=True) == "ESMTPSA"
    assert with_protocol(env, authenticated=True) == "ESMTPA"
    assert with_protocol(Envelope("h", esmtp=False), tls=True) == "SMTP"


# -------------------------------------------------- mode independence


SCRIPTS = {
    "transaction": [*TXN, MESSAGE + b".\r\n", b"QUIT\r\n"],
    "errors": [b"FOO\r\n", MAIL, EHLO, b"MAIL FROM:x\r\n", MAIL, MAIL, b"RCPT TO:<a@b.c>\r\n"],
    "smuggling": [*TXN, b"a\n.\nb\r.\r\nc\r\n.\r\n", b"NOOP\r\n"],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_modes_agree(name):
    results = [run(SCRIPTS[name], mode) for mode in MODES]
    assert results[0].replies == results[1].replies == results[2].replies
    assert results[0].events == results[1].events == results[2].events


@pytest.mark.parametrize("mode", MODES)
def test_oversize_wins_over_long_line_whatever_the_cut(mode):
    # Size and line length are judged on the whole message: the reply must not
    # depend on whether the long line arrived in one read or in many.
    conn = make_conn(Limits(max_message_size=100, text_line=50))
    res = run([*TXN, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n"], mode, conn)
    assert res.lines[-1].startswith(b"552 5.3.4 ")
    (rejected,) = res.of(TransactionRejected)
    assert rejected.size == 124


@pytest.mark.parametrize("mode", MODES)
def test_discarded_long_line_counts_toward_the_size(mode):
    conn = make_conn(Limits(max_message_size=1000))
    res = run([*TXN, b"." + b"z" * 2000 + b"\r\n.\r\n"], mode, conn)
    assert res.lines[-1].startswith(b"552 5.3.4 ")
    assert res.of(TransactionRejected)[0].size == 2002


_FUZZ_PIECES = [
    EHLO,
    MAIL,
    RCPT,
    DATA,
    b"\r\n.\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"x",
    b"Message-ID: <a>",
    b"y" * 30,
    b"z" * 70,
    b"\r\n\r\n",
    b"NOOP\r\n",
    b"RSET\r\n",
    b"FOO\r\n",
]


def _cut_run(script: bytes, cuts: list[int]) -> tuple:
    conn = make_conn(Limits(max_message_size=200, text_line=60, command_line=40, max_errors=999))
    events: list = []
    out = []
    for start, stop in zip([0, *cuts], [*cuts, len(script)], strict=True):
        if not feed(conn, script[start:stop]):
            break
        drain(conn, events, store_q1)
        out.append(conn.data_to_send())
    result = Result(conn, b"", events)
    ends = [e.size for e in events if isinstance(e, MessageEnd)]
    rejected = [(e.reply, e.size) for e in events if e.__class__ is TransactionRejected]
    return b"".join(out), ends, rejected, result.messages, result.message_ids


def test_replies_do_not_depend_on_how_input_is_cut():
    rng = random.Random(2920)
    for _ in range(150):
        pieces = [rng.choice(_FUZZ_PIECES) for _ in range(rng.randint(1, 30))]
        pieces.insert(rng.randint(0, len(pieces)), b"".join(TXN))  # to get into DATA often
        script = b"".join(pieces) + b"\r\n.\r\nQUIT\r\n"
        expected = _cut_run(script, [])
        cuts = sorted(rng.sample(range(1, len(script)), rng.randint(1, 10)))
        assert _cut_run(script, cuts) == expected, (script, cuts)
        assert _cut_run(script, list(range(1, len(script)))) == expected, script


# ------------------------------------------------- bare LF line ends in DATA


@pytest.mark.parametrize("mode", MODES)
def test_lf_only_message_longer_than_a_line_is_accepted(mode):
    # curl -T sends a file as it is; an LF-only file is many short lines, not one
    # long one, for the text-line limit (as for the Maildir reader).
    body = b"Subject: lf\n\n" + b"".join(b"line %d of an LF-only file\n" % i for i in range(200))
    # curl ends the data with CRLF . CRLF after the file, whatever its line ends.
    res = run([*TXN, body + b"\r\n.\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    (message,) = res.messages
    assert message == body + b"\n"


@pytest.mark.parametrize("mode", MODES)
def test_lf_only_line_over_the_limit_is_refused(mode):
    body = b"Subject: lf\n\n" + b"x" * 1000 + b"\nshort\n"
    res = run([*TXN, body + b"\r\n.\r\n", b"NOOP\r\n"], mode)
    assert after_ehlo(res).endswith(
        GO_AHEAD + b"500 5.5.2 Error: message has a line longer than the limit\r\n250 2.0.0 Ok\r\n"
    )
    assert res.messages == []


@pytest.mark.parametrize("mode", MODES)
def test_dot_after_a_bare_lf_is_neither_an_end_nor_unstuffed(mode):
    res = run([*TXN, b"a\n.\r\n..b\n.c\r\n.\r\n"], mode)
    assert after_ehlo(res) == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    (message,) = res.messages
    # Only a line after CRLF can end the data or lose its transparency dot.
    assert message == b"a\n.\n.b\n.c\n"


# ----------------------------------------------------- per-client rates


class Allowance:
    """`ClientRates` with `n` messages and `n` recipients to give."""

    def __init__(self, n: int) -> None:
        self.left = {"message": n, "recipient": n}
        self.asked = 0

    def _take(self, what: str) -> bool:
        self.asked += 1
        if self.left[what] <= 0:
            return False
        self.left[what] -= 1
        return True

    def message(self) -> bool:
        return self._take("message")

    def recipient(self) -> bool:
        return self._take("recipient")


def rated(n: int, security: Security | None = None) -> tuple[SMTPConnection, Allowance]:
    rates = Allowance(n)
    return make_conn(security=security, rates=rates), rates


@pytest.mark.parametrize("mode", MODES)
def test_a_message_over_the_clients_rate_gets_450_and_the_session_goes_on(mode):
    conn, rates = rated(1)
    steps = [EHLO, MAIL, RCPT, DATA, b"Subject: x\r\n\r\nbody\r\n.\r\n", MAIL, b"NOOP\r\n"]
    r = run(steps, mode, conn)
    assert r.codes == [250, 250, 250, 354, 250, 450, 250]
    assert r.lines[-2].startswith(b"450 4.7.1 ") and b"messages" in r.lines[-2]
    (rejected,) = r.of(TransactionRejected)
    assert rejected.stage == "MAIL" and rejected.reply.code == 450
    assert conn.state is State.GREETED and conn.errors == 1
    assert rates.asked == 3  # MAIL, RCPT, MAIL


@pytest.mark.parametrize("mode", MODES)
def test_a_recipient_over_the_clients_rate_gets_450(mode):
    conn, rates = rated(2)
    rcpt_bob = b"RCPT TO:<bob@" + DOMAIN.encode() + b">\r\n"
    r = run([EHLO, MAIL, RCPT, RCPT, rcpt_bob, DATA, b"x\r\n.\r\n"], mode, conn)
    assert r.codes == [250, 250, 250, 250, 450, 354, 250]
    (rejected,) = r.of(TransactionRejected)
    assert rejected.stage == "RCPT" and rejected.address == f"bob@{DOMAIN}"
    (end,) = r.of(MessageEnd)
    assert len(end.envelope.recipients) == 2
    assert rates.asked == 4  # MAIL and three RCPT


def test_a_bad_command_is_not_counted_against_the_rates():
    conn, rates = rated(5)
    run([EHLO, b"MAIL FROM:<bad\r\n", MAIL, b"RCPT TO:<\r\n"], "whole", conn)
    assert rates.asked == 1  # the one good MAIL


def test_a_logged_in_client_is_not_held_to_the_rates():
    conn, rates = rated(0, Security(auth_available=True, auth_plaintext=True))
    login = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"
    r = run([EHLO, login, MAIL, RCPT], "whole", conn)
    assert r.codes[-3:] == [235, 250, 250]
    assert rates.asked == 0
