"""Fuzzing the sans-I/O POP3 core with hypothesis (issue 19).

A state machine plays a hostile client and the shell at once: it sends random
but plausible commands (every keyword, with good, bad and random arguments),
logins by USER/PASS and AUTH, STLS, DELE/RSET/RETR/TOP/QUIT sequences,
pipelined groups, over-long lines and random bytes, and answers the core's
events as the shell does (it streams each retrieved message through a
`MessageEncoder`). After every step:

- every reply is well formed: status lines `+OK`/`-ERR [CODE] text` (or a
  SASL `+ ` challenge) of printable ASCII, at most 512 octets (RFC 2449 §4);
  multi-line replies end with "." and are dot-stuffed; a retrieved message
  comes back, unstuffed, as the bytes stored, with the size LIST gave;
- no exception escapes the core, and it never waits for a verdict it did not ask;
- a deleted message cannot be retrieved; messages are removed only by QUIT in
  TRANSACTION (UPDATE), and then exactly those DELE marked since the last
  RSET; a session that ends any other way removes nothing;
- once the session is closed nothing more is processed or replied.

At the end the whole input is run again through a fresh connection, as one
chunk per TLS phase and cut at random (or octet by octet): the replies and
events must be the same. `test_split_invariance` checks that on its own.

Deterministic and sized for CI; `GEOSMTP_FUZZ=long` for a longer run (see
`tests/unit/fuzzing.py`).
"""

from __future__ import annotations

import base64
import re

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from geosmtp.pop3 import (
    AuthRequest,
    LoginFailure,
    MessageEncoder,
    POP3Connection,
    POP3Security,
    Retrieve,
    StartTLS,
    State,
    Update,
)
from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, ConnectionClosed

from .fuzzing import (
    HANDSHAKE,
    assert_same_run,
    assert_split_invariant,
    bytewise,
    fuzz_settings,
    random_cuts,
    replay,
    whole,
)
from .pop3_helpers import HOST, LISTING, MESSAGES, PASSWORDS

# ------------------------------------------------------------- the replies

_STATUS = re.compile(rb"\+OK(?: [\x20-\x7e]*)?|-ERR(?: \[[A-Z0-9/-]+\])?(?: [\x20-\x7e]*)?")
_CHALLENGE = re.compile(rb"\+ [A-Za-z0-9+/=]*")
#: The first lines of the multi-line replies (CAPA, LIST, UIDL, AUTH).
_MULTI = re.compile(
    rb"\+OK (Capability list follows|\d+ messages? \(\d+ octets\)|Unique-ID listing follows"
    rb"|Authentication mechanisms follow)"
)


class ReplyReader:
    """Checks the replies as they come, in pieces cut anywhere between replies."""

    def __init__(self) -> None:
        self.statuses: list[bytes] = []  # every status line, in order
        self._multi: list[bytes] | None = None  # the lines of an unfinished multi-line reply

    def feed(self, data: bytes) -> list[bytes]:
        assert data == b"" or data.endswith(b"\r\n"), f"a reply cut mid-line: {data!r}"
        new = []
        for line in data.split(b"\r\n")[:-1]:
            assert len(line) + 2 <= 512, f"reply line over 512 octets: {line[:60]!r}"
            if self._multi is not None:
                if line == b".":
                    self._multi = None
                    continue
                assert re.fullmatch(rb"[\x20-\x7e]+", line), f"bad listing line {line!r}"
                assert not line.startswith(b"."), f"listing line not dot-stuffed: {line!r}"
                continue
            assert _STATUS.fullmatch(line) or _CHALLENGE.fullmatch(line), f"ill-formed {line!r}"
            new.append(line)
            if _MULTI.fullmatch(line):
                self._multi = []
        # A multi-line reply is queued whole: never split between two writes.
        assert self._multi is None, f"multi-line reply not finished: {data!r}"
        self.statuses.extend(new)
        return new


def unstuff(wire: bytes) -> bytes:
    """A RETR/TOP reply's lines back as sent before stuffing: checks the
    terminator and that no line before it is a lone "."."""
    assert wire.endswith(b".\r\n") and (wire == b".\r\n" or wire.endswith(b"\r\n.\r\n")), wire
    lines = wire[:-3].split(b"\r\n")[:-1] if wire != b".\r\n" else []
    out = []
    for line in lines:
        assert line != b".", "a lone '.' inside a message"
        if line.startswith(b"."):
            assert line.startswith(b".."), f"line not dot-stuffed: {line!r}"
            line = line[1:]
        out.append(line + b"\r\n")
    return b"".join(out)


