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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..mail import Envelope, Mailbox, safe_mailbox_name

# The core's settings (also the config's `limits:` and `extensions:`), named here too.
from ..mail.limits import Extensions as Extensions
from ..mail.limits import Limits as Limits
from . import replies as R
from . import rules, sasl
from .connection import LINE_TOO_LONG, SansIOConnection
from .events import (
    AuthRequest,
    MessageData,
    MessageEnd,
    MessageStart,
    StartTLS,
    TransactionAborted,
    TransactionRejected,
)
from .params import is_utf8, mail_params_problem, rcpt_params
from .parser import (
    SyntaxProblem,
    parse_helo_name,
    parse_mail_from,
    parse_mailbox,
    parse_rcpt_to,
    split_command,
)
from .policy import RecipientPolicy
from .readers import ChunkReader, DataReader, Reader, RefusedChunk, chunk_header
from .rules import Guard, Rule
from .state import (
    COMMAND_STATES,
    TRANSACTION_STATES,
    TRANSITIONS,
    WAITING_STATES,
    State,
    Step,
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
class CloseConnection:
    """The server ends the session; `reply` (221 or 421) is queued."""

    reply: R.Reply | None


@dataclass(frozen=True)
class ConnectionClosed:
    """End of input: the client closed its side (or the session has ended)."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: next_event(): all complete input is processed; read more.
NEED_DATA = _Sentinel("NEED_DATA")
#: next_event(): the connection waits for the shell's verdict (or, in ERROR, its close).
PAUSED = _Sentinel("PAUSED")

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


_REPLY_CLASS = {n: f"{n}xx" for n in range(1, 6)}


#: The states in which message data may be read (DATA's, or a BDAT chunk's).
_DATA_STATES = COMMAND_STATES | {State.DATA}


class SMTPConnection(SansIOConnection):
    """One SMTP server session: bytes in, replies and events out.

    Built by the shell per client, with the server's `hostname`, the recipient
    `policy`, and the `limits`, `extensions` and `security` that hold for it.
    The shell may read, never write: `state` (a `State`), `closed_in` (where
    the session closed or failed), `helo` and `esmtp` (the client's greeting),
    `envelope` (the open transaction's, else None), `tls`, `auth_user`, and
    `errors` (error replies so far, against `limits.max_errors`).

    How it is built, and where a subclass (LMTP, RFC 2033) extends it:

    - `COMMANDS`, verb -> `rules.Rule`: the one table that says which verbs
      exist, when each may run and which method handles it (see `rules.py`).
      A subclass builds its own from this one: adds verbs (LHLO), drops some
      (HELO, EHLO, AUTH, STARTTLS: then they are unknown commands and never
      advertised), or puts its own handler in a verb's rule. Handlers are
      taken from the table, not looked up by name: a subclass that overrides
      a `_do_` method puts it in its table.
    - `TRANSITIONS`, state -> {`Step`: state}: where each step leads; a
      subclass may extend it for steps of its own.
    - `banner()`: the greeting's reply.
    - `_message_end(envelope, size)`: the message is complete (after the
      final `.` or `BDAT ... LAST`): by default a `MessageEnd` and the wait
      for the shell's verdict.
    - `_verdict(step, replies)`: the end of a transaction after the shell's
      verdict, queueing `replies` in order (error replies counted as errors):
      `message_stored()` sends one 250, an LMTP connection one reply per
      accepted recipient (RFC 2033 §4.2).

    The framing of message data is in `readers.py`: while data is read the
    connection holds one reader (`_reader`) and hands it its input.
    """

    TRANSITIONS: ClassVar[Mapping[State, Mapping[Step, State]]] = TRANSITIONS
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
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._discarding_line = False  # an over-long line is being skipped
        self.lines_read = 0  # command lines taken from the input
        self._reader: Reader | None = None  # message data is being read: it frames it
        self._message: DataReader | ChunkReader | None = None  # the current (or last) message's

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
        return self.banner().to_bytes()

    def banner(self) -> R.Reply:
        """The greeting's reply (an extension point: LMTP says so in it)."""
        return R.greeting(self.hostname)

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
        self._move(Step.CLOSE)
        self._buf.clear()
        self._events.append(CloseConnection(reply))

    def close_with(self, reply: R.Reply) -> None:
        """The shell ends the session (timeout, shutdown, kick, its own error):
        queue `reply` (a 421) and close.

        May be called in any state: it is the one way out of `ERROR`, and it
        works while the connection waits for a verdict. The next event is the
        `CloseConnection`; flush `data_to_send()` and close the socket. On a
        connection that is already closed it does nothing, so a shell may call
        it from every error path without asking first.
        """
        if self.state is not State.CLOSED:
            self._close(reply)

    # ----------------------------------------------------------------- input

    def next_event(self) -> Event | _Sentinel:
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
            reader = self._reader
            if reader is None:
                progressed = self._process_line()
            else:
                data = reader(self._buf)
                progressed = data is not None
                if data:
                    self._events.append(MessageData(data))
                if reader.done:
                    self._end_of_payload(reader)
            if not progressed:
                if self._end_of_input:  # what is left can never be completed
                    self._move(Step.END_OF_INPUT)
                    self._buf.clear()
                    return ConnectionClosed()
                return NEED_DATA
        return self._events.pop(0)

    @property
    def message_size(self) -> int:
        """Octets of the current (or last) message so far, as `MessageEnd.size`
        counts them; the shell logs it for a session that ends in DATA or BDAT."""
        return self._message.size if self._message is not None else 0

    @property
    def in_data(self) -> bool:
        """Message data is being read: after 354, or inside a BDAT chunk (the
        shell's data timeouts apply rather than the command timeout). False once
        the session is over."""
        return self._reader is not None and self.state in _DATA_STATES

    @property
    def _txn(self) -> Envelope:
        """The open transaction's envelope. The table admits its callers only
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
        rule = self.COMMANDS.get(verb)
        if rule is None or (rule.enabled is not None and not rule.enabled(self)):
            self._counts["UNKNOWN"] = self._counts.get("UNKNOWN", 0) + 1
            self._error(R.UNKNOWN_COMMAND)
            return
        self._counts[verb] = self._counts.get(verb, 0) + 1
        refusal = rule.check(self, arg)
        if refusal is None:
            rule.handler(self, arg)
        elif refusal.payload:  # BDAT: its chunk is read, then refused
            size, _ = chunk_header(arg) or (0, False)
            self._start_payload(RefusedChunk(size, refusal.reply))
        elif refusal.logged:
            self._reject(refusal.reply, verb)
        else:
            self._error(refusal.reply)

    def _do_EHLO(self, arg: bytes) -> None:
        self._greet(arg, esmtp=True)

    def _do_HELO(self, arg: bytes) -> None:
        self._greet(arg, esmtp=False)

    def _greet(self, arg: bytes, esmtp: bool, verb: str | None = None) -> None:
        """EHLO, HELO (or a subclass's greeting verb, named `verb`, sent as EHLO's)."""
        try:
            name = parse_helo_name(arg)
        except SyntaxProblem:
            self._error(R.SYNTAX_EHLO if esmtp else R.SYNTAX_HELO)
            return
        self.helo, self.esmtp = name, esmtp
        self._reset_transaction(verb or ("EHLO" if esmtp else "HELO"))
        self._move(Step.GREET)
        if not esmtp:
            self._send(R.helo(self.hostname))
            return
        self._send(R.ehlo(self.hostname, self.ehlo_keywords()))

    def _offers(self, verb: str) -> bool:
        """`verb` may succeed on this connection now: HELP and EHLO list it."""
        rule = self.COMMANDS.get(verb)
        return rule is not None and rule.is_offered(self)

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
            and "AUTH" in self.COMMANDS
        )

    def ehlo_keywords(self) -> list[str]:
        """The extension keywords of the EHLO reply now, in the order they are sent."""
        ext = self.extensions
        keywords = []
        if ext.pipelining:
            keywords.append("PIPELINING")
        if ext.size:
            keywords.append(f"SIZE {self.limits.max_message_size}")
        if "VRFY" in self.COMMANDS:
            keywords.append("VRFY")
        if self._offers("STARTTLS"):
            keywords.append("STARTTLS")
        if self._offers("AUTH"):
            keywords.append("AUTH " + " ".join(sasl.MECHANISMS))
        if ext.enhancedstatuscodes:
            keywords.append("ENHANCEDSTATUSCODES")
        if ext.eightbitmime:
            keywords.append("8BITMIME")
        if ext.dsn:
            keywords.append("DSN")  # RFC 3461; in Postfix's order, after 8BITMIME
        if ext.smtputf8:
            keywords.append("SMTPUTF8")
        if self._offers("BDAT"):
            keywords.append("CHUNKING")
        return keywords

    def _reset_transaction(self, by: str) -> None:
        if self.state in TRANSACTION_STATES and self.envelope is not None:
            size = self.message_size if self.state is State.BDAT else 0
            self._events.append(TransactionAborted(self.envelope, by, size))
        self.envelope = None
        if self.state in TRANSACTION_STATES:
            self._move(Step.RESET)

    def _do_MAIL(self, arg: bytes) -> None:
        utf8_allowed = self.extensions.smtputf8 and self.esmtp
        try:
            sender, params = parse_mail_from(arg, utf8_allowed=utf8_allowed)
        except SyntaxProblem:
            if not arg.upper().startswith(b"FROM:"):
                self._error(R.SYNTAX_MAIL)
            elif is_utf8(arg) and not (utf8_allowed and b" SMTPUTF8" in arg.upper()):
                self._error(R.NEEDS_SMTPUTF8)
            else:
                self._error(R.BAD_SENDER_SYNTAX)
            return
        problem = mail_params_problem(params, self.extensions, self.limits, self.esmtp)
        problem = problem or self._check_sender(sender)
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
        self._move(Step.MAIL)
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

    def _do_RCPT(self, arg: bytes) -> None:
        envelope = self._txn
        try:
            mailbox, params = parse_rcpt_to(arg, utf8=envelope.smtputf8)
        except SyntaxProblem:
            if not arg.upper().startswith(b"TO:"):
                self._error(R.SYNTAX_RCPT)
            elif is_utf8(arg) and not envelope.smtputf8:
                self._error(R.NEEDS_SMTPUTF8)
            else:
                self._error(R.BAD_RECIPIENT_SYNTAX)
            return
        dsn = rcpt_params(params, self.extensions, self.esmtp) if params else (None, None)
        if isinstance(dsn, R.Reply):
            self._error(dsn)
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
        notify, orcpt = dsn
        if notify is not None or orcpt is not None:
            resolved = dataclasses.replace(resolved, notify=notify, orcpt=orcpt)
        self.envelope = envelope.with_recipient(resolved)
        self._move(Step.RCPT)
        self._send(R.RECIPIENT_OK)

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
        verbs = [verb for verb in self.COMMANDS if self._offers(verb)]
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

    def _do_STARTTLS(self, arg: bytes) -> None:
        self._send(R.STARTTLS_READY)
        # Whatever came behind STARTTLS in the clear must not be run after the
        # handshake as if it were protected (CVE-2011-0411, CVE-2024-34083).
        self._buf.clear()
        self._move(Step.STARTTLS)
        self._events.append(StartTLS())

    def tls_started(self) -> None:
        """The TLS handshake after `StartTLS` succeeded: forget everything said
        before it (RFC 3207 §4.2) and start again in `CONNECTED`, with `tls` set.

        Only while the connection waits for it (`TLS_HANDSHAKE`); else raises
        `ProtocolError`. Input received in the clear meanwhile is discarded. When
        the handshake fails the shell closes the socket: nothing is sent.
        """
        self._move(Step.TLS_STARTED)
        self._buf.clear()
        self.tls = True
        self.helo, self.esmtp = None, False
        self.auth_user = None  # a login made in the clear (auth_plaintext) is forgotten too

    # ------------------------------------------------------------------ AUTH

    def _do_AUTH(self, arg: bytes) -> None:
        mechanism, _, initial = arg.partition(b" ")
        initial = initial.strip()
        if not mechanism:
            self._error(R.SYNTAX_AUTH)
            return
        name = mechanism.decode("ascii", "replace").upper()

        def start(exchange: sasl.SASLExchange) -> R.Reply | sasl.Credentials:
            return exchange.start(initial or None)

        self._auth_step(start, name)

    def _auth_step(self, step, mechanism: str | None = None) -> None:  # type: ignore[no-untyped-def]
        """Run one step of the AUTH exchange and act on what it gives."""
        try:
            exchange = self._sasl or sasl.SASLExchange(mechanism or "")
            result = step(exchange)
        except sasl.SASLError as exc:
            self._sasl = None
            self._error(exc.reply)
            return
        if isinstance(result, R.Reply):  # a challenge: the next line is the answer
            self._sasl = exchange
            self._send(result)
            return
        self._sasl = None
        self._move(Step.AUTH)
        self._events.append(AuthRequest(result))

    def auth_result(self, user: str | None) -> None:
        """The shell's verdict on an `AuthRequest`: the user's name on success
        (235; `auth_user` is set), None on failure (535, counted as an error).

        Only while the connection waits for it (`AUTHENTICATING`); else raises
        `ProtocolError`. The shell may instead `close_with()` (too many failures).
        """
        self._move(Step.AUTH_RESULT)
        if user is None:
            self._error(R.AUTH_FAILED)
            return
        self.auth_user = user
        self._send(R.AUTH_OK)

    # ------------------------------------------------------ DATA and BDAT

    def _do_DATA(self, arg: bytes) -> None:
        if arg:
            self._error(R.SYNTAX_DATA)
            return
        envelope = self._txn
        self._move(Step.DATA)
        self._message = DataReader(self.limits)
        self._send(R.START_DATA)
        self._events.append(MessageStart(envelope))
        self._start_payload(self._message)

    def _do_BDAT(self, arg: bytes) -> None:
        size, last = chunk_header(arg) or (0, False)  # the rule's first guard checked it
        message = self._message  # in BDAT, the message's ChunkReader
        if self.state is State.RCPT or not isinstance(message, ChunkReader):
            envelope = self._txn  # the first chunk: the message starts
            self._move(Step.BDAT)
            self._message = message = ChunkReader(self.limits)
            self._events.append(MessageStart(envelope))
        message.chunk(size, last)
        self._start_payload(message)

    def _start_payload(self, reader: Reader) -> None:
        """Message data follows: `reader` frames it (at once if it is empty)."""
        self._reader = reader
        if reader.done:
            self._end_of_payload(reader)

    def _end_of_payload(self, reader: Reader) -> None:
        """`reader` has read all its data: refuse, acknowledge or end the message."""
        self._reader = None
        if isinstance(reader, RefusedChunk):
            self._error(reader.reply)
            return
        envelope = self._txn
        # Decided on the whole message (or chunk), so the reply does not depend
        # on how the client's data was cut into reads.
        refusal = reader.refusal()
        if refusal is not None:
            # The transaction has failed; chunks the client pipelined behind this
            # one are read and refused with "need MAIL" (RFC 3030 §4.2).
            self._move(Step.MESSAGE_REFUSED)
            self.envelope = None
            self._events.append(
                TransactionRejected(envelope, refusal, reader.verb, size=reader.size)
            )
            self._error(refusal)
            return
        if not reader.last:
            self._send(R.chunk_received(reader.size))
            return
        tail = reader.tail()
        if tail:
            self._events.append(MessageData(tail))
        self._message_end(envelope, reader.size)

    def _message_end(self, envelope: Envelope, size: int) -> None:
        """The message is complete and accepted by the core: ask the shell."""
        self._move(Step.MESSAGE_END)
        self._events.append(MessageEnd(envelope, size))

    # ------------------------------------------------ the shell's verdicts

    def message_stored(self, queue_id: str) -> None:
        """The shell's verdict on a `MessageEnd`: the message is durable in every
        mailbox. Queues `250 ... queued as <queue_id>` (RFC 5321 §4.1.1.4); the
        transaction is over (`GREETED`, no envelope) and input waiting behind
        the message is processed at the next `next_event()`.

        Only while the connection waits for it (`DELIVERING`); else raises
        `ProtocolError`.
        """
        self._verdict(Step.MESSAGE_STORED, [R.queued(queue_id)])

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
        self._verdict(Step.MESSAGE_FAILED, [reply])

    def _verdict(self, step: Step, replies: Sequence[R.Reply]) -> None:
        """End the transaction by `step` and queue `replies`, in order; each
        error reply (4xx, 5xx) counts as an error."""
        self._move(step)
        self.envelope = None
        for reply in replies:
            if reply.code >= 400:
                self._error(reply)
            else:
                self._send(reply)

    # ------------------------------------------------------- the command table

    COMMANDS: ClassVar[Mapping[str, Rule]] = {
        "EHLO": Rule(_do_EHLO),
        "HELO": Rule(_do_HELO),
        "MAIL": Rule(
            _do_MAIL,
            rules.NEED_HELO,
            then=(Guard(rules.login_required, R.AUTH_REQUIRED, logged=True),),
        ),
        "RCPT": Rule(_do_RCPT, rules.NEED_MAIL),
        "DATA": Rule(_do_DATA, rules.NEED_RCPT),
        "RSET": Rule(_do_RSET),
        "NOOP": Rule(_do_NOOP),
        "QUIT": Rule(_do_QUIT),
        "VRFY": Rule(_do_VRFY),
        "HELP": Rule(_do_HELP),
        "BDAT": Rule(
            _do_BDAT,
            rules.NEED_RCPT_OR_BDAT,
            first=(Guard(rules.bad_chunk_header, R.SYNTAX_BDAT),),
            payload=True,
            enabled=rules.chunking_on,
        ),
        "STARTTLS": Rule(
            _do_STARTTLS,
            rules.NO_TRANSACTION,
            first=(
                Guard(rules.has_argument, R.SYNTAX_STARTTLS),
                Guard(rules.tls_on, R.TLS_ALREADY_ACTIVE),
            ),
            then=(Guard(rules.starttls_not_offered, R.TLS_NOT_AVAILABLE),),
            enabled=rules.starttls_on,
            offered=rules.starttls_offered,
        ),
        "AUTH": Rule(
            _do_AUTH,
            rules.NEED_HELO_NO_TRANSACTION,
            first=(
                Guard(rules.auth_not_enabled, R.AUTH_NOT_ENABLED),
                Guard(rules.helo_not_ehlo, R.BAD_SEQUENCE_HELO),
                Guard(rules.logged_in, R.AUTH_ALREADY),
            ),
            then=(Guard(rules.auth_not_offered, R.AUTH_NEEDS_TLS),),
            offered=rules.auth_offered,
        ),
    }
