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
sends raises: its mistakes get replies. The command table is
`SMTPConnection.COMMANDS` (its parts in `rules.py`), the states and steps are
in `state.py`, the framing of message data in `readers.py`, the wording of
every reply in `replies.py`.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..mail import Envelope

# The core's settings (also the config's `limits:` and `extensions:`), named here too.
from ..mail.limits import Extensions as Extensions
from ..mail.limits import Limits as Limits
from ..protocol import (
    LINE_TOO_LONG,
    NEED_DATA,
    PAUSED,
    CloseConnection,
    ConnectionClosed,
    Reply,
    SansIOConnection,
    Sentinel,
    sasl,
)
from . import params, rules
from . import replies as R
from .events import (
    AuthRequest,
    MessageData,
    MessageEnd,
    MessageStart,
    StartTLS,
    TransactionAborted,
    TransactionRejected,
)
from .parser import (
    SyntaxProblem,
    parse_helo_name,
    parse_mail_from,
    parse_rcpt_to,
    split_command,
)
from .policy import RecipientPolicy
from .readers import ChunkReader, DataReader, Reader, RefusedChunk, chunk_header
from .rules import Rule
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

    Where a subclass (LMTP, RFC 2033) extends it:

    - `COMMANDS`, verb -> `rules.Rule`: the one table of the verbs that exist,
      when each may run and the method that handles it (`rules.py`). A
      subclass builds its own from it: adds verbs (LHLO), drops some (EHLO,
      AUTH...: unknown commands then, and never advertised), or puts its own
      handler in a verb's rule (handlers come from the table, not by name).
    - `TRANSITIONS`, state -> {`Step`: state}: where each step leads.
    - `banner()`: the greeting's reply.
    - `_message_end(envelope, size)`: the message is complete and the core has
      no objection; by default a `MessageEnd`, and the wait for a verdict.
    - `_verdict(step, replies)`: the transaction ends with the shell's verdict,
      `replies` queued in order: one 250 from `message_stored()`, one reply
      per accepted recipient from an LMTP connection (RFC 2033 §4.2).

    While message data is read the connection holds one reader (`_reader`,
    from `readers.py`) that frames it.
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
        self._counts: dict[str, int] = {}  # commands and replies: take_counts()
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
        self._reader: Reader | None = None  # frames the message data being read
        self._message: DataReader | ChunkReader | None = None  # the current or last message's

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

    def banner(self) -> Reply:
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

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes(self.extensions.enhancedstatuscodes))
        key = _REPLY_CLASS[reply.code // 100]
        self._counts[key] = self._counts.get(key, 0) + 1

    def _error(self, reply: Reply) -> None:
        """Send an error reply and count it against the session's error budget."""
        self._send(reply)
        self.errors += 1
        if self.errors >= self.limits.max_errors and self.state in COMMAND_STATES:
            self._close(R.TOO_MANY_ERRORS)

    def _reply(self, reply: Reply) -> None:
        """Send `reply`, counted as an error if it is one (4xx, 5xx)."""
        if reply.code >= 400:
            self._error(reply)
        else:
            self._send(reply)

    def _close(self, reply: Reply | None) -> None:
        if reply is not None:
            self._send(reply)
        self._move(Step.CLOSE)
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
        """Message data is being read (after 354, or inside a BDAT chunk): the
        shell's data timeouts apply. False once the session is over."""
        return self._reader is not None and self.state in _DATA_STATES

    @property
    def _txn(self) -> Envelope:
        """The open transaction's envelope (the table admits callers only then)."""
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
            syntax = R.SYNTAX_LHLO if verb == "LHLO" else R.SYNTAX_EHLO
            self._error(syntax if esmtp else R.SYNTAX_HELO)
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
        return params.ehlo_keywords(self.extensions, self.limits, self._offers)

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
            sender, parameters = parse_mail_from(arg, utf8_allowed=utf8_allowed)
        except SyntaxProblem:
            self._error(params.mail_syntax_reply(arg, utf8_allowed))
            return
        problem = params.mail_params_problem(parameters, self.extensions, self.limits, self.esmtp)
        if problem is None and self.security.sender_must_match and self.auth_user and sender:
            problem = self.policy.sender_not_owned(sender, self.auth_user)
        # The client's rates (a logged-in client is not held to them).
        rates = self.rates if self.auth_user is None else None
        if problem is None and rates is not None and not rates.message():
            problem = R.MESSAGE_RATE
        if problem is not None:
            self._reject(problem, "MAIL", sender.address if sender else "")
            return
        self.envelope = Envelope(
            self.helo or "",
            self.esmtp,
            sender,
            parameters,
            smtputf8="SMTPUTF8" in parameters,
            auth_user=self.auth_user,
            tls=self.tls,
        )
        self._move(Step.MAIL)
        self._send(R.SENDER_OK)

    def _reject(self, reply: Reply, stage: str, address: str | None = None) -> None:
        """A policy refusal: logged by the shell (access log) and counted as an error."""
        # The event first: the error may end the session (CloseConnection).
        self._events.append(TransactionRejected(self.envelope, reply, stage, address))
        self._error(reply)

    def _do_RCPT(self, arg: bytes) -> None:
        envelope = self._txn
        try:
            mailbox, parameters = parse_rcpt_to(arg, utf8=envelope.smtputf8)
        except SyntaxProblem:
            self._error(params.rcpt_syntax_reply(arg, envelope.smtputf8))
            return
        dsn = params.rcpt_params(parameters, self.extensions, self.esmtp)
        if isinstance(dsn, Reply):
            self._error(dsn)
            return
        if len(envelope.recipients) >= self.limits.max_recipients:
            # §4.5.3.1.10: a temporary reply; the client sends the rest later.
            self._send(R.TOO_MANY_RECIPIENTS)
            return
        rates = self.rates if self.auth_user is None else None
        if rates is not None and not rates.recipient():
            self._reject(R.RECIPIENT_RATE, "RCPT", mailbox.address)
            return
        resolved = self.policy.resolve(mailbox, self.may_relay)
        if isinstance(resolved, Reply):
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
        self._reply(self.policy.verify(arg) if self.vrfy else R.VRFY_CANNOT)

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
        self._auth_step(lambda exchange: exchange.start(initial or None), name)

    def _auth_step(
        self,
        step: Callable[[sasl.SASLExchange], sasl.Challenge | sasl.Credentials],
        mechanism: str | None = None,
    ) -> None:
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
        if self.state is State.RCPT or not isinstance(message, ChunkReader):  # the first chunk
            envelope = self._txn
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
        refusal = reader.refusal()  # on the whole message: not on how reads cut it
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

    def message_failed(self, reply: Reply = R.LOCAL_ERROR) -> None:
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

    def _verdict(self, step: Step, replies: Sequence[Reply]) -> None:
        """End the transaction by `step` and queue `replies`, in order; each
        error reply (4xx, 5xx) counts as an error. A session over its error
        budget is closed after the last of them, never among them: LMTP's
        replies are one per recipient, and a `421` in their midst would shift
        every later reply onto the wrong recipient."""
        self._move(step)
        self.envelope = None
        for reply in replies:
            self._send(reply)
        errors = sum(reply.code >= 400 for reply in replies)
        self.errors += errors
        if errors and self.errors >= self.limits.max_errors and self.state in COMMAND_STATES:
            self._close(R.TOO_MANY_ERRORS)

    COMMANDS: ClassVar[Mapping[str, Rule]] = {
        "EHLO": Rule(_do_EHLO),
        "HELO": Rule(_do_HELO),
        "MAIL": Rule(_do_MAIL, rules.NEED_HELO, then=rules.LOGIN_FIRST),
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
            first=rules.CHUNK_SIZE,
            payload=True,
            enabled=rules.chunking_on,
        ),
        "STARTTLS": Rule(
            _do_STARTTLS,
            rules.NO_TRANSACTION,
            first=rules.STARTTLS_POSSIBLE,
            then=rules.STARTTLS_OFFERED,
            enabled=rules.starttls_on,
            offered=rules.starttls_offered,
        ),
        "AUTH": Rule(
            _do_AUTH,
            rules.NEED_HELO_NO_TRANSACTION,
            first=rules.AUTH_POSSIBLE,
            then=rules.AUTH_OFFERED,
            offered=rules.auth_offered,
        ),
    }
