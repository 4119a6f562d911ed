"""The SMTP core's contract with its shell, h11-style (issue 9).

What the shell may call when, what it gets back, and what happens when it
calls something at the wrong time; the per-command tally.
"""

from __future__ import annotations

import pytest

from geosmtp.smtp import (
    AuthRequest,
    CloseConnection,
    Extensions,
    Security,
    SMTPConnection,
    StartTLS,
    State,
)
from geosmtp.smtp.state import COMMAND_STATES, SEQUENCE

from .smtp_helpers import (
    DATA,
    EHLO,
    HANDSHAKE,
    MAIL,
    MODES,
    OK,
    QUEUED,
    RCPT,
    make_conn,
    run,
)
from .test_smtp_esmtp import IMPLICIT_TLS, STARTTLS, TLS_ACTIVE, tail

NOT_ENABLED = b"503 5.5.1 Error: authentication not enabled\r\n"
ALREADY = b"503 5.5.1 Error: already authenticated\r\n"
NO_AUTH = Security(tls_available=True)

# ----------------------------------------------------------------- the tally


@pytest.mark.parametrize("mode", MODES)
def test_take_counts_tallies_verbs_and_reply_classes(mode):
    conn = make_conn()
    script = [EHLO, MAIL, RCPT, b"RCPT TO:<x@elsewhere.test>\r\n", b"FOO\r\n", DATA, b".\r\n"]
    res = run(script, mode, conn)
    counts = conn.take_counts()
    noops = 2 if mode == "pipelined" else 0  # the harness's NOOP before and after
    expected = {"EHLO": 1, "MAIL": 1, "RCPT": 2, "UNKNOWN": 1, "DATA": 1, "2xx": 4 + noops}
    expected |= {"3xx": 1, "5xx": 2}
    if noops:
        expected["NOOP"] = noops
    assert counts == expected
    assert res.codes.count(250) == 4  # the last: queued


def test_take_counts_starts_a_new_tally():
    conn = make_conn()
    conn.greeting()
    run([EHLO, MAIL], "whole", conn)
    first = conn.take_counts()
    assert first == {"EHLO": 1, "MAIL": 1, "2xx": 3}
    assert conn.take_counts() == {}
    run([b"NOOP\r\n"], "whole", conn)
    assert conn.take_counts() == {"NOOP": 1, "2xx": 1}
    assert first == {"EHLO": 1, "MAIL": 1, "2xx": 3}  # the caller's dict is left alone


# ------------------------------------------------------ the one command table

BOTH = Security(tls_available=True, auth_available=True, auth_plaintext=True)
IN_PROGRESS = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
NEED_EHLO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
READY = b"220 2.0.0 Ready to start TLS\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"

#: A script that leaves the connection in each state that reads commands.
TO_STATE = {
    State.CONNECTED: [],
    State.GREETED: [EHLO],
    State.MAIL: [EHLO, MAIL],
    State.RCPT: [EHLO, MAIL, RCPT],
    State.BDAT: [EHLO, MAIL, RCPT, b"BDAT 3\r\nabc"],
}


def test_every_verb_has_a_handler_and_a_rule():
    handlers = {name[4:] for name in dir(SMTPConnection) if name.startswith("_do_")}
    assert handlers == set(SEQUENCE)
    assert {"STARTTLS", "AUTH", "BDAT"} <= set(SEQUENCE)


