"""The SMTP core's contract with its shell, h11-style (issue 9).

What the shell may call when, what it gets back, and what happens when it
calls something at the wrong time; the per-command tally.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

import geosmtp
import geosmtp.smtp
import geosmtp.smtp.session
from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, ConnectionClosed, ProtocolError
from geosmtp.smtp import (
    AuthRequest,
    Extensions,
    MessageData,
    MessageEnd,
    MessageStart,
    Security,
    SMTPConnection,
    StartTLS,
    State,
)
from geosmtp.smtp import replies as R
from geosmtp.smtp.rules import Rule
from geosmtp.smtp.state import (
    COMMAND_STATES,
    TRANSACTION_STATES,
    TRANSITIONS,
    WAITING_STATES,
    Step,
)

from .smtp_helpers import (
    DATA,
    EHLO,
    GO_AHEAD,
    HANDSHAKE,
    MAIL,
    MODES,
    OK,
    QUEUED,
    RCPT,
    RCPT_OK,
    SENDER_OK,
    Result,
    drain,
    feed,
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


# The command table (SMTPConnection.COMMANDS: verb -> its rule and handler).
SEQUENCE = SMTPConnection.COMMANDS


def test_every_verb_has_a_handler_and_a_rule():
    handlers = {name[4:] for name in dir(SMTPConnection) if name.startswith("_do_")}
    assert handlers == set(SEQUENCE)
    assert {verb: rule.handler.__name__ for verb, rule in SEQUENCE.items()} == {
        verb: f"_do_{verb}" for verb in SEQUENCE
    }
    assert {"STARTTLS", "AUTH", "BDAT"} <= set(SEQUENCE)


def test_a_subclass_extends_the_command_table():
    """A subclass (LMTP's) puts its own handlers and verbs in its own table,
    and drops verbs: those are unknown commands, neither in HELP nor in EHLO."""

    class Loud(SMTPConnection):
        def _do_NOOP(self, arg: bytes) -> None:
            self._send(R.VRFY_CANNOT)

        COMMANDS: ClassVar = {
            **{v: r for v, r in SMTPConnection.COMMANDS.items() if v not in ("AUTH", "VRFY")},
            "NOOP": Rule(_do_NOOP),
        }

    conn = Loud("mx.test", make_conn().policy, security=BOTH)
    res = run([EHLO, b"NOOP\r\n", b"AUTH PLAIN x\r\n", b"HELP\r\n"], "whole", conn)
    assert res.reply_lines[1:3] == [
        [R.VRFY_CANNOT.to_bytes().rstrip()],
        [b"500 5.5.2 Error: command not recognized"],
    ]
    ehlo, help_reply = res.reply_lines[0], b" ".join(res.reply_lines[3])
    assert not any(b"AUTH" in line or b"VRFY" in line for line in [*ehlo, help_reply])
    assert b"STARTTLS" in help_reply and b"NOOP" in help_reply
    assert SMTPConnection.COMMANDS["NOOP"].handler is SMTPConnection._do_NOOP  # its own untouched


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


# ------------------------------------------------- misuse: ProtocolError, ERROR


def _until(conn: SMTPConnection, data: bytes, kind: type | None) -> None:
    """Feed `data` and take events up to one of `kind` (None: until NEED_DATA),
    answering nothing: the test decides what the shell says next."""
    if data:
        conn.receive_data(data)
    while True:
        event = conn.next_event()
        if kind is not None and isinstance(event, kind):
            return
        assert event is not PAUSED, "paused before the event"
        assert not isinstance(event, ConnectionClosed)
        if event is NEED_DATA:
            assert kind is None, f"no {kind.__name__}"
            return


#: How to bring a connection into each state (the shell silent after the event).
REACH = {
    State.CONNECTED: (b"", None),
    State.GREETED: (EHLO, None),
    State.MAIL: (EHLO + MAIL, None),
    State.RCPT: (EHLO + MAIL + RCPT, None),
    State.DATA: (EHLO + MAIL + RCPT + DATA + b"half a mess", None),
    State.BDAT: (EHLO + MAIL + RCPT + b"BDAT 10\r\nhalf", None),
    State.DELIVERING: (EHLO + MAIL + RCPT + DATA + b"x\r\n.\r\n", MessageEnd),
    State.AUTHENTICATING: (EHLO + b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", AuthRequest),
    State.TLS_HANDSHAKE: (EHLO + STARTTLS, StartTLS),
    State.CLOSED: (EHLO + b"QUIT\r\n", CloseConnection),
}


def reach(state: State) -> SMTPConnection:
    """A connection in `state`, its replies so far taken."""
    conn = make_conn(security=BOTH)
    data, kind = REACH[state]
    _until(conn, data, kind)
    assert conn.state is state
    conn.data_to_send()
    return conn


#: The shell's calls, each with the one state it is allowed in (None: see below).
CALLS = {
    "message_stored": (lambda c: c.message_stored("Q1"), State.DELIVERING),
    "message_failed": (lambda c: c.message_failed(), State.DELIVERING),
    "auth_result": (lambda c: c.auth_result("alice"), State.AUTHENTICATING),
    "auth_result(None)": (lambda c: c.auth_result(None), State.AUTHENTICATING),
    "tls_started": (lambda c: c.tls_started(), State.TLS_HANDSHAKE),
}

MISUSES = [
    (name, state) for name, (_, allowed) in CALLS.items() for state in REACH if state is not allowed
]


def test_every_state_can_be_reached_for_the_misuse_tests():
    assert set(REACH) == set(State) - {State.ERROR}


@pytest.mark.parametrize(("name", "state"), MISUSES, ids=lambda x: getattr(x, "name", x))
def test_a_call_at_the_wrong_time_raises_and_leaves_error(name, state):
    conn = reach(state)
    call, _ = CALLS[name]
    with pytest.raises(ProtocolError):
        call(conn)
    if state is State.CLOSED:
        assert conn.state is State.CLOSED  # nothing left to fail
        return
    assert conn.state is State.ERROR and conn.closed_in is state
    assert conn.data_to_send() == b""  # nothing was answered
    # In ERROR nothing is read or handed out, and every call but close_with fails.
    assert conn.next_event() is PAUSED
    for other, _ in CALLS.values():
        with pytest.raises(ProtocolError):
            other(conn)
    with pytest.raises(ProtocolError):
        conn.receive_data(b"NOOP\r\n")
    assert conn.state is State.ERROR and conn.next_event() is PAUSED
    # The one way out: close, with a reply.
    conn.close_with(R.INTERNAL_ERROR)
    assert conn.data_to_send() == R.INTERNAL_ERROR.to_bytes()
    assert conn.next_event() == CloseConnection(R.INTERNAL_ERROR)
    assert conn.state is State.CLOSED and conn.closed_in is state


@pytest.mark.parametrize("name", list(CALLS))
def test_each_call_works_in_its_state(name):
    """The misuse test above is not met by a call that always fails."""
    call, allowed = CALLS[name]
    conn = reach(allowed)
    call(conn)
    assert conn.state in (State.GREETED, State.CONNECTED)
    assert conn.next_event() is NEED_DATA


def test_a_verdict_given_twice_is_a_misuse():
    conn = reach(State.DELIVERING)
    conn.message_stored("Q1")
    with pytest.raises(ProtocolError):
        conn.message_failed()
    assert conn.state is State.ERROR
    assert conn.data_to_send().endswith(b"250 2.0.0 Ok: queued as Q1\r\n")  # still owed


@pytest.mark.parametrize("reply", [R.OK, R.START_DATA, R.AUTH_ASK_USERNAME])
def test_message_failed_needs_a_failure(reply):
    conn = reach(State.DELIVERING)
    with pytest.raises(ProtocolError):
        conn.message_failed(reply)
    assert conn.state is State.ERROR and conn.data_to_send() == b""


@pytest.mark.parametrize("reply", [R.LOCAL_ERROR, R.INSUFFICIENT_STORAGE, R.MESSAGE_TOO_BIG])
def test_message_failed_takes_a_4xx_or_5xx(reply):
    conn = reach(State.DELIVERING)
    conn.message_failed(reply)
    assert conn.state is State.GREETED and conn.envelope is None
    assert conn.data_to_send() == reply.to_bytes()


def test_greeting_once_and_first():
    conn = make_conn()
    assert conn.greeting().startswith(b"220 ")
    with pytest.raises(ProtocolError):
        conn.greeting()
    assert conn.state is State.ERROR
    late = reach(State.GREETED)
    with pytest.raises(ProtocolError):
        late.greeting()
    assert late.state is State.ERROR and late.closed_in is State.GREETED


def test_receive_data_after_close_with():
    conn = reach(State.MAIL)
    conn.close_with(R.TIMEOUT)
    with pytest.raises(ProtocolError):
        conn.receive_data(RCPT)
    assert conn.state is State.CLOSED and conn.closed_in is State.MAIL


@pytest.mark.parametrize("state", list(REACH), ids=lambda s: s.name)
def test_close_with_works_in_every_state(state):
    conn = reach(state)
    conn.close_with(R.SHUTTING_DOWN)
    assert conn.state is State.CLOSED
    if state is State.CLOSED:  # already closed: nothing more is sent
        assert conn.data_to_send() == b""
    else:
        assert conn.data_to_send() == R.SHUTTING_DOWN.to_bytes()
        assert conn.next_event() == CloseConnection(R.SHUTTING_DOWN)
        assert conn.closed_in is state


def test_no_assert_in_the_core():
    """Checks that `python -O` would strip cannot guard anything in the core."""
    core = Path(geosmtp.smtp.__file__).parent
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(core.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


_UNDER_O = """
import sys
assert not __debug__, "asserts are on"
from geosmtp.protocol import ProtocolError
from geosmtp.smtp import RecipientPolicy, SMTPConnection
from geosmtp.smtp import replies as R
conn = SMTPConnection("mx.test", RecipientPolicy(local_domains=frozenset({"example.test"})))
for name, call in [
    ("message_stored", lambda: conn.message_stored("Q1")),
    ("message_failed", lambda: conn.message_failed()),
    ("auth_result", lambda: conn.auth_result("alice")),
    ("tls_started", lambda: conn.tls_started()),
]:
    try:
        call()
    except ProtocolError:
        print(name, conn.state.name)
    else:
        print(name, "did not raise")
conn.close_with(R.TIMEOUT)  # the way out of ERROR; then nothing may be fed
try:
    conn.receive_data(b"NOOP\\r\\n")
except ProtocolError:
    print("receive_data", conn.state.name)
"""


def test_misuse_raises_under_python_O():
    env = {**os.environ, "PYTHONPATH": str(Path(geosmtp.__file__).parent.parent)}
    out = subprocess.run(
        [sys.executable, "-O", "-c", _UNDER_O],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert out.stdout.split("\n") == [
        "message_stored ERROR",
        "message_failed ERROR",
        "auth_result ERROR",
        "tls_started ERROR",
        "receive_data CLOSED",
        "",
    ]


# ------------------------------------------------------- the transition table


def test_commands_lead_where_the_command_table_admits_them():
    """A command the sequencing table accepts has its step in the transition
    table from exactly those states, and from no other."""
    steps = {"MAIL": Step.MAIL, "RCPT": Step.RCPT, "DATA": Step.DATA, "STARTTLS": Step.STARTTLS}
    steps |= {"AUTH": Step.AUTH}
    for verb, step in steps.items():
        accepted = COMMAND_STATES - set(SEQUENCE[verb].refused)
        assert accepted == {s for s in State if step in TRANSITIONS[s]}, verb
    # BDAT's first chunk starts the message; later ones keep the state.
    assert COMMAND_STATES - set(SEQUENCE["BDAT"].refused) == {State.RCPT, State.BDAT}
    assert {s for s in State if "bdat" in TRANSITIONS[s]} == {State.RCPT}
    # EHLO and HELO abandon a transaction first (reset), then greet.
    greet = {s for s in State if "greet" in TRANSITIONS[s]}
    assert greet == COMMAND_STATES - TRANSACTION_STATES
    assert {s for s in State if "reset" in TRANSITIONS[s]} == TRANSACTION_STATES


def test_every_state_is_reachable_and_can_close():
    seen, todo = {State.CONNECTED}, [State.CONNECTED]
    while todo:
        for after in TRANSITIONS[todo.pop()].values():
            if after not in seen:
                seen.add(after)
                todo.append(after)
    assert seen == set(State) - {State.ERROR}  # ERROR is entered on misuse only
    for state in State:
        assert (TRANSITIONS[state].get("close") is State.CLOSED) == (state is not State.CLOSED)
    assert TRANSITIONS[State.ERROR] == {"close": State.CLOSED}
    assert TRANSITIONS[State.CLOSED] == {}


def test_waiting_states_take_only_their_verdicts():
    assert set(TRANSITIONS[State.DELIVERING]) == {"message_stored", "message_failed", "close"}
    assert set(TRANSITIONS[State.AUTHENTICATING]) == {"auth_result", "close"}
    assert set(TRANSITIONS[State.TLS_HANDSHAKE]) == {"tls_started", "close"}
    assert WAITING_STATES.isdisjoint(COMMAND_STATES)


def test_the_session_takes_exactly_the_tables_steps():
    """Every state change in session.py is a step the table has, and every
    step in the table is taken somewhere."""
    source = Path(geosmtp.smtp.session.__file__).read_text()
    taken = {Step[name] for name in re.findall(r"(?:_move|_verdict)\(Step\.(\w+)\b", source)}
    assert taken == {step for steps in TRANSITIONS.values() for step in steps}
    # Every other _move names its Step; _verdict passes on the one it was given.
    assert re.findall(r"_move\((?!Step\.)(\w+)", source) == ["step"]
    assert re.findall(r"self\.state = (?!after\b|State\.ERROR\b|State\.CONNECTED\b)", source) == []


# ------------------------------------------------------ end of input is an event


def to_the_end(steps: list[bytes], mode: str) -> Result:
    """Feed `steps`, then the end of input (`b""`), answering like the shell.

    whole: a step per receive_data; bytewise: an octet each; pipelined: all of
    it and the end of input before the first next_event()."""
    conn = make_conn(security=BOTH)
    data = b"".join(steps)
    chunks = {
        "whole": list(steps),
        "bytewise": [data[i : i + 1] for i in range(len(data))],
        "pipelined": [data],
    }[mode]
    events: list = []
    for chunk in chunks:
        feed(conn, chunk)
        if mode != "pipelined":
            drain(conn, events)
    if feed(conn, b""):  # the shell does not read after CloseConnection
        drain(conn, events)
    return Result(conn, conn.data_to_send(), events)


TXN_OPEN = [EHLO, MAIL, RCPT]
EHLO_REPLY = run(EHLO, "whole", make_conn(security=BOTH)).replies
OPEN_REPLIES = EHLO_REPLY + SENDER_OK + RCPT_OK


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("steps", "replies", "kinds", "closed_in"),
    [
        ([], b"", [], State.CONNECTED),
        ([b"NOO"], b"", [], State.CONNECTED),  # an unfinished command is dropped
        ([EHLO], EHLO_REPLY, [], State.GREETED),
        ([EHLO, b"NOOP\r\nRSE"], EHLO_REPLY + OK, [], State.GREETED),
        ([EHLO, MAIL], EHLO_REPLY + SENDER_OK, [], State.MAIL),
        (TXN_OPEN, OPEN_REPLIES, [], State.RCPT),
        # in DATA: the complete lines are handed out, the unfinished one dropped
        ([*TXN_OPEN, DATA, b"Subject: s\r\n\r\nhalf a mess"], OPEN_REPLIES + GO_AHEAD,
         [MessageStart, MessageData], State.DATA),
        ([*TXN_OPEN, DATA, b"body\r\n."], OPEN_REPLIES + GO_AHEAD, [MessageStart, MessageData],
         State.DATA),
        ([*TXN_OPEN, DATA, b"body\r\n.\r"], OPEN_REPLIES + GO_AHEAD,
         [MessageStart, MessageData], State.DATA),
        # in a BDAT chunk, and between two
        ([*TXN_OPEN, b"BDAT 10\r\nhalf"], OPEN_REPLIES, [MessageStart, MessageData], State.BDAT),
        ([*TXN_OPEN, b"BDAT 3\r\nabc"], OPEN_REPLIES + b"250 2.0.0 Ok: 3 octets received\r\n",
         [MessageStart, MessageData], State.BDAT),
        # a refused chunk: its 503 would follow the chunk, which never ends
        ([EHLO, b"BDAT 10\r\nQUIT\r\n"], EHLO_REPLY, [], State.GREETED),
        # in an AUTH exchange
        ([EHLO, b"AUTH LOGIN\r\n", b"YWxp"], EHLO_REPLY + b"334 VXNlcm5hbWU6\r\n", [],
         State.GREETED),
    ],
)  # fmt: skip
def test_end_of_input_in_every_state(mode, steps, replies, kinds, closed_in):
    res = to_the_end(steps, mode)
    conn = res.conn
    assert res.replies == replies
    assert [type(e) for e in res.events] == [*kinds, ConnectionClosed]
    assert conn.state is State.CLOSED and conn.closed_in is closed_in
    assert conn.next_event() == ConnectionClosed()  # and again: it is over
    with pytest.raises(ProtocolError):
        conn.receive_data(b"NOOP\r\n")
    # The shell logs a transaction the client walked away from.
    assert (conn.envelope is not None) == (closed_in in TRANSACTION_STATES | {State.DATA})


@pytest.mark.parametrize("mode", MODES)
def test_end_of_input_in_data_keeps_the_size_of_what_came(mode):
    res = to_the_end([*TXN_OPEN, DATA, b"Subject: s\r\n\r\nhalf a mess"], mode)
    assert res.conn.message_size == len(b"Subject: s\r\n\r\n")
    assert b"".join(e.data for e in res.of(MessageData)) == b"Subject: s\n\n"
    assert not res.of(MessageEnd)


@pytest.mark.parametrize("mode", MODES)
def test_end_of_input_in_a_chunk_keeps_the_size_of_what_came(mode):
    res = to_the_end([*TXN_OPEN, b"BDAT 3\r\nabc", b"BDAT 10\r\nhalf"], mode)
    assert res.conn.message_size == 7
    assert b"".join(e.data for e in res.of(MessageData)) == b"abchalf"
    assert not res.of(MessageEnd)


@pytest.mark.parametrize("mode", MODES)
def test_commands_before_the_end_of_input_are_all_answered(mode):
    """A client that sends its last commands and closes at once (a half-close):
    everything complete is processed and answered before ConnectionClosed."""
    steps = [EHLO, MAIL, RCPT, DATA, b"x\r\n.\r\n", b"NOOP\r\n", b"QUIT\r\n"]
    res = to_the_end(steps, mode)
    assert res.replies.endswith(QUEUED + OK + b"221 2.0.0 mx.example.test closing connection\r\n")
    # QUIT closed the session first: the end of input was never needed.
    assert [type(e) for e in res.events][-2:] == [MessageEnd, CloseConnection]
    assert res.conn.next_event() == ConnectionClosed()
    res = to_the_end(steps[:-1], mode)
    assert res.replies.endswith(QUEUED + OK)
    assert [type(e) for e in res.events][-2:] == [MessageEnd, ConnectionClosed]
    assert res.conn.closed_in is State.GREETED and res.conn.envelope is None


@pytest.mark.parametrize(
    ("state", "verdict"),
    [
        (State.DELIVERING, lambda c: c.message_stored("Q1")),
        (State.AUTHENTICATING, lambda c: c.auth_result("alice")),
        (State.TLS_HANDSHAKE, lambda c: c.tls_started()),
    ],
    ids=["delivering", "authenticating", "tls"],
)
def test_end_of_input_while_waiting_for_a_verdict(state, verdict):
    """The end of input waits behind the verdict like any input; PAUSED means
    only 'waiting for the shell'."""
    conn = reach(state)
    conn.receive_data(b"NOOP\r\n")
    conn.receive_data(b"")
    assert conn.next_event() is PAUSED and conn.state is state
    verdict(conn)
    if state is State.TLS_HANDSHAKE:  # the NOOP came in the clear: discarded
        assert conn.next_event() == ConnectionClosed()
        assert conn.data_to_send() == b""
    else:
        assert conn.next_event() == ConnectionClosed()
        assert conn.data_to_send().endswith(OK)  # the NOOP before the end was run
    assert conn.state is State.CLOSED


def test_data_after_the_end_of_input_is_a_misuse():
    conn = reach(State.GREETED)
    conn.receive_data(b"NOOP\r\n")
    conn.receive_data(b"")
    conn.receive_data(b"")  # saying it twice is harmless
    with pytest.raises(ProtocolError):
        conn.receive_data(b"RSET\r\n")
    assert conn.state is State.ERROR and conn.next_event() is PAUSED
    assert conn.data_to_send() == b""  # neither the NOOP nor the RSET ran


def test_no_paused_for_a_closed_connection():
    """PAUSED means 'waiting for a verdict'; a session that is over says so."""
    for script in (b"QUIT\r\n", b""):
        conn = make_conn()
        conn.receive_data(script)
        while not isinstance(conn.next_event(), CloseConnection | ConnectionClosed):
            pass
        assert [conn.next_event() for _ in range(3)] == [ConnectionClosed()] * 3


@pytest.mark.parametrize("end", ["close_with", "end_of_input", "misuse"])
def test_not_in_data_once_over(end):
    conn = reach(State.BDAT)
    assert conn.in_data
    if end == "close_with":
        conn.close_with(R.TIMEOUT)
    elif end == "end_of_input":
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed()
    else:
        with pytest.raises(ProtocolError):
            conn.tls_started()
    assert not conn.in_data
    assert conn.message_size == 4  # "half" of the chunk came: the shell logs it


# ------------------------------------------- the extension points of a subclass


class PerRecipient(SMTPConnection):
    """LMTP's shape (RFC 2033 §4.2): a banner of its own, and one reply per
    accepted recipient after the message, through `_verdict`."""

    def banner(self) -> R.Reply:
        return R.reply(220, None, "per-recipient ready")

    def recipients_done(self, replies: list[R.Reply]) -> None:
        self._verdict(Step.MESSAGE_STORED, replies)


@pytest.mark.parametrize("mode", MODES)
def test_a_subclass_gives_one_reply_per_recipient(mode):
    conn = PerRecipient("mx.test", make_conn().policy)
    assert conn.greeting() == b"220 per-recipient ready\r\n"
    rcpt2 = b"RCPT TO:<bob@example.test>\r\n"
    script = [EHLO, MAIL, RCPT, rcpt2, DATA, b"Hi\r\n.\r\n", b"NOOP\r\n"]
    data = b"".join(script)
    chunks = {"whole": script, "bytewise": [data[i : i + 1] for i in range(len(data))]}
    stored = R.reply(250, "2.1.5", "alice ok")
    ends: list = []

    def on_end(conn, event):
        ends.append(event)
        assert len(event.envelope.recipients) == 2
        conn.recipients_done([stored, R.LOCAL_ERROR])

    events: list = []
    for chunk in chunks.get(mode, [data]):
        feed(conn, chunk)
        drain(conn, events, on_end=on_end)
    assert len(ends) == 1
    out = conn.data_to_send()
    assert out.endswith(stored.to_bytes() + R.LOCAL_ERROR.to_bytes() + OK)
    assert conn.state is State.GREETED and conn.envelope is None
    assert conn.errors == 1  # the 451 counts against the error budget, the 250 does not