def wire_form(message: bytes) -> bytes:
    """The stored message with every line end a CRLF (`stuffing`'s rule: a LF
    alone becomes CRLF, a CR alone stays), ending with one."""
    data = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


# --------------------------------------------------------------- the shell


class Shell:
    """The shell's side of one POP3 connection: feeds it, answers its events
    (alice's maildrop is `MESSAGES`; bob's is locked), streams what RETR and
    TOP ask for, logs the input so it can be replayed."""

    def __init__(self, conn: POP3Connection) -> None:
        self.conn = conn
        self.reader = ReplyReader()
        greeting = conn.greeting()
        assert greeting == f"+OK {HOST} POP3 server ready\r\n".encode()
        self.out: list[bytes] = [greeting]
        self.events: list = []
        self.log: list = []
        self.removed: tuple[int, ...] | None = None  # what UPDATE removed, once it ran
        self.ended = False

    def send(self, data: bytes) -> list[bytes]:
        if self.ended:
            return []
        self.log.append(data)
        self.conn.receive_data(data)
        return self.drain()

    def _take(self) -> list[bytes]:
        data = self.conn.data_to_send()
        self.out.append(data)
        return self.reader.feed(data)

    def drain(self) -> list[bytes]:
        conn = self.conn
        statuses = []
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            assert event is not PAUSED, f"paused in {conn.state} with no verdict asked"
            self.events.append(event)
            if isinstance(event, AuthRequest):
                self._login(event)
            elif isinstance(event, Retrieve):
                statuses += self._retrieve(event)
            elif isinstance(event, Update):
                assert self.removed is None and conn.user is not None
                assert event.deleted == tuple(sorted(conn.deleted))
                self.removed = event.deleted
                # Failing to remove message 2 is the shell's disk error.
                failed = 1 in event.deleted
                conn.update_result(not failed, 1 if failed else 0)
            elif isinstance(event, StartTLS):
                statuses += self._take()
                assert statuses[-1] == b"+OK Begin TLS negotiation.", statuses
                conn.tls_started()
                self.log.append(HANDSHAKE)
            elif isinstance(event, CloseConnection | ConnectionClosed):
                assert conn.state is State.CLOSED
                self.ended = True
                break
        return statuses + self._take()

    def _login(self, event: AuthRequest) -> None:
        creds = event.credentials
        if creds.login == "bob" and PASSWORDS["bob"] == creds.password:
            self.conn.login_failed(LoginFailure.IN_USE)
        elif PASSWORDS.get(creds.login) == creds.password:
            self.conn.login_ok(LISTING)
        else:
            self.conn.login_failed(LoginFailure.AUTH)

    def _retrieve(self, event: Retrieve) -> list[bytes]:
        conn = self.conn
        assert event.index not in conn.deleted, "a deleted message was retrieved"
        assert event.number == event.index + 1 and event.index < len(LISTING)
        ok = event.index != 2 or event.lines is None  # TOP of message 3 fails: a disk error
        conn.retrieve_result(ok)
        statuses = self._take()
        if not ok:
            assert statuses[-1].startswith(b"-ERR [SYS/TEMP]"), statuses
            return statuses
        encoder = MessageEncoder(event.lines)
        message = MESSAGES[event.index]
        wire = b"".join(encoder.feed(message[i : i + 7]) for i in range(0, len(message), 7))
        wire += encoder.end()
        self.out.append(wire)
        body = unstuff(wire)
        if event.lines is None:
            size = LISTING[event.index].size
            assert statuses[-1] == f"+OK {size} octets".encode(), statuses
            assert body == wire_form(message), "RETR did not give the message stored"
            assert len(body) in (size, size + 2)  # + the CRLF a message without one gets
        else:
            assert statuses[-1] == b"+OK", statuses
            assert wire_form(message).startswith(body), "TOP is not a prefix of the message"
        return statuses

    @property
    def replies(self) -> bytes:
        return b"".join(self.out)


# ------------------------------------------------------------- strategies

LINE_END = st.sampled_from([b"\r\n", b"\r\n", b"\n"])
NUMBERS = st.sampled_from([b"1", b"2", b"3", b"4", b"0", b"-1", b"01", b"99999999999", b"x", b""])


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


