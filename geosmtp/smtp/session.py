"""The sans-I/O SMTP server session (RFC 5321), in the manner of h11.

The shell feeds received bytes with `receive_data()`, then calls
`next_event()` until it returns `NEED_DATA` (read more) or `PAUSED` (act on
the last event first), and writes out `data_to_send()`. Replies are queued
as commands are processed, so a pipelined batch (RFC 2920) is answered in one
write when the input runs dry.

Events the shell acts on:
- `MessageStart`: 354 was sent; open a spool file.
- `MessageData`: a piece of the message, dot-unstuffed, LF line endings.
- `MessageEnd`: the message is complete; the core pauses until the shell
  calls `message_stored()` or `message_failed()`.
- `TransactionRejected`: a message or recipient was refused (access log);
  after a started message it also means "discard the spool".
- `CloseConnection`: 221/421 is queued; flush and close.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import replies as R
from .parser import (
    Mailbox,
    SyntaxProblem,
    parse_helo_name,
    parse_mail_from,
    parse_mailbox,
    parse_rcpt_to,
    split_command,
)
from .policy import Recipient, RecipientPolicy, safe_mailbox_name
from .state import COMMAND_STATES, State, sequence_error


@dataclass(frozen=True)
class Limits:
    """Protocol limits; RFC 5321 §4.5.3.1 gives the minimums servers must accept."""

    command_line: int = 512  # §4.5.3.1.4, including CRLF
    text_line: int = 1000  # §4.5.3.1.6, including CRLF
    max_message_size: int = 10 * 1024 * 1024  # octets; advertised by SIZE (RFC 1870)
    max_recipients: int = 100  # §4.5.3.1.8: at least 100 must be accepted
    max_errors: int = 20  # error replies before 421 and disconnect (like Postfix)


@dataclass(frozen=True)
class Extensions:
    """ESMTP extensions advertised in the EHLO reply."""

    pipelining: bool = True
    size: bool = True
    eightbitmime: bool = True
    enhancedstatuscodes: bool = True


@dataclass
class Envelope:
    helo: str
    esmtp: bool
    sender: Mailbox | None = None  # None is the null reverse-path <>
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    #: octets of message data with CRLF line ends, not counting the dots doubled
    #: for transparency nor the final "." line (RFC 1870 §3)
    size: int = 0
    message_id: str | None = None

    @property
    def sender_address(self) -> str:
        return self.sender.address if self.sender else ""


@dataclass(frozen=True)
class MessageStart:
    envelope: Envelope


@dataclass(frozen=True)
class MessageData:
    data: bytes


@dataclass(frozen=True)
class MessageEnd:
    envelope: Envelope


@dataclass(frozen=True)
class TransactionRejected:
    envelope: Envelope | None
    reply: R.Reply
    stage: str  # "MAIL", "RCPT", "DATA"


@dataclass(frozen=True)
class CloseConnection:
    reply: R.Reply | None


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")

Event = MessageStart | MessageData | MessageEnd | TransactionRejected | CloseConnection

_MESSAGE_ID_RE = re.compile(rb"^message-id:[ \t]*(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_HEADER_SNIFF_LIMIT = 64 * 1024


class SMTPConnection:
    """One SMTP server session: bytes in, replies and events out."""

    def __init__(
        self,
        hostname: str,
        policy: RecipientPolicy,
        limits: Limits | None = None,
        extensions: Extensions | None = None,
        *,
        vrfy: bool = False,
    ) -> None:
        self.hostname = hostname
        self.policy = policy
        self.limits = limits or Limits()
        self.extensions = extensions or Extensions()
        self.vrfy = vrfy
        self.state = State.CONNECTED
        self.helo: str | None = None
        self.esmtp = False
        self.envelope: Envelope | None = None
        self.errors = 0
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._discarding_line = False  # an over-long line is being skipped
        # DATA state
        self._line_too_long = False  # the message has a line over limits.text_line
        self._header_bytes: bytearray | None = None

    # ---------------------------------------------------------------- output

    def greeting(self) -> bytes:
        return R.reply(220, None, f"{self.hostname} ESMTP geosmtp").to_bytes()

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _send(self, reply: R.Reply) -> None:
        self._out.append(reply.to_bytes(self.extensions.enhancedstatuscodes))

    def _error(self, reply: R.Reply) -> None:
        """Send an error reply and count it against the session's error budget."""
        self._send(reply)
        self.errors += 1
        if self.errors >= self.limits.max_errors and self.state in COMMAND_STATES:
            self._close(R.TOO_MANY_ERRORS)

    def _close(self, reply: R.Reply | None) -> None:
        if reply is not None:
            self._send(reply)
        self.state = State.CLOSED
        self._buf.clear()
        self._events.append(CloseConnection(reply))

    def close_with(self, reply: R.Reply) -> None:
        """The shell ends the session (timeout, shutdown): queue `reply` and close."""
        if self.state is not State.CLOSED:
            self._close(reply)

    # ----------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> None:
        if self.state is not State.CLOSED:
            self._buf += data

    def next_event(self) -> Event | _Sentinel:
        while not self._events:
            if self.state is State.CLOSED:
                return PAUSED
            if self.state is State.DELIVERING:
                return PAUSED
            progressed = self._process_data() if self.state is State.DATA else self._process_line()
            if not progressed:
                return NEED_DATA
        return self._events.pop(0)

    @property
    def in_data(self) -> bool:
        return self.state is State.DATA

    # -------------------------------------------------------------- commands

    def _process_line(self) -> bool:
        buf = self._buf
        nl = buf.find(b"\n")
        limit = self.limits.command_line - 2  # the limit counts the CRLF
        if nl < 0:
            if len(buf) > limit + 1:  # +1: a CR may be waiting for its LF
                # Over-long: drop what we have and skip to the end of the line.
                self._discarding_line = True
                del buf[:]
            return False
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._discarding_line or len(line) > limit:
            self._discarding_line = False
            self._error(R.COMMAND_TOO_LONG)
            return True
        self._handle_command(line)
        return True

    def _handle_command(self, line: bytes) -> None:
        if b"\0" in line:
            self._error(R.BAD_NUL)
            return
        verb, arg = split_command(line)
        handler = getattr(self, f"_do_{verb}", None) if verb.isalpha() else None
        if handler is None:
            self._error(R.UNKNOWN_COMMAND)
            return
        wrong_time = sequence_error(verb, self.state)
        if wrong_time is not None:
            self._error(wrong_time)
            return
        handler(arg)

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
        self._reset_transaction()
        self.state = State.GREETED
        if not esmtp:
            self._send(R.reply(250, None, self.hostname))
            return
        self._send(R.reply(250, None, self.hostname, *self.ehlo_keywords()))

    def ehlo_keywords(self) -> list[str]:
        ext = self.extensions
        keywords = []
        if ext.pipelining:
            keywords.append("PIPELINING")
        if ext.size:
            keywords.append(f"SIZE {self.limits.max_message_size}")
        keywords.append("VRFY")
        if ext.eightbitmime:
            keywords.append("8BITMIME")
        if ext.enhancedstatuscodes:
            keywords.append("ENHANCEDSTATUSCODES")
        return keywords

    def _reset_transaction(self) -> None:
        self.envelope = None
        if self.state in (State.MAIL, State.RCPT):
            self.state = State.GREETED

    def _do_MAIL(self, arg: bytes) -> None:
        try:
            sender, params = parse_mail_from(arg)
        except SyntaxProblem:
            self._error(
                R.SYNTAX_MAIL if not arg.upper().startswith(b"FROM:") else R.BAD_SENDER_SYNTAX
            )
            return
        problem = self._check_mail_params(params)
        if problem is not None:
            # The event first: the error may end the session (CloseConnection).
            self._events.append(TransactionRejected(None, problem, "MAIL"))
            self._error(problem)
            return
        self.envelope = Envelope(self.helo or "", self.esmtp, sender, params)
        self.state = State.MAIL
        self._send(R.SENDER_OK)

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
            else:
                return R.BAD_PARAMETER
        return None

    def _do_RCPT(self, arg: bytes) -> None:
        envelope = self.envelope
        assert envelope is not None
        try:
            mailbox, params = parse_rcpt_to(arg)
        except SyntaxProblem:
            self._error(
                R.SYNTAX_RCPT if not arg.upper().startswith(b"TO:") else R.BAD_RECIPIENT_SYNTAX
            )
            return
        if params:
            self._error(R.BAD_PARAMETER)
            return
        if len(envelope.recipients) >= self.limits.max_recipients:
            # §4.5.3.1.10: a temporary reply; the client sends the rest later.
            self._send(R.TOO_MANY_RECIPIENTS)
            return
        resolved = self.policy.resolve(mailbox)
        if isinstance(resolved, R.Reply):
            self._events.append(TransactionRejected(envelope, resolved, f"RCPT <{mailbox}>"))
            self._error(resolved)
            return
        envelope.recipients.append(resolved)
        self.state = State.RCPT
        self._send(R.RECIPIENT_OK)

    def _do_DATA(self, arg: bytes) -> None:
        if arg:
            self._error(R.SYNTAX_DATA)
            return
        assert self.envelope is not None
        self.state = State.DATA
        self._line_too_long = False
        self._header_bytes = bytearray()
        self._send(R.START_DATA)
        self._events.append(MessageStart(self.envelope))

    def _do_RSET(self, arg: bytes) -> None:
        if arg:
            self._error(R.SYNTAX_RSET)
            return
        self._reset_transaction()
        self._send(R.RSET_OK)

    def _do_NOOP(self, arg: bytes) -> None:
        self._send(R.NOOP_OK)  # an argument is allowed and ignored (§4.1.1.9)

    def _do_QUIT(self, arg: bytes) -> None:
        if arg:
            self._error(R.SYNTAX_QUIT)
            return
        self._close(R.reply(221, "2.0.0", f"{self.hostname} closing connection"))

    def _do_HELP(self, arg: bytes) -> None:
        verbs = "EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
        self._send(
            R.reply(
                214,
                "2.0.0",
                f"{self.hostname} geosmtp; supported commands:",
                verbs,
                "Extensions: " + " ".join(k.split()[0] for k in self.ehlo_keywords()),
                "See RFC 5321",
            )
        )

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
            self._send(R.reply(250, "2.1.5", f"<{name}@{domain}>" if domain else f"<{name}>"))
        elif self.policy.accept_unknown and name is not None:
            self._send(R.VRFY_CANNOT)
        else:
            self._error(R.reply(550, "5.1.1", "User unknown"))

    # ------------------------------------------------------------------ DATA

    def _process_data(self) -> bool:
        """Consume complete lines of message data; see RFC 5321 §4.1.1.4, §4.5.2.

        Works on whole blocks of lines rather than line by line: only `<CRLF>.`
        needs attention (dot-unstuffing and the end marker). A bare CR or LF is
        ordinary data and never ends the message.
        """
        buf = self._buf
        envelope = self.envelope
        assert envelope is not None
        if self._discarding_line:
            # The rest of an over-long line: counted in the size, kept nowhere.
            eol = buf.find(b"\r\n")
            if eol < 0:
                skip = len(buf) - (1 if buf.endswith(b"\r") else 0)
                envelope.size += skip
                del buf[:skip]
                return False
            envelope.size += eol + 2
            del buf[: eol + 2]
            self._discarding_line = False
        # The buffer now starts at the beginning of a line.
        if buf.startswith(b".\r\n"):
            end, block_len, consumed = True, 0, 3
        else:
            j = buf.find(b"\r\n.\r\n")
            if j >= 0:
                end, block_len, consumed = True, j + 2, j + 5
            else:
                last = buf.rfind(b"\r\n")
                end, block_len = False, last + 2 if last >= 0 else 0
                consumed = block_len
                tail = len(buf) - block_len
                # The unfinished line may hold text_line - 2 octets, a CR waiting
                # for its LF, and a transparency dot that does not count (§4.5.3.1.6).
                dot = buf[block_len : block_len + 1] == b"."
                if tail > self.limits.text_line - 1 + dot:
                    self._line_too_long = True
                    self._discarding_line = True
                    consumed = len(buf) - (1 if buf.endswith(b"\r") else 0)
                    # Counted as _data_block counts a line: without the transparency dot.
                    envelope.size += consumed - block_len - dot
                if block_len == 0 and consumed == 0:
                    return False
        block = bytes(buf[:block_len])
        del buf[:consumed]
        if block:
            self._data_block(block)
        if end:
            self._end_of_data()
        return True

    def _data_block(self, block: bytes) -> None:
        """Account for, check and emit a block of complete CRLF-terminated lines."""
        envelope = self.envelope
        assert envelope is not None
        stuffed = block.count(b"\r\n.") + (block[:1] == b".")  # lines with a leading dot
        envelope.size += len(block) - stuffed
        if self._line_too_long or envelope.size > self.limits.max_message_size:
            return  # refused: read to the end, keep nothing
        lines = block.split(b"\r\n")
        lines.pop()  # the block ends with CRLF
        limit = self.limits.text_line - 2
        if max(map(len, lines)) > limit and any(
            # the dot doubled for transparency does not count (§4.5.3.1.6)
            len(line) - (line[:1] == b".") > limit
            for line in lines
        ):
            self._line_too_long = True
            return
        if stuffed:
            lines = [line[1:] if line[:1] == b"." else line for line in lines]
        lines.append(b"")
        data = b"\n".join(lines)
        if self._header_bytes is not None:
            self._sniff_headers(data)
        self._events.append(MessageData(data))

    def _sniff_headers(self, data: bytes) -> None:
        """Keep the header section (up to a limit) to find the Message-ID for the log."""
        hb = self._header_bytes
        assert hb is not None
        start = len(hb)
        hb += data
        if hb[:1] == b"\n":
            end = 0  # the message starts with a blank line: no header section
        else:
            # The blank line ending the header section may straddle two blocks
            # (one line per block when the client sends slowly): look back one octet.
            i = hb.find(b"\n\n", max(start - 1, 0))
            end = i + 1 if i >= 0 else -1
        if end >= 0:
            del hb[end:]  # a "Message-ID:" line in the body is not the message's
        elif len(hb) <= _HEADER_SNIFF_LIMIT:
            return
        m = _MESSAGE_ID_RE.search(hb)
        if m and self.envelope is not None:
            value = re.sub(rb"\s+", b" ", m.group(1)).strip()
            self.envelope.message_id = value.decode("utf-8", "replace")[:998]
        self._header_bytes = None

    def _end_of_data(self) -> None:
        envelope = self.envelope
        assert envelope is not None
        if self._header_bytes is not None:
            self._sniff_headers(b"\n\n")
        # Both are decided on the whole message, so the reply does not depend on
        # how the client's data was cut into reads.
        if envelope.size > self.limits.max_message_size:
            reply = R.MESSAGE_TOO_BIG
        elif self._line_too_long:
            reply = R.TEXT_LINE_TOO_LONG
        else:
            reply = None
        if reply is not None:
            self.state = State.GREETED
            self.envelope = None
            self._events.append(TransactionRejected(envelope, reply, "DATA"))
            self._error(reply)
            return
        self.state = State.DELIVERING
        self._events.append(MessageEnd(envelope))

    # ------------------------------------------------ the shell's verdicts

    def message_stored(self, queue_id: str) -> None:
        """The message is durable in every mailbox: answer 250 (RFC 5321 §4.1.1.4)."""
        assert self.state is State.DELIVERING
        self._send(R.reply(250, "2.0.0", f"Ok: queued as {queue_id}"))
        self.state = State.GREETED
        self.envelope = None

    def message_failed(self, reply: R.Reply = R.LOCAL_ERROR) -> None:
        """Storing failed: a 4xx so the client keeps the message and retries."""
        assert self.state is State.DELIVERING
        self.state = State.GREETED
        self.envelope = None
        self._error(reply)
