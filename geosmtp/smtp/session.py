"""The sans-I/O SMTP server session (RFC 5321), in the manner of h11.

The shell feeds what it reads with `receive_data()` (`b""` when the client
has closed its side) and calls `next_event()` for the next event until it
returns `NEED_DATA`: then it writes out `data_to_send()` and reads again.
Replies are queued as commands are processed, so a pipelined batch (RFC 2920)
is answered in one write when the input runs dry.

Some events ask the shell for a verdict (below); until it gives it,
`next_event()` returns `PAUSED` and processes nothing. A method called at a
time it may not be raises `ProtocolError` and leaves the connection in
`State.ERROR`, from which only `close_with()` leads out. Nothing the client
sends raises: its mistakes get replies. The states and both tables (commands,
transitions) are in `state.py`, the wording of every reply in `replies.py`.

Events (immutable values) the shell acts on:
- `MessageStart`: 354 was sent, or the first BDAT chunk is coming; open a spool.
- `MessageData`: a piece of the message, dot-unstuffed, LF line endings.
- `MessageEnd`: the message is complete. Verdict: `message_stored()` or
  `message_failed()`.
- `TransactionRejected`: a message or recipient was refused (access log);
  after a started message it also means "discard the spool".
- `TransactionAborted`: a transaction (MAIL given) was abandoned by RSET, EHLO or
  HELO: discard the spool of a BDAT message, log the transaction's end.
- `StartTLS`: 220 is queued; flush it and do the handshake. Verdict:
  `tls_started()`, or on failure close the socket. Input that came with the
  STARTTLS line is discarded.
- `AuthRequest`: check the credentials. Verdict: `auth_result()`, or
  `close_with()`.
- `CloseConnection`: the server ends the session; 221/421 is queued. Flush
  and close.
- `ConnectionClosed`: the client closed its side and all complete input before
  that is processed (an unfinished line, chunk or message is dropped); the
  session is over, close the socket. Once it is over, either way, every later
  `next_event()` returns a `ConnectionClosed`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Protocol

from ..mail import Envelope, Mailbox, safe_mailbox_name

# The core's settings (also the config's `limits:` and `extensions:`), named here too.
from ..mail.limits import Extensions as Extensions
from ..mail.limits import Limits as Limits
from ..mail.lineends import join_stored, stored_line_ends
from ..protocol import (
    LINE_TOO_LONG,
    NEED_DATA,
    PAUSED,
    CloseConnection,
    ConnectionClosed,
    SansIOConnection,
    Sentinel,
    sasl,
)
from . import replies as R
from .parser import (
    SyntaxProblem,
    parse_helo_name,
    parse_mail_from,
    parse_mailbox,
    parse_rcpt_to,
    split_command,
)
from .policy import RecipientPolicy
from .state import (
    COMMAND_STATES,
    SEQUENCE,
    TRANSACTION_STATES,
    TRANSITIONS,
    WAITING_STATES,
    State,
)


@dataclass(frozen=True)
class Security:
    """What this connection may offer and demand; the shell decides from the
    listener's role, the TLS setup and the client's address."""

    tls_available: bool = False  # a certificate is loaded: STARTTLS can be offered
    tls_active: bool = False  # an implicit-TLS listener: TLS from the first byte
    auth_available: bool = False  # some user has a password: AUTH can be offered
    auth_plaintext: bool = False  # offer AUTH without TLS (local testing only)
    auth_required: bool = False  # submission: AUTH before MAIL, else 530
    trusted: bool = False  # the client is in trusted_networks: it may relay
    sender_must_match: bool = False  # an authenticated user sends only as themself


class ClientRates(Protocol):
    """The client's messages and recipients per minute, counted by the shell
    across its sessions (the config's client_limits); a client that is not
    counted (trusted) gets none. The core asks at MAIL and RCPT, unless the
    client logged in: each call counts one, and False refuses it (450 4.7.1)."""

    def message(self) -> bool: ...
    def recipient(self) -> bool: ...


@dataclass(frozen=True)
class MessageStart:
    """The message of `envelope` begins (354 sent, or its first BDAT chunk)."""

    envelope: Envelope


@dataclass(frozen=True)
class MessageData:
    """A piece of the message: dot-unstuffed, LF line ends."""

    data: bytes


@dataclass(frozen=True)
class MessageEnd:
    """The message is complete; the connection waits for the shell's verdict."""

    envelope: Envelope
    #: octets of message data with CRLF line ends, not counting the dots doubled
    #: for transparency nor the final "." line (RFC 1870 §3)
    size: int


@dataclass(frozen=True)
class TransactionRejected:
    """A sender, a recipient or a message was refused with `reply`."""

    envelope: Envelope | None
    reply: R.Reply
    stage: str  # "MAIL", "RCPT", "DATA", "BDAT"
    address: str | None = None  # the refused sender (MAIL) or recipient (RCPT)
    size: int = 0  # of the refused message (DATA, BDAT), as in MessageEnd


@dataclass(frozen=True)
class TransactionAborted:
    """The client abandoned the transaction of `envelope`."""

    envelope: Envelope
    by: str  # the verb that abandoned it: "RSET", "EHLO", "HELO"
    size: int = 0  # of the message data received so far (BDAT)


@dataclass(frozen=True)
class StartTLS:
    """220 is queued: the shell does the handshake, then calls `tls_started()`."""


@dataclass(frozen=True)
class AuthRequest:
    """Credentials to check; the shell answers with `auth_result()`."""

    credentials: sasl.Credentials


Event = (
    MessageStart
    | MessageData
    | MessageEnd
    | TransactionRejected
    | TransactionAborted
    | StartTLS
    | AuthRequest
    | CloseConnection
    | ConnectionClosed
)


def _chunk_header(arg: bytes) -> tuple[int, bool] | None:
    """BDAT's `chunk-size [LAST]` (RFC 3030 §2) as (size, last), or None."""
    parts = arg.split()
    if (
        not 1 <= len(parts) <= 2
        or not parts[0].isdigit()
        or len(parts[0]) > 18
        or (len(parts) == 2 and parts[1].upper() != b"LAST")
    ):
        return None
    return int(parts[0]), len(parts) == 2


_NOTIFY = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
# RFC 3461 §4: xtext is printable ASCII less "+" and "=", with "+XX" hex escapes.
_XTEXT_RE = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")


def _is_xtext(text: str) -> bool:
    return _XTEXT_RE.fullmatch(text) is not None


def _is_utf8(arg: bytes) -> bool:
    """Non-ASCII, valid UTF-8: an address that SMTPUTF8 (RFC 6531) would allow."""
    if arg.isascii():
        return False
    try:
        arg.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_REPLY_CLASS = {n: f"{n}xx" for n in range(1, 6)}


class SMTPConnection(SansIOConnection):
    """One SMTP server session: bytes in, replies and events out.

    Built by the shell per client, with the server's `hostname`, the recipient
    `policy`, and the `limits`, `extensions` and `security` that hold for it.
    The shell may read, never write: `state` (a `State`), `closed_in` (where
    the session closed or failed), `helo` and `esmtp` (the client's greeting),
    `envelope` (the open transaction's, else None), `tls`, `auth_user`, and
    `errors` (error replies so far, against `limits.max_errors`).
    """

    TRANSITIONS = TRANSITIONS
    CLOSED = State.CLOSED
    ERROR = State.ERROR

    def __init__(
        self,
        hostname: str,
        policy: RecipientPolicy,
        limits: Limits | None = None,
        extensions: Extensions | None = None,
        security: Security | None = None,
        *,
        vrfy: bool = False,
        rates: ClientRates | None = None,
    ) -> None:
        self.hostname = hostname
        self.policy = policy
        self.limits = limits or Limits()
        self.extensions = extensions or Extensions()
        self.security = security or Security()
        self.vrfy = vrfy
        self.rates = rates
        self.state = State.CONNECTED
        #: The state the session was in when it closed or failed (ERROR); None before.
        self.closed_in: State | None = None
        self.helo: str | None = None
        self.esmtp = False
        self.envelope: Envelope | None = None
        self.errors = 0
        # Commands by verb and replies by class ("2xx") since the shell last took
        # them (for metrics): see take_counts().
        self._counts: dict[str, int] = {}
        self.tls = self.security.tls_active
        self.auth_user: str | None = None
        self._greeted = False  # greeting() was called
        self._end_of_input = False  # receive_data(b""): the client closed its side
        self._sasl: sasl.SASLExchange | None = None  # an AUTH exchange wants a response
        # BDAT (RFC 3030): octets of the current chunk still to read, and its fate
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_refusal: R.Reply | None = None  # the chunk is read, then refused
        self._cr_pending = b""  # the CRs a chunk ended with: an LF may start the next
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._discarding_line = False  # an over-long line is being skipped
        self.lines_read = 0  # command lines taken from the input
        # DATA state
        self._line_too_long = False  # the message has a line over limits.text_line
        self._chunk_line = 0  # BDAT: octets of the unfinished line so far
        self._data_bol = True  # the message data so far ends with CRLF (or is empty)
        self._size = 0  # octets of the current message so far, as MessageEnd.size
        self._emitting = True  # the message is not refused yet: its data goes out

    # ---------------------------------------------------------------- output

    def greeting(self) -> bytes:
        """The 220 banner (RFC 5321 §4.3.1), for the shell to send before anything else.

        Called once, while the connection is still in `CONNECTED` (on an
        implicit-TLS listener after the handshake); counted as a reply. Raises
        `ProtocolError` on a second call or in another state.
        """
        if self._greeted or self.state is not State.CONNECTED:
            raise self._misuse(f"greeting() again or in state {self.state.name}")
        self._greeted = True
        self._counts["2xx"] = self._counts.get("2xx", 0) + 1
        return R.greeting(self.hostname).to_bytes()

    def take_counts(self) -> dict[str, int]:
        """The tally since the last call, and a fresh one started: commands by verb
        (`"MAIL"`, `"UNKNOWN"` for what is not one) and replies by class (`"2xx"`).

        May be called in any state, as often as the shell likes (it adds them to
        its metrics once per message and at the end). The dict returned is the
        caller's: the connection never touches it again.
        """
        counts, self._counts = self._counts, {}
        return counts

    def _send(self, reply: R.Reply) -> None:
        self._out.append(reply.to_bytes(self.extensions.enhancedstatuscodes))
        key = _REPLY_CLASS[reply.code // 100]
        self._counts[key] = self._counts.get(key, 0) + 1

    def _error(self, reply: R.Reply) -> None:
        """Send an error reply and count it against the session's error budget."""
        self._send(reply)
        self.errors += 1
        if self.errors >= self.limits.max_errors and self.state in COMMAND_STATES:
            self._close(R.TOO_MANY_ERRORS)

    def _close(self, reply: R.Reply | None) -> None:
        if reply is not None:
            self._send(reply)
        self._move("close")
        self._buf.clear()
        self._events.append(CloseConnection(reply))

    # ----------------------------------------------------------------- input

    def next_event(self) -> Event | Sentinel:
        """Process buffered input and return the next event, or a sentinel.

        - an event (see the module docstring): act on it, then call again;
        - `NEED_DATA`: all complete input is processed; flush `data_to_send()`,
          read, `receive_data()`;
        - `PAUSED`: the connection waits for the shell's verdict on the last
          event (`message_stored()`/`message_failed()`, `auth_result()`,
          `tls_started()`), or, in `ERROR`, for `close_with()`. It means
          nothing else.
        - `ConnectionClosed`: the end of input was reached (the state is now
          `CLOSED`), and on every call once the session is over.

        May be called in any state. Never raises for anything the client sends:
        that gets replies.
        """
        while not self._events:
            state = self.state
            if state in WAITING_STATES:
                return PAUSED
            if state is State.CLOSED:
                return ConnectionClosed()
            if self._chunk_left:
                progressed = self._process_chunk()
            elif self.state is State.DATA:
                progressed = self._process_data()
            else:
                progressed = self._process_line()
            if not progressed:
                if self._end_of_input:  # what is left can never be completed
                    self._move("end_of_input")
                    self._buf.clear()
                    return ConnectionClosed()
                return NEED_DATA
        return self._events.pop(0)

    @property
    def message_size(self) -> int:
        """Octets of the current (or last) message so far, as `MessageEnd.size`
        counts them; the shell logs it for a session that ends in DATA or BDAT."""
        return self._size

    @property
    def in_data(self) -> bool:
        """Message data is being read: after 354, or inside a BDAT chunk (the
        shell's data timeouts apply rather than the command timeout). False once
        the session is over."""
        return self.state is State.DATA or (self._chunk_left > 0 and self.state in COMMAND_STATES)

    @property
    def _txn(self) -> Envelope:
        """The open transaction's envelope. The tables admit its callers only
        when there is one; None here is a bug in this module."""
        envelope = self.envelope
        if envelope is None:
            raise RuntimeError(f"no mail transaction in state {self.state.name}")
        return envelope

    # -------------------------------------------------------------- commands

    def _process_line(self) -> bool:
        limit = self.limits.command_line - 2  # the limit counts the CRLF
        if self.auth_offered:
            limit = max(limit, sasl.MAX_AUTH_LINE - 2)  # AUTH lines may be longer
        line = self._read_line(limit)
        if line is None:
            return False
        if line is LINE_TOO_LONG:
            if self._sasl is not None:
                self._sasl = None
                self._error(R.AUTH_LINE_TOO_LONG)
            else:
                self._error(R.COMMAND_TOO_LONG)
            return True
        if self._sasl is not None:
            self._auth_step(lambda exchange: exchange.respond(line))
            return True
        if len(line) > self.limits.command_line - 2 and line[:5].upper() != b"AUTH ":
            self._error(R.COMMAND_TOO_LONG)
            return True
        self._handle_command(line)
        return True

    def _handle_command(self, line: bytes) -> None:
        if b"\0" in line:
            self._error(R.BAD_NUL)
            return
        verb, arg = split_command(line)
        command = _COMMANDS.get(verb)
        if command is None or not self._verb_enabled(verb):
            self._counts["UNKNOWN"] = self._counts.get("UNKNOWN", 0) + 1
            self._error(R.UNKNOWN_COMMAND)
            return
        self._counts[verb] = self._counts.get(verb, 0) + 1
        handler, check, rule = command
        # A few refusals come before the state table's: a command this connection
        # cannot take at all (TLS already on, AUTH not enabled), or a BDAT whose
        # chunk cannot be skipped because its size is unreadable.
        refusal = getattr(self, check)(arg) if check is not None else None
        if refusal is None:
            refusal = rule.refused.get(self.state)
            if refusal is not None and rule.payload:
                self._refuse_chunk(arg, refusal)  # BDAT: read the chunk, then refuse
                return
        if refusal is not None:
            self._error(refusal)
            return
        getattr(self, handler)(arg)

    def _do_EHLO(self, arg: bytes) -> None:
        self._greet(arg, esmtp=True)

    def _do_HELO(self, arg: bytes) -> None:
        self._greet(arg, esmtp=False)

    def _greet(self, arg: bytes, esmtp: bool) -> None:
        try:
            name = parse_helo_name(arg)
        except SyntaxProblem:
            self._error(R.SYNTAX_EHLO if esmtp else R.SYNTAX_HELO)
            return
        self.helo, self.esmtp = name, esmtp
        self._reset_transaction("EHLO" if esmtp else "HELO")
        self._move("greet")
        if not esmtp:
            self._send(R.helo(self.hostname))
            return
        self._send(R.ehlo(self.hostname, self.ehlo_keywords()))

    def _verb_enabled(self, verb: str) -> bool:
        """Verbs of extensions that are switched off are unknown commands."""
        ext = self.extensions
        if verb == "BDAT":
            return ext.chunking
        if verb == "STARTTLS":
            return ext.starttls
        return True

    def _verb_offered(self, verb: str) -> bool:
        """The verb may succeed on this connection now: HELP lists it."""
        if verb == "STARTTLS":
            return self.starttls_offered
        if verb == "AUTH":
            return self.auth_offered
        return self._verb_enabled(verb)

    @property
    def starttls_offered(self) -> bool:
        """STARTTLS is advertised and may succeed now: on, a certificate, no TLS yet."""
        return self.extensions.starttls and self.security.tls_available and not self.tls

    @property
    def auth_offered(self) -> bool:
        """AUTH is advertised and may succeed now: on, some user has a password,
        TLS is up (or plaintext AUTH is allowed) and nobody is logged in yet."""
        sec = self.security
        return (
            self.extensions.auth
            and sec.auth_available
            and (self.tls or sec.auth_plaintext)
            and self.auth_user is None
        )

    def ehlo_keywords(self) -> list[str]:
        """The extension keywords of the EHLO reply now, in the order they are sent."""
        ext = self.extensions
        keywords = []
        if ext.pipelining:
            keywords.append("PIPELINING")
        if ext.size:
            keywords.append(f"SIZE {self.limits.max_message_size}")
        keywords.append("VRFY")
        if self.starttls_offered:
            keywords.append("STARTTLS")
        if self.auth_offered:
            keywords.append("AUTH " + " ".join(sasl.MECHANISMS))
        if ext.enhancedstatuscodes:
            keywords.append("ENHANCEDSTATUSCODES")
        if ext.eightbitmime:
            keywords.append("8BITMIME")
        if ext.dsn:
            keywords.append("DSN")  # RFC 3461; in Postfix's order, after 8BITMIME
        if ext.smtputf8:
            keywords.append("SMTPUTF8")
        if ext.chunking:
            keywords.append("CHUNKING")
        return keywords

    def _reset_transaction(self, by: str) -> None:
        if self.state in TRANSACTION_STATES and self.envelope is not None:
            size = self._size if self.state is State.BDAT else 0
            self._events.append(TransactionAborted(self.envelope, by, size))
        self.envelope = None
        if self.state in TRANSACTION_STATES:
            self._move("reset")

    def _do_MAIL(self, arg: bytes) -> None:
        if self.security.auth_required and self.auth_user is None:
            self._reject(R.AUTH_REQUIRED, "MAIL")
            return
        utf8_allowed = self.extensions.smtputf8 and self.esmtp
        try:
            sender, params = parse_mail_from(arg, utf8_allowed=utf8_allowed)
        except SyntaxProblem:
            if not arg.upper().startswith(b"FROM:"):
                self._error(R.SYNTAX_MAIL)
            elif _is_utf8(arg) and not (utf8_allowed and b" SMTPUTF8" in arg.upper()):
                self._error(R.NEEDS_SMTPUTF8)
            else:
                self._error(R.BAD_SENDER_SYNTAX)
            return
        problem = self._check_mail_params(params) or self._check_sender(sender)
        if problem is None and not self._rate_allows("message"):
            problem = R.MESSAGE_RATE
        if problem is not None:
            self._reject(problem, "MAIL", sender.address if sender else "")
            return
        self.envelope = Envelope(
            self.helo or "",
            self.esmtp,
            sender,
            params,
            smtputf8="SMTPUTF8" in params,
            auth_user=self.auth_user,
            tls=self.tls,
        )
        self._move("mail")
        self._send(R.SENDER_OK)

    def _rate_allows(self, what: str) -> bool:
        """One more message or recipient within the client's rate (`rates`);
        a logged-in client is not held to it."""
        rates = self.rates
        if rates is None or self.auth_user is not None:
            return True
        return rates.message() if what == "message" else rates.recipient()

    def _reject(self, reply: R.Reply, stage: str, address: str | None = None) -> None:
        """A policy refusal: logged by the shell (access log) and counted as an error."""
        # The event first: the error may end the session (CloseConnection).
        self._events.append(TransactionRejected(self.envelope, reply, stage, address))
        self._error(reply)

    def _check_sender(self, sender: Mailbox | None) -> R.Reply | None:
        if not (self.security.sender_must_match and self.auth_user and sender):
            return None
        own = (
            self.policy.is_local_domain(sender.domain)
            and safe_mailbox_name(sender.local_part) == self.auth_user
        )
        return None if own else R.SENDER_NOT_OWNED

    def _check_mail_params(self, params: dict[str, str | None]) -> R.Reply | None:
        ext = self.extensions
        for key, value in params.items():
            if key == "SIZE" and ext.size and self.esmtp:
                # isdigit() alone accepts "²" (int() then raises) and other scripts' digits
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    return R.BAD_PARAMETER_VALUE
                if int(value) > self.limits.max_message_size:
                    return R.SIZE_DECLARED_TOO_BIG
            elif key == "BODY" and ext.eightbitmime and self.esmtp:
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return R.BAD_PARAMETER_VALUE
            elif key == "SMTPUTF8" and ext.smtputf8 and self.esmtp:
                if value is not None:
                    return R.BAD_PARAMETER_VALUE
            elif key == "AUTH" and ext.auth and self.esmtp:
                pass  # RFC 4954 §5: the submitter's identity; we record our own login
            elif key == "RET" and ext.dsn and self.esmtp:
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return R.BAD_PARAMETER_VALUE  # RFC 3461 §4.3
            elif key == "ENVID" and ext.dsn and self.esmtp:
                if value is None or len(value) > 100 or not _is_xtext(value):
                    return R.BAD_PARAMETER_VALUE  # RFC 3461 §4.4: xtext, at most 100
            else:
                return R.BAD_PARAMETER
        return None

    def _rcpt_params(self, params: dict[str, str | None]) -> tuple[frozenset | None, str | None]:
        """NOTIFY and ORCPT (RFC 3461 §4.1, §4.2); SyntaxProblem for anything else."""
        notify: frozenset[str] | None = None
        orcpt: str | None = None
        for key, value in params.items():
            if key == "NOTIFY" and self.extensions.dsn and self.esmtp and value:
                words = frozenset(value.upper().split(","))
                if not words <= _NOTIFY or ("NEVER" in words and len(words) > 1):
                    raise SyntaxProblem("NOTIFY: NEVER, or SUCCESS/FAILURE/DELAY")
                notify = words
            elif key == "ORCPT" and self.extensions.dsn and self.esmtp and value:
                addr_type, _, address = value.partition(";")
                ok = addr_type and address and len(value) <= 500 and _is_xtext(address)
                if not ok or not addr_type.replace("-", "").isalnum():
                    raise SyntaxProblem("ORCPT: addr-type;xtext")
                orcpt = value
            else:
                raise SyntaxProblem(f"unknown parameter {key}")
        return notify, orcpt

    def _do_RCPT(self, arg: bytes) -> None:
        envelope = self._txn
        try:
            mailbox, params = parse_rcpt_to(arg, utf8=envelope.smtputf8)
        except SyntaxProblem:
            if not arg.upper().startswith(b"TO:"):
                self._error(R.SYNTAX_RCPT)
            elif _is_utf8(arg) and not envelope.smtputf8:
                self._error(R.NEEDS_SMTPUTF8)
            else:
                self._error(R.BAD_RECIPIENT_SYNTAX)
            return
        try:
            notify, orcpt = self._rcpt_params(params)
        except SyntaxProblem:
            known = set(params) <= {"NOTIFY", "ORCPT"} and self.extensions.dsn and self.esmtp
            self._error(R.BAD_PARAMETER_VALUE if known else R.BAD_PARAMETER)
            return
        if len(envelope.recipients) >= self.limits.max_recipients:
            # §4.5.3.1.10: a temporary reply; the client sends the rest later.
            self._send(R.TOO_MANY_RECIPIENTS)
            return
        if not self._rate_allows("recipient"):
            self._reject(R.RECIPIENT_RATE, "RCPT", mailbox.address)
            return
        resolved = self.policy.resolve(mailbox, self.may_relay)
        if isinstance(resolved, R.Reply):
            self._reject(resolved, "RCPT", mailbox.address)
            return
        if notify is not None or orcpt is not None:
            resolved = dataclasses.replace(resolved, notify=notify, orcpt=orcpt)
        self.envelope = envelope.with_recipient(resolved)
        self._move("rcpt")
        self._send(R.RECIPIENT_OK)

    def _do_DATA(self, arg: bytes) -> None:
        if arg:
            self._error(R.SYNTAX_DATA)
            return
        envelope = self._txn
        self._move("data")
        self._line_too_long = False
        self._data_bol = True
        self._size = 0
        self._emitting = True
        self._send(R.START_DATA)
        self._events.append(MessageStart(envelope))

    @property
    def may_relay(self) -> bool:
        """This client may send mail for other domains: it logged in or is
        trusted (`policy.resolve` decides what such a recipient gets)."""
        return self.auth_user is not None or self.security.trusted

    def _do_RSET(self, arg: bytes) -> None:
        if arg:
            self._error(R.SYNTAX_RSET)
            return
        self._reset_transaction("RSET")
        self._send(R.OK)

    def _do_NOOP(self, arg: bytes) -> None:
        self._send(R.OK)  # an argument is allowed and ignored (§4.1.1.9)

    def _do_QUIT(self, arg: bytes) -> None:
        if arg:
            self._error(R.SYNTAX_QUIT)
            return
        self._close(R.closing(self.hostname))

    def _do_HELP(self, arg: bytes) -> None:
        verbs = [verb for verb in _COMMANDS if self._verb_offered(verb)]
        extensions = [k.split()[0] for k in self.ehlo_keywords()]
        self._send(R.help_list(self.hostname, verbs, extensions))

    def _do_VRFY(self, arg: bytes) -> None:
        if not arg:
            self._error(R.SYNTAX_VRFY)
            return
        if not self.vrfy:
            self._send(R.VRFY_CANNOT)
            return
        text = arg.decode("utf-8", "replace").strip("<>")
        try:
            mailbox = parse_mailbox(text) if "@" in text else None
        except SyntaxProblem:
            self._error(R.SYNTAX_VRFY)
            return
        if mailbox is not None and not self.policy.is_local_domain(mailbox.domain):
            self._send(R.VRFY_CANNOT)
            return
        name = safe_mailbox_name(mailbox.local_part if mailbox else text)
        if name is not None and self.policy.is_known_user(name):
            domain = mailbox.domain if mailbox else min(self.policy.local_domains, default="")
            self._send(R.user_known(f"{name}@{domain}" if domain else name))
        elif self.policy.accept_unknown and name is not None:
            self._send(R.VRFY_CANNOT)
        else:
            self._error(R.VRFY_UNKNOWN_USER)

    # -------------------------------------------------------------- STARTTLS

    def _check_STARTTLS(self, arg: bytes) -> R.Reply | None:
        """Refusals that come before the state table's (see _handle_command)."""
        if arg:
            return R.SYNTAX_STARTTLS
        if self.tls:
            return R.TLS_ALREADY_ACTIVE
        return None

    def _do_STARTTLS(self, arg: bytes) -> None:
        if not self.starttls_offered:
            self._error(R.TLS_NOT_AVAILABLE)
            return
        self._send(R.STARTTLS_READY)
        # Whatever came behind STARTTLS in the clear must not be run after the
        # handshake as if it were protected (CVE-2011-0411, CVE-2024-34083).
        self._buf.clear()
        self._move("starttls")
        self._events.append(StartTLS())

    def tls_started(self) -> None:
        """The TLS handshake after `StartTLS` succeeded: forget everything said
        before it (RFC 3207 §4.2) and start again in `CONNECTED`, with `tls` set.

        Only while the connection waits for it (`TLS_HANDSHAKE`); else raises
        `ProtocolError`. Input received in the clear meanwhile is discarded. When
        the handshake fails the shell closes the socket: nothing is sent.
        """
        self._move("tls_started")
        self._buf.clear()
        self.tls = True
        self.helo, self.esmtp = None, False
        self.auth_user = None  # a login made in the clear (auth_plaintext) is forgotten too

    # ------------------------------------------------------------------ AUTH

    def _check_AUTH(self, arg: bytes) -> R.Reply | None:
        """Refusals that come before the state table's (see _handle_command)."""
        if not (self.extensions.auth and self.security.auth_available):
            return R.AUTH_NOT_ENABLED
        if not self.esmtp:
            # AUTH needs EHLO (RFC 4954 §4); the state does not tell it from HELO.
            return R.BAD_SEQUENCE_HELO
        if self.auth_user is not None:
            return R.AUTH_ALREADY
        return None

    def _do_AUTH(self, arg: bytes) -> None:
        if not self.auth_offered:  # what is left of it after _check_AUTH: TLS
            self._error(R.AUTH_NEEDS_TLS)
            return
        mechanism, _, initial = arg.partition(b" ")
        initial = initial.strip()
        if not mechanism:
            self._error(R.SYNTAX_AUTH)
            return
        name = mechanism.decode("ascii", "replace").upper()

        def start(exchange: sasl.SASLExchange) -> sasl.Challenge | sasl.Credentials:
            return exchange.start(initial or None)

        self._auth_step(start, name)

    def _auth_step(self, step, mechanism: str | None = None) -> None:  # type: ignore[no-untyped-def]
        """Run one step of the AUTH exchange and act on what it gives."""
        try:
            exchange = self._sasl or sasl.SASLExchange(mechanism or "")
            result = step(exchange)
        except sasl.SASLError as exc:
            self._sasl = None
            self._error(R.SASL_ERRORS[exc.problem])
            return
        if isinstance(result, sasl.Challenge):  # the next line is the answer
            self._sasl = exchange
            self._send(R.challenge(result.text))
            return
        self._sasl = None
        self._move("auth")
        self._events.append(AuthRequest(result))

    def auth_result(self, user: str | None) -> None:
        """The shell's verdict on an `AuthRequest`: the user's name on success
        (235; `auth_user` is set), None on failure (535, counted as an error).

        Only while the connection waits for it (`AUTHENTICATING`); else raises
        `ProtocolError`. The shell may instead `close_with()` (too many failures).
        """
        self._move("auth_result")
        if user is None:
            self._error(R.AUTH_FAILED)
            return
        self.auth_user = user
        self._send(R.AUTH_OK)

    # ------------------------------------------------------------------ BDAT

    def _check_BDAT(self, arg: bytes) -> R.Reply | None:
        """Without a size the chunk cannot be skipped: a syntax error comes before
        the state table's refusal, and what follows is read as commands."""
        return R.SYNTAX_BDAT if _chunk_header(arg) is None else None

    def _do_BDAT(self, arg: bytes) -> None:
        if self.state is State.RCPT:  # the first chunk: the message starts
            envelope = self._txn
            self._move("bdat")
            self._cr_pending = b""
            self._line_too_long = False
            self._chunk_line = 0
            self._size = 0
            self._emitting = True
            self._events.append(MessageStart(envelope))
        self._read_chunk(arg, None)

    def _refuse_chunk(self, arg: bytes, refusal: R.Reply) -> None:
        """BDAT at the wrong time: its chunk is still read, so that its octets
        are never taken for commands (RFC 3030 §3); `refusal` is sent after it."""
        self._read_chunk(arg, refusal)

    def _read_chunk(self, arg: bytes, refusal: R.Reply | None) -> None:
        size, last = _chunk_header(arg)  # type: ignore[misc]  # _check_BDAT let it through
        self._chunk_left, self._chunk_last, self._chunk_refusal = size, last, refusal
        if size == 0:
            self._end_chunk()

    def _process_chunk(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        take = min(len(buf), self._chunk_left)
        piece = bytes(buf[:take])
        del buf[:take]
        self._chunk_left -= take
        envelope = self.envelope
        if self._chunk_refusal is not None or envelope is None:
            pass
        elif not self._emitting:  # refused: counted, kept nowhere
            self._size += take
        else:
            before = self._size
            self._size += take
            self._check_chunk_lines(piece)
            if self._size > self.limits.max_message_size or self._line_too_long:
                self._emit_refused_prefix(piece.split(b"\n"), before)
            else:
                # Stored as DATA is (stored_line_ends). A CRLF may straddle two pieces,
                # so the CRs a piece ends with wait for the next: all of them, since
                # whether the last starts a CRLF decides how the one before it is kept.
                # (A run of CRs is one line: the text-line limit bounds it.)
                piece = self._cr_pending + piece
                kept = piece.rstrip(b"\r")
                self._cr_pending = piece[len(kept) :]
                data = stored_line_ends(kept)
                if data:
                    self._events.append(MessageData(data))
        if self._chunk_left == 0:
            self._end_chunk()
        return True

    def _check_chunk_lines(self, piece: bytes) -> None:
        """The text-line limit (RFC 5321 §4.5.3.1.6) holds for BDAT as for DATA.

        Without BINARYMIME a BDAT message is text like any other; a line may
        straddle chunks and pieces, so the length of the unfinished one is kept.
        As in DATA, a line ends at LF and may hold text_line - 2 octets and a CR.
        """
        limit = self.limits.text_line - 1
        if self._line_too_long:
            return
        if b"\n" not in piece:
            self._chunk_line += len(piece)
            self._line_too_long = self._chunk_line > limit
            return
        segments = piece.split(b"\n")
        first = self._chunk_line + len(segments[0])
        self._chunk_line = len(segments[-1])
        self._line_too_long = (
            first > limit or self._chunk_line > limit or max(map(len, segments)) > limit
        )

    def _end_chunk(self) -> None:
        refusal = self._chunk_refusal
        self._chunk_refusal = None
        if refusal is not None:
            self._error(refusal)
            return
        envelope = self._txn
        if self._size > self.limits.max_message_size:
            refusal = R.MESSAGE_TOO_BIG
        elif self._line_too_long:
            refusal = R.TEXT_LINE_TOO_LONG
        if refusal is not None:
            # The transaction has failed; chunks the client pipelined behind this
            # one are read and refused with "need MAIL" (RFC 3030 §4.2).
            self._move("message_refused")
            self.envelope = None
            self._events.append(TransactionRejected(envelope, refusal, "BDAT", size=self._size))
            self._error(refusal)
            return
        if not self._chunk_last:
            self._send(R.chunk_received(self._size))
            return
        if self._cr_pending:
            self._events.append(MessageData(self._cr_pending))
            self._cr_pending = b""
        self._move("message_end")
        self._events.append(MessageEnd(envelope, self._size))

    # ------------------------------------------------------------------ DATA

    def _process_data(self) -> bool:
        """Consume complete lines of message data; see RFC 5321 §4.1.1.4, §4.5.2.

        Works on whole blocks of lines rather than line by line: only `<CRLF>.`
        needs attention (dot-unstuffing and the end marker). A bare CR or LF is
        ordinary data and never ends the message. A bare LF does end a line for
        the text-line limit and for storage, as it does for the Maildir reader
        (clients such as `curl -T` send LF-only files); `_data_bol` says whether
        the data so far ended with CRLF, the only place a `.` line can start.
        """
        buf = self._buf
        if self._discarding_line:
            # The rest of an over-long line: counted in the size, kept nowhere.
            eol = buf.find(b"\n")
            skip = eol + 1 if eol >= 0 else len(buf) - (1 if buf.endswith(b"\r") else 0)
            self._size += skip
            if eol >= 0:
                self._data_bol = buf[eol - 1 : eol] == b"\r" if eol else False
            del buf[:skip]
            if eol < 0:
                return False
            self._discarding_line = False
        # The buffer now starts at the beginning of a line (a CRLF one if _data_bol).
        skipped = 0  # octets of an over-long line dropped here, counted after the block
        if self._data_bol and buf.startswith(b".\r\n"):
            end, block_len, consumed = True, 0, 3
        else:
            j = buf.find(b"\r\n.\r\n")
            if j >= 0:
                end, block_len, consumed = True, j + 2, j + 5
            else:
                last = buf.rfind(b"\n")
                end, block_len = False, last + 1 if last >= 0 else 0
                consumed = block_len
                tail = len(buf) - block_len
                # The unfinished line may hold text_line - 2 octets, a CR waiting
                # for its LF, and a transparency dot that does not count (§4.5.3.1.6).
                at_bol = buf[block_len - 2 : block_len] == b"\r\n" if block_len else self._data_bol
                dot = at_bol and buf[block_len : block_len + 1] == b"."
                if tail > self.limits.text_line - 1 + dot:
                    self._line_too_long = True
                    self._discarding_line = True
                    consumed = len(buf) - (1 if buf.endswith(b"\r") else 0)
                    # Counted as _data_block counts a line: without the transparency dot;
                    # and after the complete lines before it, as when the line comes
                    # whole, since the size so far decides which of them a refused
                    # message still emits (_emit_refused_prefix).
                    skipped = consumed - block_len - dot
                if block_len == 0 and consumed == 0:
                    return False
        block = bytes(buf[:block_len])
        del buf[:consumed]
        if block:
            self._data_block(block)
        self._size += skipped
        if end:
            self._end_of_data()
        return True

    def _data_block(self, block: bytes) -> None:
        """Account for, check and emit a block of complete CRLF-terminated lines."""
        bol = self._data_bol
        self._data_bol = block.endswith(b"\r\n")
        stuffed = block.count(b"\r\n.") + (bol and block[:1] == b".")  # lines with a leading dot
        before = self._size
        self._size += len(block) - stuffed
        if not self._emitting:
            return  # refused: read to the end, keep nothing
        # Lines end with CRLF or a bare LF: a CRLF line may hold text_line - 2
        # octets and its CR; the dot doubled for transparency does not count.
        limit = self.limits.text_line - 1
        segments = block.split(b"\n")
        if max(map(len, segments)) > limit and any(
            len(seg) - (seg[:1] == b".") > limit for seg in segments
        ):
            self._line_too_long = True
        if self._line_too_long or self._size > self.limits.max_message_size:
            self._emit_refused_prefix(segments, before)
            return
        lines = block.split(b"\r\n")
        if stuffed:
            first = 0 if bol else 1  # a line continued from the last block is not stuffed
            lines[first:] = [line[1:] if line[:1] == b"." else line for line in lines[first:]]
        self._events.append(MessageData(join_stored(lines)))

    def _emit_refused_prefix(self, segments: list[bytes], size_before: int) -> None:
        """The message is refused from here on: emit its complete lines before the
        problem (a line too long, the size limit reached), then nothing more.

        The shell discards them with the message; what they are for is the
        header section, whose Message-ID the access log shows for refused mail
        too, whatever reads the client's data came in.
        """
        self._emitting = False
        limit = self.limits.text_line - 1
        room = self.limits.max_message_size - size_before
        kept = taken = 0
        for seg in segments[:-1]:  # the last piece has no LF: not a complete line
            if len(seg) - (seg[:1] == b".") > limit or taken + len(seg) + 1 > room:
                break
            taken += len(seg) + 1
            kept += 1
        if kept:
            data = b"\n".join(segments[:kept]) + b"\n"
            self._events.append(MessageData(stored_line_ends(data)))

    def _end_of_data(self) -> None:
        envelope = self._txn
        # Both are decided on the whole message, so the reply does not depend on
        # how the client's data was cut into reads.
        if self._size > self.limits.max_message_size:
            reply = R.MESSAGE_TOO_BIG
        elif self._line_too_long:
            reply = R.TEXT_LINE_TOO_LONG
        else:
            reply = None
        if reply is not None:
            self._move("message_refused")
            self.envelope = None
            self._events.append(TransactionRejected(envelope, reply, "DATA", size=self._size))
            self._error(reply)
            return
        self._move("message_end")
        self._events.append(MessageEnd(envelope, self._size))

    # ------------------------------------------------ the shell's verdicts

    def message_stored(self, queue_id: str) -> None:
        """The shell's verdict on a `MessageEnd`: the message is durable in every
        mailbox. Queues `250 ... queued as <queue_id>` (RFC 5321 §4.1.1.4); the
        transaction is over (`GREETED`, no envelope) and input waiting behind
        the message is processed at the next `next_event()`.

        Only while the connection waits for it (`DELIVERING`); else raises
        `ProtocolError`.
        """
        self._move("message_stored")
        self._send(R.queued(queue_id))
        self.envelope = None

    def message_failed(self, reply: R.Reply = R.LOCAL_ERROR) -> None:
        """The shell's verdict on a `MessageEnd`: the message could not be kept.
        Queues `reply`, a 4xx so that the client keeps the message and retries
        (452 for a full disk), or a 5xx for a refusal; counted as an error. The
        transaction is over, as after `message_stored()`.

        Only while the connection waits for it (`DELIVERING`), and only with a
        4xx or 5xx reply; else raises `ProtocolError`.
        """
        if not 400 <= reply.code < 600:
            raise self._misuse(f"message_failed() with a {reply.code} reply")
        self._move("message_failed")
        self.envelope = None
        self._error(reply)


#: The dispatcher: verb -> (its handler's name, the name of the method with the
#: refusals that come before the state table's or None, its rule in the table).
#: In the table's order, which is HELP's. Methods are looked up by name on the
#: connection, so a subclass (or a test planting a bug) may replace one.
_COMMANDS = {
    verb: (
        f"_do_{verb}",
        f"_check_{verb}" if hasattr(SMTPConnection, f"_check_{verb}") else None,
        rule,
    )
    for verb, rule in SEQUENCE.items()
}
