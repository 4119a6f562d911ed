"""The POP3 core's contract with its shell, h11-style, as the SMTP core's.

What the shell may call when, what it gets back, what happens when it calls
something at the wrong time; the two tables; where the wording lives.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import geosmtp
import geosmtp.pop3
import geosmtp.pop3.session
from geosmtp.pop3 import (
    AuthRequest,
    Listing,
    LoginFailure,
    POP3Connection,
    POP3Security,
    Retrieve,
    StartTLS,
    State,
    Update,
)
from geosmtp.pop3 import replies as R
from geosmtp.pop3.state import COMMAND_STATES, SEQUENCE, TRANSITIONS, WAITING_STATES
from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, ConnectionClosed, ProtocolError

from .pop3_helpers import LISTING, LOGIN, PLAIN_OK, make_conn, run

# ---------------------------------------------------------------- the shell's calls


def _until(conn: POP3Connection, data: bytes, kind: type | None) -> None:
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


USER_PASS = b"USER alice\r\nPASS secret\r\n"

#: How to bring a connection into each state (the shell silent after the event).
REACH = {
    State.AUTHORIZATION: (b"", None, False),
    State.AUTHENTICATING: (USER_PASS, AuthRequest, False),
    State.TLS_HANDSHAKE: (b"STLS\r\n", StartTLS, False),
    State.TRANSACTION: (b"", None, True),
    State.RETRIEVING: (b"RETR 2\r\n", Retrieve, True),
    State.UPDATE: (b"DELE 1\r\nQUIT\r\n", Update, True),
    State.CLOSED: (b"QUIT\r\n", CloseConnection, False),
}


def reach(state: State) -> POP3Connection:
    """A connection in `state`, its replies so far taken."""
    conn = make_conn(PLAIN_OK)
    data, kind, login = REACH[state]
    if login:
        _until(conn, USER_PASS, AuthRequest)
        conn.login_ok(LISTING)
    _until(conn, data, kind)
    assert conn.state is state
    conn.data_to_send()
    return conn


#: The shell's calls, each with the one state it is allowed in.
CALLS = {
    "login_ok": (lambda c: c.login_ok(LISTING), State.AUTHENTICATING),
    "login_failed": (lambda c: c.login_failed(LoginFailure.AUTH), State.AUTHENTICATING),
    "tls_started": (lambda c: c.tls_started(), State.TLS_HANDSHAKE),
    "retrieve_result": (lambda c: c.retrieve_result(True), State.RETRIEVING),
    "retrieve_result(False)": (lambda c: c.retrieve_result(False), State.RETRIEVING),
    "update_result": (lambda c: c.update_result(True), State.UPDATE),
    "update_result(False)": (lambda c: c.update_result(False, 1), State.UPDATE),
}
#: Where each call leaves the connection.
AFTER = {
    "login_ok": State.TRANSACTION,
    "login_failed": State.AUTHORIZATION,
    "tls_started": State.AUTHORIZATION,
    "retrieve_result": State.TRANSACTION,
    "retrieve_result(False)": State.TRANSACTION,
    "update_result": State.CLOSED,
    "update_result(False)": State.CLOSED,
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
    line = b"-ERR [SYS/TEMP] Internal server error; closing the connection.\r\n"
    assert conn.data_to_send() == line
    assert conn.next_event() == CloseConnection(R.INTERNAL_ERROR)
    assert conn.state is State.CLOSED and conn.closed_in is state
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("name", list(CALLS))
def test_each_call_works_in_its_state(name):
    """The misuse test above is not met by a call that always fails."""
    call, allowed = CALLS[name]
    conn = reach(allowed)
    call(conn)
    assert conn.state is AFTER[name]
    expected = ConnectionClosed if AFTER[name] is State.CLOSED else None
    event = conn.next_event()
    if expected is None:
        assert event is NEED_DATA
    else:
        assert type(event) is CloseConnection and event.reply is not None


@pytest.mark.parametrize("state", sorted(WAITING_STATES - {State.ERROR}, key=lambda s: s.name))
def test_waiting_states_pause(state):
    conn = reach(state)
    conn.receive_data(b"NOOP\r\n")  # input waits
    assert conn.next_event() is PAUSED and conn.next_event() is PAUSED
    assert conn.state is state and conn.data_to_send() == b""


def test_a_verdict_given_twice_is_a_misuse():
    conn = reach(State.AUTHENTICATING)
    conn.login_ok(LISTING)
    with pytest.raises(ProtocolError):
        conn.login_failed(LoginFailure.AUTH)
    assert conn.state is State.ERROR
    assert conn.data_to_send() == b"+OK Logged in.\r\n"  # still owed


@pytest.mark.parametrize(
    "listing",
    [
        [Listing(10, "a"), Listing(20, "a")],  # not unique
        [Listing(10, "")],
        [Listing(10, "x" * 71)],
        [Listing(10, "has space")],
        [Listing(10, "tab\t")],
        [Listing(10, "caf\u00e9")],
        [Listing(10, "del\x7f")],
        [Listing(-1, "a")],
        [Listing("10", "a")],  # type: ignore[arg-type]
        [Listing(10, 7)],  # type: ignore[arg-type]
        [("a", 10)],
    ],
)
def test_login_ok_needs_a_valid_listing(listing):
    conn = reach(State.AUTHENTICATING)
    with pytest.raises(ProtocolError):
        conn.login_ok(listing)
    assert conn.state is State.ERROR and conn.closed_in is State.AUTHENTICATING
    assert conn.data_to_send() == b"" and conn.user is None


def test_login_ok_takes_any_sequence_and_the_longest_uid():
    conn = reach(State.AUTHENTICATING)
    uid = "".join(chr(c) for c in range(0x21, 0x7F))[:70]
    conn.login_ok(iter([Listing(0, uid), Listing(5, "~")]))  # type: ignore[arg-type]
    assert conn.listing == (Listing(0, uid), Listing(5, "~"))
    assert conn.user == "alice" and conn.listing_total() == (2, 5)


def test_login_failed_needs_a_reason():
    conn = reach(State.AUTHENTICATING)
    with pytest.raises(ProtocolError):
        conn.login_failed("AUTH")  # type: ignore[arg-type]
    assert conn.state is State.ERROR


@pytest.mark.parametrize(("ok", "failed"), [(True, 1), (False, 2), (False, -1), (True, -1)])
def test_update_result_checks_its_count(ok, failed):
    conn = reach(State.UPDATE)  # one message deleted
    with pytest.raises(ProtocolError):
        conn.update_result(ok, failed)
    assert conn.state is State.ERROR and conn.data_to_send() == b""


def test_greeting_once_and_first():
    conn = make_conn()
    assert conn.greeting().startswith(b"+OK ")
    with pytest.raises(ProtocolError):
        conn.greeting()
    assert conn.state is State.ERROR
    late = reach(State.TRANSACTION)
    with pytest.raises(ProtocolError):
        late.greeting()
    assert late.state is State.ERROR and late.closed_in is State.TRANSACTION


def test_receive_data_after_the_end():
    conn = reach(State.TRANSACTION)
    conn.receive_data(b"")
    conn.receive_data(b"")  # harmless
    with pytest.raises(ProtocolError):
        conn.receive_data(b"NOOP\r\n")
    assert conn.state is State.ERROR
    closed = reach(State.CLOSED)
    with pytest.raises(ProtocolError):
        closed.receive_data(b"NOOP\r\n")
    assert closed.state is State.CLOSED


@pytest.mark.parametrize("state", list(REACH), ids=lambda s: s.name)
def test_close_with_works_in_every_state_and_never_updates(state):
    conn = reach(state)
    conn.close_with(R.AUTOLOGOUT)
    assert conn.state is State.CLOSED
    if state is State.CLOSED:  # already closed: nothing more is sent
        assert conn.data_to_send() == b""
        return
    assert conn.data_to_send() == b"-ERR [SYS/TEMP] Autologout: idle for too long.\r\n"
    assert conn.next_event() == CloseConnection(R.AUTOLOGOUT)
    assert conn.next_event() == ConnectionClosed()
    assert conn.closed_in is state


@pytest.mark.parametrize(
    ("text", "code", "line"),
    [
        ("Bye.", None, b"-ERR Bye.\r\n"),
        ("Bye.", "SYS/PERM", b"-ERR [SYS/PERM] Bye.\r\n"),
        ("Bye.", "in-use", b"-ERR [IN-USE] Bye.\r\n"),
        ("two\r\nlines\x00", "SYS/TEMP", b"-ERR [SYS/TEMP] two lines\r\n"),
        ("Bye.", "SYS] +OK [X", b"-ERR [SYSOKX] Bye.\r\n"),
        ("Bye.", "[]", b"-ERR Bye.\r\n"),
        ("x" * 2000, "SYS/TEMP", b"-ERR [SYS/TEMP] " + b"x" * R.MAX_TEXT + b"\r\n"),
        ("caf\u00e9", "SYS/TEMP", "-ERR [SYS/TEMP] caf\u00e9\r\n".encode()),
    ],
)
def test_close_with_text_is_one_safe_line(text, code, line):
    conn = make_conn()
    conn.close_with(R.closing(text, code))
    assert conn.data_to_send() == line


def test_refusal_lines():
    assert R.STOPPING.to_bytes() == b"-ERR [SYS/TEMP] Server shutting down; try again later.\r\n"
    assert R.TOO_MANY_CLIENTS.to_bytes() == (
        b"-ERR [SYS/TEMP] Too many connections; try again later.\r\n"
    )


def test_security_auth_allowed():
    assert not POP3Security().auth_allowed
    assert not POP3Security(tls_available=True).auth_allowed
    assert POP3Security(tls_active=True).auth_allowed
    assert POP3Security(auth_plaintext=True).auth_allowed


def test_handlers_are_looked_up_on_the_connection():
    class Loud(POP3Connection):
        def _do_NOOP(self, arg: bytes) -> None:
            self._reply(R.ok("loud"))

    conn = Loud("pop.test", PLAIN_OK)
    res = run([*LOGIN, b"NOOP\r\n"], "whole", conn)
    assert res.replies.endswith(b"+OK loud\r\n")


# ------------------------------------------------------------------- no -O hole

CORE = Path(geosmtp.pop3.__file__).parent


def test_no_assert_in_the_core():
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(CORE.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


_UNDER_O = """
assert not __debug__, "asserts are on"
from geosmtp.pop3 import POP3Connection, POP3Security, LoginFailure
from geosmtp.protocol import ProtocolError
conn = POP3Connection("pop.test", POP3Security())
for name, call in [
    ("login_ok", lambda: conn.login_ok([])),
    ("login_failed", lambda: conn.login_failed(LoginFailure.AUTH)),
    ("retrieve_result", lambda: conn.retrieve_result(True)),
    ("update_result", lambda: conn.update_result(True)),
]:
    try:
        call()
    except ProtocolError:
        print(name, conn.state.name)
    else:
        print(name, "did not raise")
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
        "login_ok ERROR",
        "login_failed ERROR",
        "retrieve_result ERROR",
        "update_result ERROR",
        "",
    ]