AUTH_LINES = st.sampled_from(
    [
        b"AUTH PLAIN " + _b64(b"\0alice\0secret"),
        b"AUTH PLAIN " + _b64(b"\0alice\0nope"),
        b"AUTH PLAIN " + _b64(b"\0bob\0two words"),
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"AUTH LOGIN " + _b64(b"alice"),
        b"AUTH X",
        b"AUTH",
        b"AUTH PLAIN a b",
        _b64(b"alice"),
        _b64(b"secret"),
        _b64(b"\0alice\0secret"),
        b"*",
        b"=",
        b"%%%",
    ]
)


@st.composite
def commands(draw, quit: bool = False) -> bytes:  # type: ignore[no-untyped-def]
    """One command line: a keyword (any case) with a plausible or random argument;
    QUIT among them if `quit` (the state machine has its own rule for it, rarer)."""
    verb = (
        "QUIT"
        if quit and draw(st.integers(0, 15)) == 0
        else draw(
            st.sampled_from(
                [
                    *("USER", "PASS", "AUTH", "STLS", "CAPA", "STAT", "LIST", "UIDL"),
                    *("RETR", "TOP", "DELE", "NOOP", "RSET", "APOP", "XTND", ""),
                ]
            )
        )
    )
    if verb == "USER":
        arg = b" " + draw(st.sampled_from([b"alice", b"bob", b"\xff", b"", b" alice "]))
    elif verb == "PASS":
        arg = b" " + draw(st.sampled_from([b"secret", b"two words", b"bad", b"\xff", b""]))
    elif verb == "AUTH":
        return draw(AUTH_LINES) + draw(LINE_END)
    elif verb in ("LIST", "UIDL", "RETR", "DELE"):
        arg = draw(st.sampled_from([b"", b" "])) + draw(NUMBERS)
    elif verb == "TOP":
        arg = b" " + draw(NUMBERS) + b" " + draw(NUMBERS)
    else:
        arg = draw(st.sampled_from([b"", b"", b" x"]))
    line = verb.encode() + arg
    if draw(st.booleans()):
        line = line.lower()
    if draw(st.integers(0, 9)) == 0:
        line += draw(st.binary(max_size=16))
    return line + draw(LINE_END)


HOSTILE = st.lists(
    st.sampled_from(
        [
            *(b"\r", b"\n", b"\r\n", b".", b"\0", b"\xff\xfe", b" ", b"\t", b"+OK\r\n"),
            *(b"USER alice\r\n", b"PASS secret\r\n", b"RETR 1\r\n", b"QUIT", b"STLS\r\n"),
        ]
    ),
    max_size=12,
).map(b"".join)
RAW = st.one_of(st.binary(max_size=64), HOSTILE)


# ------------------------------------------------------------ the machine


