"""The sans-I/O POP3 server session (RFC 1939, 2449, 2595, 5034), in the
manner of h11 and of the SMTP core beside it.

The shell sends `greeting()`, feeds what it reads with `receive_data()`
(`b""` when the client has closed its side) and calls `next_event()` until
it returns `NEED_DATA`: then it writes out `data_to_send()` and reads again.
Replies are queued as commands are processed, so a pipelined batch (RFC 2449
§6.6) is answered in one write.

Some events ask the shell for a verdict; until it gives it, `next_event()`
returns `PAUSED` and processes nothing (a shell that answers each event before
asking for the next never sees it). A method called at a time it may not be
raises `ProtocolError` and leaves the connection in `State.ERROR`, from which
only `close_with()` leads out. Nothing the client sends raises: its mistakes
get `-ERR` replies. The states and both tables are in `state.py`, the wording
of every reply in `replies.py`, the wire form of a message in `stuffing.py`.

Events (immutable values) the shell acts on:
- `StartTLS`: "+OK" is queued; flush it, do the handshake. Verdict:
  `tls_started()`, or on failure close the socket. Input that came with the
  STLS line is discarded (RFC 2595 §4; the STARTTLS command injection).
- `AuthRequest`: USER and PASS (mechanism "USER") or an AUTH exchange (PLAIN,
  LOGIN) gave credentials. Check them, lock the maildrop and list it. Verdict:
  `login_ok(listing)` or `login_failed(why)`, or `close_with()`.
- `Retrieve`: RETR or TOP of a message that exists and is not deleted.
  Verdict: `retrieve_result(ok)`; after a True the shell writes
  `data_to_send()` (which ends with the status line) and then the message
  through a `stuffing.MessageEncoder`, its terminator included, before it
  takes the next event.
- `Update`: QUIT in TRANSACTION (RFC 1939 §6): remove the messages whose
  indexes are in `deleted` (possibly none), release the lock. Verdict:
  `update_result(ok, failed)`; the `CloseConnection` follows.
- `CloseConnection`: the server ends the session; the last reply is queued.
  Flush and close.
- `ConnectionClosed`: the client closed its side and all complete input
  before that is processed; close the socket. A session that ends so never
  enters UPDATE: nothing is deleted (RFC 1939 §6). Once the session is over,
  either way, every later `next_event()` returns a `ConnectionClosed`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..protocol import (
    LINE_TOO_LONG,
    NEED_DATA,
    PAUSED,
    CloseConnection,
    ConnectionClosed,
    ReplyValue,
    SansIOConnection,
    Sentinel,
    sasl,
)
from . import replies as R
from .state import COMMAND_STATES, SEQUENCE, TRANSITIONS, WAITING_STATES, State

__all__ = [
    "AuthRequest",
    "Listing",
    "LoginFailure",
    "POP3Connection",
    "POP3Security",
    "Retrieve",
    "StartTLS",
    "Update",
]

#: RFC 2449 §4: a command line is at most 255 octets, its CRLF included. An AUTH
#: command and the responses of its exchange may be as long as in SMTP (RFC 4954
#: §4: 12288); RFC 5034 §4 lets a client send no longer an AUTH line than 255,
#: but accepting more costs nothing and helps a client with a long password.
MAX_COMMAND_LINE = 255
#: Longest message number or line count read as a number; longer is no message.
_MAX_DIGITS = 10


@dataclass(frozen=True)
class POP3Security:
    """What this connection may offer; the shell decides from the listener's
    role, the TLS setup and the configuration."""

    tls_available: bool = False  # a certificate is loaded: STLS can be offered
    tls_active: bool = False  # an implicit-TLS listener (RFC 8314): TLS from the first byte
    auth_plaintext: bool = False  # USER/PASS and AUTH without TLS (loopback testing only)

    @property
    def auth_allowed(self) -> bool:
        """Logging in is allowed from the first byte (before any STLS)."""
        return self.tls_active or self.auth_plaintext


@dataclass(frozen=True, slots=True)
class Listing:
    """One message of the maildrop as the shell found it at login."""

    #: octets with CRLF line ends, as RETR sends them less the dots doubled for
    #: transparency (RFC 1939 §11; `stuffing.virtual_size`)
    size: int
    #: the unique-id (UIDL, RFC 1939 §7): 1 to 70 octets in 0x21-0x7E, stable
    uid: str


class LoginFailure(enum.Enum):
    """Why a login failed: the response code of the `-ERR` (RFC 2449 §8, RFC 3206)."""

    AUTH = "AUTH"  # bad credentials
    IN_USE = "IN-USE"  # the maildrop is locked by another session
    TEMP = "SYS/TEMP"  # throttled, a storage error: try again later
    PERM = "SYS/PERM"  # the maildrop cannot be opened and will not be


@dataclass(frozen=True)
class StartTLS:
    """ "+OK" is queued: the shell does the handshake, then calls `tls_started()`."""


@dataclass(frozen=True)
class AuthRequest:
    """Credentials to check; the shell answers with `login_ok()` or `login_failed()`."""

    credentials: sasl.Credentials  # mechanism "USER" (USER/PASS), "PLAIN" or "LOGIN"


@dataclass(frozen=True)
class Retrieve:
    """RETR (`lines` None) or TOP (`lines` body lines) of message `number`
    (1-based, as the client named it), at `index` (0-based) in the listing."""

    number: int
    index: int
    lines: int | None


@dataclass(frozen=True)
class Update:
    """QUIT in TRANSACTION: remove these messages (0-based indexes, ascending;
    possibly none), release the maildrop, then call `update_result()`."""

    deleted: tuple[int, ...]


Event = StartTLS | AuthRequest | Retrieve | Update | CloseConnection | ConnectionClosed


def _uid_problem(uid: object) -> bool:
    return not (
        isinstance(uid, str)
        and 1 <= len(uid) <= 70
        and uid.isascii()
        and uid.isprintable()
        and " " not in uid
    )


def _listing_problem(listing: tuple[Listing, ...]) -> str | None:
    """Why `listing` cannot be the maildrop's, or None."""
    for i, entry in enumerate(listing):
        if not isinstance(entry, Listing):
            return f"listing[{i}] is not a Listing"
        if not isinstance(entry.size, int) or entry.size < 0:
            return f"listing[{i}] has a bad size"
        if _uid_problem(entry.uid):
            return f"listing[{i}] has a bad uid (1-70 characters 0x21-0x7E)"
    if len({entry.uid for entry in listing}) != len(listing):
        return "uids are not unique"
    return None