def test_the_table_speaks_only_of_command_states():
    assert set(TO_STATE) == COMMAND_STATES
    for verb, rule in SEQUENCE.items():
        assert set(rule.refused) <= COMMAND_STATES, verb
        assert rule.payload == (verb == "BDAT")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state", list(TO_STATE), ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("verb", "line", "answers"),
    [
        (
            "STARTTLS",
            b"STARTTLS\r\n",
            {State.CONNECTED: READY, State.GREETED: READY, State.MAIL: IN_PROGRESS,
             State.RCPT: IN_PROGRESS, State.BDAT: IN_PROGRESS},
        ),
        (
            "AUTH",
            b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",  # alice, secret
            {State.CONNECTED: NEED_EHLO, State.GREETED: AUTH_OK, State.MAIL: IN_PROGRESS,
             State.RCPT: IN_PROGRESS, State.BDAT: IN_PROGRESS},
        ),
        (
            "BDAT",
            b"BDAT 6 LAST\r\nQUIT\r\n",  # a chunk that would close the session if run
            {State.CONNECTED: NEED_MAIL, State.GREETED: NEED_MAIL, State.MAIL: NEED_RCPT,
             State.RCPT: QUEUED, State.BDAT: QUEUED},
        ),
    ],
)  # fmt: skip
def test_starttls_auth_and_bdat_in_every_state(mode, state, verb, line, answers):
    conn = make_conn(security=BOTH)
    res = run([*TO_STATE[state], line, b"NOOP\r\n"], mode, conn)
    refused = answers[state][:3] == b"503"
    started = verb == "STARTTLS" and not refused
    expected = [answers[state]] if started else [answers[state], OK]
    assert res.reply_lines[-len(expected) :] == [[r.rstrip(b"\r\n")] for r in expected]
    assert (SEQUENCE[verb].refused.get(state) is not None) == refused
    if refused:
        assert conn.state is state  # a refusal changes nothing
        assert not res.of(StartTLS) and not res.of(AuthRequest)
    assert not res.of(CloseConnection)  # the chunk's QUIT was data, never a command


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("security", "setup", "line", "expected"),
    [
        # The command is impossible on this connection, whatever the state: the
        # table's "transaction in progress" or "need MAIL" would mislead.
        (BOTH, [EHLO, MAIL], b"STARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS\r\n"),
        (BOTH, [EHLO, STARTTLS, HANDSHAKE, EHLO, MAIL], STARTTLS, TLS_ACTIVE),
        (NO_AUTH, [EHLO, MAIL], b"AUTH PLAIN x\r\n", NOT_ENABLED),
        (NO_AUTH, [], b"AUTH PLAIN x\r\n", NOT_ENABLED),
        (BOTH, [b"HELO c.example.org\r\n", MAIL], b"AUTH PLAIN x\r\n", NEED_EHLO),
        (BOTH, [EHLO, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", MAIL], b"AUTH LOGIN\r\n", ALREADY),
        # Without a size the chunk cannot be skipped: 501, and no chunk is read.
        (BOTH, [], b"BDAT x\r\n", b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n"),
    ],
)  # fmt: skip
def test_refusals_that_come_before_the_table(mode, security, setup, line, expected):
    conn = make_conn(security=security)
    res = run([*setup, line, b"NOOP\r\n"], mode, conn)
    assert tail(res, 2) == [expected, OK]


# ------------------------------------------------------------------------ HELP


RFC5321 = b"EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"


def _help_verbs(conn: SMTPConnection) -> bytes:
    res = run(b"HELP\r\n", "whole", conn)
    (help_,) = [r for r in res.reply_lines if r[0][:3] == b"214"]
    return help_[1][4:]


@pytest.mark.parametrize(
    ("extensions", "security", "verbs"),
    [
        (Extensions(), Security(), RFC5321 + b" BDAT"),
        (Extensions(chunking=False), Security(), RFC5321),
        (Extensions(), BOTH, RFC5321 + b" BDAT STARTTLS AUTH"),
        (Extensions(starttls=False, auth=False), BOTH, RFC5321 + b" BDAT"),
        (Extensions(), IMPLICIT_TLS, RFC5321 + b" BDAT AUTH"),
    ],
)  # fmt: skip
def test_help_lists_the_dispatchers_verbs(extensions, security, verbs):
    assert _help_verbs(make_conn(extensions=extensions, security=security)) == verbs


@pytest.mark.parametrize("security", [Security(), BOTH])
def test_every_verb_help_lists_is_a_command(security):
    for verb in _help_verbs(make_conn(security=security)).split():
        res = run([verb + b"\r\n"], "whole", make_conn(security=security))
        assert not res.replies.startswith(b"500 "), verb