class POP3Fuzz(RuleBasedStateMachine):
    """A hostile client and the shell, around one POP3 core."""

    def __init__(self) -> None:
        super().__init__()
        self.shell: Shell | None = None
        self.marked: set[int] | None = None  # what DELE marked, while the rules know it
        self.in_challenge = False  # the last reply was a SASL challenge

    @initialize(
        tls=st.sampled_from(["none", "stls", "implicit"]),
        plaintext=st.booleans(),
        max_bad=st.sampled_from([5, 50]),
    )
    def start(self, tls: str, plaintext: bool, max_bad: int) -> None:
        security = POP3Security(
            tls_available=tls != "none", tls_active=tls == "implicit", auth_plaintext=plaintext
        )
        self.make = lambda: POP3Connection(HOST, security, max_bad_commands=max_bad)
        self.shell = Shell(self.make())

    @property
    def conn(self) -> POP3Connection:
        assert self.shell is not None
        return self.shell.conn

    def open(self) -> bool:
        return self.shell is not None and not self.shell.ended

    def at_line_start(self) -> bool:
        """The core waits for a command line (not a SASL response): the next
        bytes sent are one."""
        log = self.shell.log if self.shell else []
        return (
            self.open()
            and not self.in_challenge
            and (not log or log[-1] is HANDSHAKE or log[-1][-1:] == b"\n")
        )

    def logged_in(self) -> bool:
        return self.at_line_start() and self.conn.state is State.TRANSACTION

    def send(self, data: bytes) -> list[bytes]:
        before = self.conn.state
        statuses = self.shell.send(data)
        if statuses:
            self.in_challenge = statuses[-1].startswith(b"+ ")  # the next line is SASL's
        if before is not State.TRANSACTION and self.conn.state is State.TRANSACTION:
            self.marked = set()  # a fresh login: nothing marked
        return statuses

    def forget(self, data: bytes) -> None:
        """Input the rules do not model is sent: if it may hold a DELE or an
        RSET, what is marked is no longer known."""
        upper = data.upper()
        if b"DELE" in upper or b"RSET" in upper:
            self.marked = None

    # --------------------------------------------------------------- rules

    @precondition(open)
    @rule(line=commands())
    def command(self, line: bytes) -> None:
        self.forget(line)
        self.send(line)

    @precondition(open)
    @rule(lines=st.lists(commands(), min_size=2, max_size=6))
    def pipelined(self, lines: list[bytes]) -> None:
        self.forget(b"".join(lines))
        self.send(b"".join(lines))

    @precondition(open)
    @rule(data=RAW)
    def raw(self, data: bytes) -> None:
        if data:
            self.forget(data)
            self.send(data)

    @precondition(open)
    @rule(
        length=st.sampled_from([252, 253, 254, 12285, 12286, 12287]),
        head=st.sampled_from([b"NOOP ", b"AUTH ", b"PASS "]),
        end=LINE_END,
    )
    def long_line(self, length: int, head: bytes, end: bytes) -> None:
        self.send(head + b"x" * length + end)

    @precondition(at_line_start)
    @rule(how=st.sampled_from(["user", "plain", "login"]), pipelined=st.booleans())
    def login(self, how: str, pipelined: bool) -> None:
        """alice logs in: +OK when logins are allowed and she is not in yet."""
        lines = {
            "user": [b"USER alice\r\n", b"PASS secret\r\n"],
            "plain": [b"AUTH PLAIN " + _b64(b"\0alice\0secret") + b"\r\n"],
            "login": [b"AUTH LOGIN\r\n", _b64(b"alice") + b"\r\n", _b64(b"secret") + b"\r\n"],
        }[how]
        allowed = self.conn.state is State.AUTHORIZATION and self.conn.auth_allowed
        statuses = []
        if pipelined:
            statuses = self.send(b"".join(lines))
        else:
            for line in lines:
                statuses += self.send(line)
        if allowed and not self.shell.ended and statuses[0] != b"-ERR Too many bad commands.":
            assert statuses[-1] == b"+OK Logged in.", statuses
            assert self.conn.state is State.TRANSACTION

    @precondition(at_line_start)
    @rule(
        ops=st.lists(
            st.one_of(
                st.tuples(st.sampled_from(["dele", "retrieve"]), st.integers(1, 4)),
                st.tuples(st.just("rset"), st.just(0)),
            ),
            max_size=8,
        ),
        quit=st.booleans(),
    )
    def maildrop(self, ops: list[tuple[str, int]], quit: bool) -> None:
        """A whole mail session: log in if need be, then DELE, RETR and RSET
        (modelled), then maybe QUIT: UPDATE removes exactly what is marked."""
        if self.conn.state is State.AUTHORIZATION and self.conn.auth_allowed:
            self.login("user", pipelined=False)
        for op, number in ops:
            if not self.logged_in():
                return
            if op == "dele":
                self.dele(number)
            elif op == "retrieve":
                self.retrieve(number, None)
            else:
                self.rset()
        if quit and self.logged_in():
            self.quit()

    @precondition(logged_in)
    @rule(number=st.integers(1, 4))
    def dele(self, number: int) -> None:
        statuses = self.send(f"DELE {number}\r\n".encode())
        if self.marked is None or self.shell.ended:
            return
        if number <= len(LISTING) and number - 1 not in self.marked:
            assert statuses[0] == b"+OK Message marked to be deleted.", statuses
            self.marked.add(number - 1)
        else:
            assert statuses[0].startswith(b"-ERR"), statuses

    @precondition(logged_in)
    @rule(number=st.integers(1, 4), top=st.one_of(st.none(), st.integers(0, 3)))
    def retrieve(self, number: int, top: int | None) -> None:
        line = f"RETR {number}" if top is None else f"TOP {number} {top}"
        statuses = self.send(line.encode() + b"\r\n")
        if self.marked is not None and not self.shell.ended:
            gone = number > len(LISTING) or number - 1 in self.marked
            assert statuses[0].startswith(b"-ERR") == (gone or (number == 3 and top is not None))

    @precondition(logged_in)
    @rule()
    def rset(self) -> None:
        statuses = self.send(b"RSET\r\n")
        if self.marked is not None:
            self.marked = set()
            assert statuses[0].startswith(b"+OK maildrop has 3 messages"), statuses

    @precondition(open)
    @rule(now=st.integers(0, 3))
    def quit_before_login(self, now: int) -> None:
        """QUIT before login (one time in four): signing off, nothing removed."""
        if now or self.conn.state is not State.AUTHORIZATION or not self.at_line_start():
            return
        statuses = self.send(b"QUIT\r\n")
        assert statuses[-1] == f"+OK {HOST} POP3 server signing off".encode(), statuses
        assert self.shell.ended and self.shell.removed is None

    @precondition(logged_in)
    @rule()
    def quit(self) -> None:
        """QUIT after login: UPDATE removes exactly what DELE marked, then the end."""
        marked = self.marked
        statuses = self.send(b"QUIT\r\n")
        assert self.shell.ended and self.shell.removed is not None, statuses
        if marked is not None:
            assert self.shell.removed == tuple(sorted(marked))
            failed = 1 in marked
            assert statuses[-1].startswith(b"-ERR [SYS/TEMP]" if failed else b"+OK"), statuses

    @precondition(open)
    @rule(behind=st.sampled_from([b"", b"USER alice\r\n", b"CAPA\r\n"]))
    def stls(self, behind: bytes) -> None:
        statuses = self.send(b"STLS\r\n" + behind)
        if statuses and statuses[-1] == b"+OK Begin TLS negotiation.":
            # Nothing sent behind STLS in the clear was run (RFC 2595 §4).
            assert self.shell.log[-1] is HANDSHAKE

    @precondition(open)
    @rule(now=st.integers(0, 3))
    def end_of_input(self, now: int) -> None:
        """The client closes its side (one time in four, so sessions last):
        nothing is removed."""
        if now:
            return
        self.shell.send(b"")
        assert self.shell.removed is None, "removed without QUIT"
        assert self.shell.ended, "the end of input did not end the session"

    @precondition(lambda self: self.shell is not None and self.shell.ended)
    @rule()
    def after_the_end(self) -> None:
        conn = self.conn
        for _ in range(2):
            assert isinstance(conn.next_event(), ConnectionClosed)
            assert conn.data_to_send() == b""

    # ---------------------------------------------------------- invariants

    @invariant()
    def consistent(self) -> None:
        if self.shell is None:
            return
        conn = self.conn
        assert conn.state is not State.ERROR, "the shell's side was misused"
        if self.shell.ended:
            assert conn.state is State.CLOSED
            assert conn.data_to_send() == b""
            ends = [
                e for e in self.shell.events if isinstance(e, CloseConnection | ConnectionClosed)
            ]
            assert len(ends) == 1 and self.shell.events[-1] is ends[0]
            updates = [e for e in self.shell.events if isinstance(e, Update)]
            # Only QUIT after login removes anything, and it comes last.
            assert len(updates) <= 1 and (not updates or self.shell.events[-2] is updates[0])
        else:
            assert conn.state in (State.AUTHORIZATION, State.TRANSACTION), conn.state
            if self.marked is not None and conn.state is State.TRANSACTION:
                assert conn.deleted == self.marked

    def teardown(self) -> None:
        if self.shell is None:
            return
        log = self.shell.log
        data = b"".join(x for x in log if x is not HANDSHAKE)
        make = lambda: Shell(self.make())  # noqa: E731
        assert_same_run(self.shell, replay(make, log, whole), "one read per TLS phase")
        cut = bytewise if len(data) <= 2000 else random_cuts(len(data))
        assert_same_run(self.shell, replay(make, log, cut), "into small reads")


def test_pop3_core_state_machine() -> None:
    run_state_machine_as_test(POP3Fuzz, settings=fuzz_settings(180, stateful_step_count=25))


# ----------------------------------------------------------- split invariance

SCRIPT_STEP = st.one_of(commands(quit=True), RAW, st.just(b"USER alice\r\nPASS secret\r\n"))


@fuzz_settings(150)
@given(steps=st.lists(SCRIPT_STEP, max_size=14), seed=st.integers(0, 2**32), tls=st.booleans())
def test_split_invariance(steps: list[bytes], seed: int, tls: bool) -> None:
    """The same input fed whole, octet by octet and cut at random points gives
    exactly the same replies and events."""
    security = POP3Security(tls_available=tls, auth_plaintext=True)
    assert_split_invariant(lambda: Shell(POP3Connection(HOST, security)), steps, seed)