# ------------------------------------------------------------------- the tables


def test_every_verb_has_a_handler_and_a_rule():
    handlers = {name[4:] for name in dir(POP3Connection) if name.startswith("_do_")}
    assert handlers == set(SEQUENCE) == set(R.SYNTAX)


def test_the_table_speaks_only_of_command_states():
    for rule in SEQUENCE.values():
        assert set(rule.refused) <= COMMAND_STATES
        assert set(rule.refused) != COMMAND_STATES  # every verb runs somewhere


def test_every_state_is_reachable_and_can_close():
    seen, todo = {State.AUTHORIZATION}, [State.AUTHORIZATION]
    while todo:
        for after in TRANSITIONS[todo.pop()].values():
            if after not in seen:
                seen.add(after)
                todo.append(after)
    assert seen == set(State) - {State.ERROR}  # ERROR is entered on misuse only
    for state in State:
        assert (TRANSITIONS[state].get("close") is State.CLOSED) == (state is not State.CLOSED)
    assert TRANSITIONS[State.CLOSED] == {}
    assert WAITING_STATES.isdisjoint(COMMAND_STATES)
    assert WAITING_STATES | COMMAND_STATES | {State.CLOSED} == set(State)


def test_update_is_reached_only_by_quit_after_login():
    into_update = {(s, step) for s, steps in TRANSITIONS.items() for step, a in steps.items()
                   if a is State.UPDATE}  # fmt: skip
    assert into_update == {(State.TRANSACTION, "quit")}


def test_the_session_takes_exactly_the_tables_steps():
    source = Path(geosmtp.pop3.session.__file__).read_text()
    taken = set(re.findall(r'_move\("(\w+)"\)', source))
    expected = {step for steps in TRANSITIONS.values() for step in steps}
    assert taken == expected
    assert (
        re.findall(r"self\.state = (?!after\b|State\.ERROR\b|State\.AUTHORIZATION\b)", source) == []
    )


# ------------------------------------------------------------ the wording's home


def _status_literals(tree: ast.AST) -> list[int]:
    """Lines with a str or bytes constant that starts a POP3 status line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            value = node.value if isinstance(node.value, bytes) else node.value.encode()
            if value.startswith((b"+OK", b"-ERR")):
                found.append(node.lineno)
    return found


def test_no_pop3_reply_is_worded_outside_replies_py():
    package = Path(geosmtp.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{line}"
        for path in sorted(package.rglob("*.py"))
        if path != CORE / "replies.py"
        for line in _status_literals(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_the_wording_check_sees_both_spellings():
    tree = ast.parse('x = b"+OK done"\ny = "-ERR no"\nz = "OK"\n')
    assert _status_literals(tree) == [1, 2]