class POP3Connection(SansIOConnection):
    """One POP3 server session: bytes in, replies and events out.

    Built by the shell per client, with the server's `hostname`, the
    `security` that holds for it, and how many bad commands in a row it takes
    before it closes (`max_bad_commands`: every `-ERR` for a command line
    counts, a `+OK` starts the count again; refused logins do not count, the
    shell's throttle sees those).

    The shell may read, never write: `state` (a `State`), `closed_in` (where
    the session closed or failed), `user` (the login, once logged in), `tls`,
    `commands` (command lines answered so far, SASL responses not counted),
    `bad_commands` (in a row), `listing` (the maildrop as given to
    `login_ok()`) and `deleted` (indexes marked by DELE).
    """

    TRANSITIONS = TRANSITIONS
    CLOSED = State.CLOSED
    ERROR = State.ERROR

    def __init__(
        self, hostname: str, security: POP3Security, *, max_bad_commands: int = 10
    ) -> None:
        if max_bad_commands < 1:
            raise ValueError("max_bad_commands must be at least 1")
        self.hostname = hostname
        self.security = security
        self.max_bad_commands = max_bad_commands
        self.state = State.AUTHORIZATION
        #: The state the session was in when it closed or failed (ERROR); None before.
        self.closed_in: State | None = None
        self.user: str | None = None
        self.tls = security.tls_active
        self.commands = 0
        self.bad_commands = 0
        self.listing: tuple[Listing, ...] = ()
        self.deleted: set[int] = set()
        self._octets = 0  # of the whole listing
        self._user_name: str | None = None  # USER given, PASS awaited
        self._login: str | None = None  # the login of the credentials being checked
        self._sasl: sasl.SASLExchange | None = None  # an AUTH exchange wants a response
        self._retrieve: Retrieve | None = None  # the one being served
        self._greeted = False
        self._end_of_input = False  # receive_data(b""): the client closed its side
        self._discarding_line = False  # an over-long line is being skipped
        self.lines_read = 0  # command lines taken from the input
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []

    # ---------------------------------------------------------------- output

    def greeting(self) -> bytes:
        """The banner (RFC 1939 §4), for the shell to send before anything else.

        Called once, while the connection is still in `AUTHORIZATION` (on an
        implicit-TLS listener after the handshake). Raises `ProtocolError` on a
        second call or in another state.
        """
        if self._greeted or self.state is not State.AUTHORIZATION:
            raise self._misuse(f"greeting() again or in state {self.state.name}")
        self._greeted = True
        return R.greeting(self.hostname).to_bytes()

    def _send(self, reply: ReplyValue) -> None:
        self._out.append(reply.to_bytes())

    def _reply(self, reply: ReplyValue) -> None:
        """A positive reply: the run of bad commands is over."""
        self._send(reply)
        self.bad_commands = 0

    def _error(self, reply: ReplyValue) -> None:
        """An `-ERR` for a command line, counted; too many in a row close."""
        self._send(reply)
        self.bad_commands += 1
        if self.bad_commands >= self.max_bad_commands and self.state in COMMAND_STATES:
            self._close(R.TOO_MANY_BAD_COMMANDS)

    def _close(self, reply: ReplyValue) -> None:
        """(`close_with()`, the base's, closes here; it never enters UPDATE:
        nothing is deleted. Its replies are in `replies`: `AUTOLOGOUT`,
        `SHUTTING_DOWN`, ..., or `closing(text, code)`.)"""
        self._move("close")
        self._closed(reply)

    def _closed(self, reply: ReplyValue) -> None:
        """The session has ended with `reply`: queue it and say so."""
        self._send(reply)
        self._buf.clear()
        self._sasl = None
        self._events.append(CloseConnection(reply))

    # ---------------------------------------------------------------- states

    def _expect(self, step: str) -> None:
        """Raise (and enter `ERROR`) unless `step` may be taken now; for the
        verdicts that check their arguments before they move."""
        if step not in TRANSITIONS[self.state]:
            raise self._misuse(f"{step} is not possible in state {self.state.name}")

    # ----------------------------------------------------------------- input

    def next_event(self) -> Event | Sentinel:
        """Process buffered input and return the next event, or a sentinel.

        - an event (see the module docstring): act on it, then call again;
        - `NEED_DATA`: all complete input is processed; flush `data_to_send()`,
          read, `receive_data()`;
        - `PAUSED`: the connection waits for the shell's verdict on the last
          event, or, in `ERROR`, for `close_with()`;
        - `ConnectionClosed`: the end of input was reached (the state is now
          `CLOSED`), and on every call once the session is over.

        May be called in any state. Never raises for anything the client sends.
        """
        while not self._events:
            state = self.state
            if state in WAITING_STATES:
                return PAUSED
            if state is State.CLOSED:
                return ConnectionClosed()
            if not self._process_line():
                if self._end_of_input:  # an unfinished line can never be completed
                    self._move("end_of_input")
                    self._buf.clear()
                    self._sasl = None
                    return ConnectionClosed()
                return NEED_DATA
        return self._events.pop(0)

    @property
    def auth_allowed(self) -> bool:
        """USER/PASS and AUTH may be used now: TLS is on, or plaintext is allowed."""
        return self.tls or self.security.auth_plaintext

    @property
    def stls_offered(self) -> bool:
        """STLS may succeed now: a certificate, no TLS yet, nobody logged in."""
        return self.security.tls_available and not self.tls and self.state is State.AUTHORIZATION

    def capabilities(self) -> list[str]:
        """CAPA's list now (RFC 2449 §5, §6; RFC 2595 §4; RFC 3206 §6)."""
        names = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION and self.auth_allowed:
            names += ["USER", "SASL " + " ".join(sasl.MECHANISMS)]
        if self.stls_offered:
            names.append("STLS")
        names.append("IMPLEMENTATION geosmtp")
        return names

    def listing_total(self) -> tuple[int, int]:
        """Messages not marked deleted, and their octets (STAT, RSET)."""
        listing = self.listing
        deleted = sum(listing[i].size for i in self.deleted)
        return len(listing) - len(self.deleted), self._octets - deleted

    # -------------------------------------------------------------- commands

    def _line_limit(self) -> int:
        """Octets a line may hold before its CRLF."""
        if self._sasl is not None or (self.state is State.AUTHORIZATION and self.auth_allowed):
            return sasl.MAX_AUTH_LINE - 2  # AUTH and its responses may be longer
        return MAX_COMMAND_LINE - 2

    def _process_line(self) -> bool:
        line = self._read_line(self._line_limit())
        if line is None:
            return False
        if line is LINE_TOO_LONG:
            if self._sasl is not None:
                self._sasl = None
                self._error(R.AUTH_LINE_TOO_LONG)
            else:
                self.commands += 1
                self._error(R.LINE_TOO_LONG)
            return True
        if self._sasl is not None:
            self._auth_step(lambda exchange: exchange.respond(line))
            return True
        self.commands += 1
        if len(line) > MAX_COMMAND_LINE - 2 and line[:5].upper() != b"AUTH ":
            self._error(R.LINE_TOO_LONG)
            return True
        self._handle_command(line)
        return True

    def _handle_command(self, line: bytes) -> None:
        if not line.strip():
            self._error(R.EMPTY_COMMAND)
            return
        if b"\0" in line:
            self._error(R.BAD_NUL)
            return
        keyword, _, arg = line.partition(b" ")
        # RFC 2449 §3: a keyword is three or four characters, case-insensitive.
        command = _COMMANDS.get(keyword.upper()) if len(keyword) <= 4 else None
        if command is None:
            self._error(R.UNKNOWN_COMMAND)
            return
        handler, rule = command
        refusal = rule.refused.get(self.state)
        if refusal is not None:
            self._error(refusal)
            return
        getattr(self, handler)(arg)

    def _usage(self, verb: str) -> None:
        self._error(R.usage(R.SYNTAX[verb]))

    def _index(self, token: bytes) -> int | None:
        """The 0-based index of message `token` (a message-number, RFC 1939 §5),
        or None after the `-ERR` that says why there is none."""
        if not token.isdigit():  # bytes.isdigit(): ASCII digits only
            self._error(R.BAD_MESSAGE_NUMBER)
            return None
        number = int(token) if len(token) <= _MAX_DIGITS else 0
        if not 1 <= number <= len(self.listing):
            self._error(R.NO_SUCH_MESSAGE)
            return None
        if number - 1 in self.deleted:
            self._error(R.MESSAGE_DELETED)
            return None
        return number - 1

    # --------------------------------------------------------- any state

    def _do_CAPA(self, arg: bytes) -> None:
        if arg.strip():
            self._usage("CAPA")
            return
        self._reply(R.capabilities(self.capabilities()))

    def _do_QUIT(self, arg: bytes) -> None:
        if arg.strip():
            self._usage("QUIT")
            return
        if self.state is State.TRANSACTION:
            self._move("quit")  # RFC 1939 §6: UPDATE, and only after QUIT
            self._events.append(Update(tuple(sorted(self.deleted))))
            return
        self._close(R.signing_off(self.hostname))

    # ---------------------------------------------------------- AUTHORIZATION

    def _do_USER(self, arg: bytes) -> None:
        if not self.auth_allowed:
            self._error(R.AUTH_NEEDS_TLS)
            return
        name = arg.strip()
        if not name:
            self._usage("USER")
            return
        try:
            self._user_name = name.decode("utf-8")
        except UnicodeDecodeError:
            self._user_name = None
            self._error(R.BAD_USER_NAME)
            return
        self._reply(R.USER_OK)

    def _do_PASS(self, arg: bytes) -> None:
        """RFC 1939 §7: the rest of the line is the password, spaces and all."""
        if not self.auth_allowed:
            self._error(R.AUTH_NEEDS_TLS)
            return
        login = self._user_name
        if login is None:
            self._error(R.PASS_WITHOUT_USER)
            return
        if not arg:
            self._usage("PASS")
            return
        self._user_name = None  # one PASS per USER
        try:
            password = arg.decode("utf-8")
        except UnicodeDecodeError:
            self._error(R.AUTH_FAILED)  # no configured password can match
            return
        self._request_login(sasl.Credentials("USER", login, password))

    def _do_AUTH(self, arg: bytes) -> None:
        if not self.auth_allowed:
            self._error(R.AUTH_NEEDS_TLS)
            return
        parts = arg.split()
        if not parts:
            self._reply(R.mechanisms(sasl.MECHANISMS))
            return
        if len(parts) > 2:
            self._usage("AUTH")
            return
        self._user_name = None
        mechanism = parts[0].decode("ascii", "replace").upper()
        initial = parts[1] if len(parts) == 2 else None
        self._auth_step(lambda exchange: exchange.start(initial), mechanism)

    def _auth_step(
        self,
        step: Callable[[sasl.SASLExchange], sasl.Challenge | sasl.Credentials],
        mechanism: str | None = None,
    ) -> None:
        """Run one step of the SASL exchange (RFC 5034 §4) and act on what it gives."""
        try:
            exchange = self._sasl or sasl.SASLExchange(mechanism or "")
            result = step(exchange)
        except sasl.SASLError as exc:
            self._sasl = None
            self._error(R.SASL_ERRORS[exc.problem])
            return
        if isinstance(result, sasl.Credentials):
            self._sasl = None
            self._request_login(result)
            return
        self._sasl = exchange  # a challenge: the next line is the answer
        self._send(R.challenge(result.text))

    def _request_login(self, credentials: sasl.Credentials) -> None:
        self._login = credentials.login
        self._move("auth")
        self._events.append(AuthRequest(credentials))

    def _do_STLS(self, arg: bytes) -> None:
        if arg.strip():
            self._usage("STLS")
            return
        if self.tls:
            self._error(R.TLS_ALREADY_ACTIVE)
            return
        if not self.security.tls_available:
            self._error(R.TLS_NOT_AVAILABLE)
            return
        self._reply(R.STLS_READY)
        # Whatever came behind STLS in the clear must not be run after the
        # handshake as if it were protected (RFC 2595 §4; CVE-2011-0411).
        self._buf.clear()
        self._user_name = None
        self._move("stls")
        self._events.append(StartTLS())

    # ------------------------------------------------------------ TRANSACTION

    def _do_STAT(self, arg: bytes) -> None:
        if arg.strip():
            self._usage("STAT")
            return
        self._reply(R.stat(*self.listing_total()))

    def _do_LIST(self, arg: bytes) -> None:
        args = arg.split()
        if len(args) > 1:
            self._usage("LIST")
        elif args:
            index = self._index(args[0])
            if index is not None:
                self._reply(R.scan_line(index + 1, self.listing[index].size))
        else:
            entries = [(i + 1, e.size) for i, e in self._kept()]
            self._reply(R.scan_listing(entries, *self.listing_total()))

    def _do_UIDL(self, arg: bytes) -> None:
        args = arg.split()
        if len(args) > 1:
            self._usage("UIDL")
        elif args:
            index = self._index(args[0])
            if index is not None:
                self._reply(R.uid_line(index + 1, self.listing[index].uid))
        else:
            self._reply(R.uid_listing((i + 1, e.uid) for i, e in self._kept()))

    def _kept(self) -> list[tuple[int, Listing]]:
        """The messages not marked deleted, with their indexes."""
        deleted = self.deleted
        return [(i, e) for i, e in enumerate(self.listing) if i not in deleted]

    def _do_RETR(self, arg: bytes) -> None:
        args = arg.split()
        if len(args) != 1:
            self._usage("RETR")
            return
        index = self._index(args[0])
        if index is not None:
            self._retrieve_message(Retrieve(index + 1, index, None))

    def _do_TOP(self, arg: bytes) -> None:
        args = arg.split()
        if len(args) != 2 or not args[1].isdigit():
            self._usage("TOP")
            return
        index = self._index(args[0])
        if index is not None:
            self._retrieve_message(Retrieve(index + 1, index, int(args[1])))

    def _retrieve_message(self, request: Retrieve) -> None:
        self._retrieve = request
        self._move("retrieve")
        self._events.append(request)

    def _do_DELE(self, arg: bytes) -> None:
        args = arg.split()
        if len(args) != 1:
            self._usage("DELE")
            return
        index = self._index(args[0])
        if index is not None:
            self.deleted.add(index)
            self._reply(R.MARKED)

    def _do_NOOP(self, arg: bytes) -> None:
        if arg.strip():
            self._usage("NOOP")
            return
        self._reply(R.OK)

    def _do_RSET(self, arg: bytes) -> None:
        if arg.strip():
            self._usage("RSET")
            return
        self.deleted.clear()
        self._reply(R.maildrop(*self.listing_total()))

    # ------------------------------------------------ the shell's verdicts

    def tls_started(self) -> None:
        """The TLS handshake after `StartTLS` succeeded: back in `AUTHORIZATION`
        with `tls` set, anything said before forgotten (RFC 2595 §4).

        Only while the connection waits for it (`TLS_HANDSHAKE`); else raises
        `ProtocolError`. Input received in the clear meanwhile is discarded.
        When the handshake fails the shell closes the socket: nothing is sent.
        """
        self._move("tls_started")
        self._buf.clear()
        self._discarding_line = False
        self._user_name = None
        self.tls = True

    def login_ok(self, listing: Sequence[Listing]) -> None:
        """The shell's verdict on an `AuthRequest`: the credentials are good,
        the maildrop is locked and `listing` is what it holds, in the order of
        the message numbers. "+OK", `TRANSACTION`, `user` set.

        Only while the connection waits for it (`AUTHENTICATING`), and only
        with `Listing` values whose uids are valid (RFC 1939 §7: 1-70
        characters 0x21-0x7E) and unique; else raises `ProtocolError`.
        """
        self._expect("login_ok")
        entries = tuple(listing)
        problem = _listing_problem(entries)
        if problem is not None:
            raise self._misuse(f"login_ok(): {problem}")
        self._move("login_ok")
        self.listing = entries
        self._octets = sum(entry.size for entry in entries)
        self.deleted = set()
        self.user, self._login = self._login, None
        self._reply(R.LOGGED_IN)

    def login_failed(self, why: LoginFailure, text: str | None = None) -> None:
        """The shell's verdict on an `AuthRequest`: no login. `-ERR [code]` with
        `text` or the default for `why`; back in `AUTHORIZATION`, USER forgotten.
        Not counted as a bad command (the shell throttles failed logins).

        Only while the connection waits for it (`AUTHENTICATING`), with a
        `LoginFailure`; else raises `ProtocolError`. The shell may instead
        `close_with()` (too many failures).
        """
        self._expect("login_failed")
        if not isinstance(why, LoginFailure):
            raise self._misuse(f"login_failed() with {why!r}, not a LoginFailure")
        self._move("login_failed")
        self._login = None
        self._user_name = None
        self._send(R.login_refused(why.value, text))

    def retrieve_result(self, ok: bool) -> None:
        """The shell's verdict on a `Retrieve`: the message can be sent (`ok`:
        "+OK <size> octets" for RETR, "+OK" for TOP is queued; the shell writes
        `data_to_send()`, then the message and its terminator, before it takes
        the next event) or not ("-ERR [SYS/TEMP]", not counted as a bad
        command). Back in `TRANSACTION`.

        Only while the connection waits for it (`RETRIEVING`); else raises
        `ProtocolError`.
        """
        self._move("retrieve_result")
        request, self._retrieve = self._retrieve, None
        if request is None:  # RETRIEVING is entered with one: a bug in this module
            raise RuntimeError("retrieving without a request")
        if not ok:
            self._send(R.RETRIEVE_FAILED)
        elif request.lines is None:
            self._reply(R.retrieving(self.listing[request.index].size))
        else:
            self._reply(R.OK)

    def update_result(self, ok: bool, failed: int = 0) -> None:
        """The shell's verdict on an `Update` (RFC 1939 §6): the deleted messages
        are gone (`ok`: "+OK ... signing off") or `failed` of them (0: an
        unknown number) could not be removed ("-ERR [SYS/TEMP]"). Either way the
        session ends: the next event is the `CloseConnection`.

        Only while the connection waits for it (`UPDATE`), with `failed` 0 when
        `ok` and at most the number deleted; else raises `ProtocolError`.
        """
        self._expect("update_result")
        deleted = len(self.deleted)
        if not isinstance(failed, int) or not 0 <= failed <= deleted or (ok and failed):
            raise self._misuse(f"update_result({ok!r}, {failed!r}) with {deleted} deleted")
        self._move("update_result")
        if ok:
            self._closed(R.updated(self.hostname, len(self.listing) - deleted))
        else:
            self._closed(R.not_updated(failed, deleted))


#: The dispatcher: keyword (bytes, upper case) -> (its handler's name, its rule
#: in the table). Handlers are looked up by name on the connection, so a
#: subclass (or a test planting a bug) may replace one.
_COMMANDS = {verb.encode(): (f"_do_{verb}", rule) for verb, rule in SEQUENCE.items()}
