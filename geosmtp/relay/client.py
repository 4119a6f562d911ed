"""One outbound delivery attempt over SMTP (RFC 5321), with the standard library's smtplib.

`deliver()` takes the hosts to try (MX hosts from `mx.Resolver.resolve_mx`, or
one smarthost), the envelope and the message file, and returns an
`AttemptResult`: per recipient delivered / temporary failure / permanent
failure, with the remote's reply as RFC 3464 wants it for a DSN. It never
raises for anything the network or the remote does; only for bad arguments
and for a message file it cannot read (`OSError`, a local fault).

smtplib is used for the connection, the replies and the commands (a subclass
bounds the reply size, keeps timeouts apart from lost connections, and sets the
TLS server name). Under gevent's monkey-patching its sockets cooperate; the
caller may also wrap an attempt in `gevent.Timeout` for an overall limit.

Choices worth knowing:

- **Every address of every host, in order** (RFC 5321 §5.1, "the SMTP client
  SHOULD try at least two addresses"): the attempt moves to the next address
  on anything that goes wrong before the transaction starts: connection
  refused or timed out, a greeting other than 220 (a 5xx greeting too, as
  Postfix's `smtp_skip_5xx_greeting`), EHLO and HELO refused, required TLS not
  available, a TLS handshake failure, AUTH refused, or the connection lost.
  An address is tried once per attempt even when two MX hosts share it. When
  no address takes the mail, every recipient gets a temporary failure with the
  last address's reason. Once MAIL FROM is sent, the attempt is committed to
  that server: its replies decide.
- **Opportunistic TLS** (`tls="opportunistic"`, MX delivery): STARTTLS when
  offered (RFC 3207), without certificate checks by default (RFC 7435; Postfix's
  `smtp_tls_security_level = may`): an MX's certificate rarely names the MX,
  and a checked failure would only mean plaintext. If the handshake fails,
  that address is tried once more without STARTTLS, as Postfix does, since a
  server with a broken TLS stack would otherwise never get its mail. A refused
  STARTTLS (454) carries on in plaintext on the same connection.
  `tls="starttls"` and `tls="tls"` (port 465, RFC 8314) require TLS and check
  the certificate against the host name with the default context; no fallback.
  `tls_context` replaces the context, so the verification policy is its own.
- **AUTH** (RFC 4954) PLAIN (RFC 4616, UTF-8) or LOGIN, only over TLS unless
  `tls="none"` was chosen: credentials never cross an unencrypted connection by
  accident. A configured AUTH that fails or is not offered is a temporary
  failure (a configuration problem must not bounce mail), like Postfix's
  `smtp_sasl_auth_soft_bounce`.
- **SIZE** (RFC 1870): `SIZE=` is sent when offered; a message larger than the
  server's announced limit fails permanently (5.3.4) without being sent.
- **8BITMIME** (RFC 6152): `BODY=8BITMIME` when the caller says the message
  needs it and the server offers it. To a server without 8BITMIME, the message
  is scanned: if it has any octet above 127 it fails permanently (5.6.3,
  "conversion required but not supported", RFC 3463); it is never converted
  to quoted-printable (that would break DKIM signatures) nor sent 8-bit to a
  7-bit server (RFC 5321 §2.4, §3.6.3).
- **SMTPUTF8** (RFC 6531): sent when needed and offered; a message that needs
  it (the caller says so, or an address is not ASCII) to a server that does
  not offer it fails permanently with 5.6.7 (RFC 6531 §3.2, RFC 6533 §3).
- **The message** is streamed: CR, LF and CRLF line ends all become CRLF (RFC
  5321 §2.3.8: a bare CR or LF is never sent, so no `<CR>.<CR><LF>` or
  `<LF>.<LF>` reaches a server that might take it for the end of data), lines
  starting with "." are dot-stuffed (§4.5.2), a final CRLF is added if missing,
  then `.<CRLF>`; memory stays at one block whatever the message's size.
- **Loop detection** (RFC 5321 §6.3): more than `max_received` `Received:`
  fields in the header section is a permanent failure (5.4.6) without
  connecting anywhere.
- **Replies**: 4xx is temporary, 5xx permanent, per recipient at RCPT and for
  all accepted recipients at the end of data; a 552 to RCPT is temporary (RFC
  5321 §4.5.3.1.10: it meant "too many recipients" in RFC 821). Reply text is
  kept as sent, less control characters, for the DSN and the log.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import functools
import os
import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from ..mail.lineends import lines_as_lf
from .mx import Host

TLSMode = Literal["none", "starttls", "tls", "opportunistic"]
TLS_MODES: tuple[str, ...] = ("none", "starttls", "tls", "opportunistic")

#: RFC 5321 §6.3 suggests 100 hops as a loop; Postfix and issue 10 use 50.
DEFAULT_MAX_RECEIVED = 50
#: Bytes read from the message file at a time (and so, about, sent at a time).
BLOCK_SIZE = 64 * 1024
#: A reply longer than this is a misbehaving server (smtplib itself has no bound).
MAX_REPLY_LINES = 200
MAX_REPLY_BYTES = 64 * 1024
#: Diagnostic text kept for a DSN or a log line.
MAX_TEXT = 2000


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed for each step (RFC 5321 §4.5.3.2 gives the minimums).

    Each is the socket timeout while that step waits; every value may be made
    smaller (`Timeouts.all(30)` for a tight limit everywhere).
    """

    connect: float = 30.0  # not in the RFC; Postfix's smtp_connect_timeout
    greeting: float = 300.0  # §4.5.3.2.1 initial 220 message: 5 minutes
    helo: float = 300.0  # EHLO/HELO; Postfix's smtp_helo_timeout
    tls: float = 300.0  # STARTTLS and the handshake; Postfix's smtp_starttls_timeout
    auth: float = 300.0  # each AUTH exchange
    mail: float = 300.0  # §4.5.3.2.2 MAIL: 5 minutes
    rcpt: float = 300.0  # §4.5.3.2.3 RCPT: 5 minutes
    data_init: float = 120.0  # §4.5.3.2.4 DATA initiation: 2 minutes
    data_block: float = 180.0  # §4.5.3.2.5 data block: 3 minutes per send
    data_end: float = 600.0  # §4.5.3.2.6 DATA termination: 10 minutes
    quit: float = 10.0  # the outcome is known by then: little point waiting

    @classmethod
    def all(cls, seconds: float) -> Timeouts:
        """Every step the same, at most `seconds` (tests; an overall tight limit)."""
        return cls(**{f.name: seconds for f in dataclasses.fields(cls)})


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # the remote took responsibility (RFC 3464 Action: delivered/relayed)
    TEMPORARY = "temporary"  # try again later (RFC 3464 Action: delayed, eventually)
    PERMANENT = "permanent"  # bounce now (RFC 3464 Action: failed)


@dataclass(frozen=True, slots=True)
class RemoteReply:
    """An SMTP reply as the remote sent it: code, enhanced status if any, text."""

    code: int
    enhanced: str | None  # the RFC 3463 status the server sent (RFC 2034), if any
    text: str  # the lines joined by spaces, less the status, control characters removed

    @property
    def status(self) -> str:
        """The enhanced status, or the generic one of the reply's class (RFC 3463 §3.1)."""
        if self.enhanced:
            return self.enhanced
        return f"{self.code // 100}.0.0" if 200 <= self.code < 600 else "4.5.0"

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: str
    outcome: Outcome
    status: str  # RFC 3463 enhanced status for the DSN's Status: field
    diagnostic: str  # RFC 3464 §2.3.6 Diagnostic-Code value: "smtp; 550 5.1.1 ..."
    reply: RemoteReply | None = None  # the remote reply that decided it, if one did


@dataclass(frozen=True, slots=True)
class Tried:
    """An address that did not take the mail, and why (for the log)."""

    host: str
    address: str
    status: str
    diagnostic: str


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt did for each recipient, and with whom."""

    recipients: tuple[RecipientResult, ...]
    remote_host: str | None = None  # the host whose server decided (None: none did)
    remote_address: str | None = None
    remote_port: int | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when the session was encrypted
    tried: tuple[Tried, ...] = ()  # addresses that failed before it, in order

    @property
    def remote_mta(self) -> str | None:
        """The RFC 3464 §2.3.5 `Remote-MTA` value: "dns; mx.example.org"."""
        return f"dns; {self.remote_host}" if self.remote_host else None

    @property
    def relay(self) -> str:
        """Who it was, for a log line: "mx.example.org[192.0.2.1]:25", or "none"."""
        if self.remote_host is None:
            return "none"
        return f"{self.remote_host}[{self.remote_address}]:{self.remote_port}"

    def by_outcome(self, outcome: Outcome) -> list[RecipientResult]:
        return [r for r in self.recipients if r.outcome is outcome]

    @property
    def delivered(self) -> list[str]:
        return [r.recipient for r in self.by_outcome(Outcome.DELIVERED)]

    @property
    def temporary(self) -> list[str]:
        return [r.recipient for r in self.by_outcome(Outcome.TEMPORARY)]

    @property
    def permanent(self) -> list[str]:
        return [r.recipient for r in self.by_outcome(Outcome.PERMANENT)]

    def __getitem__(self, recipient: str) -> RecipientResult:
        for result in self.recipients:
            if result.recipient == recipient:
                return result
        raise KeyError(recipient)


# ------------------------------------------------------------ the message file


_RECEIVED_RE = re.compile(rb"received[ \t]*:", re.IGNORECASE)
_MAX_HEADER_LINE = 8192


def count_received(message: BinaryIO, stop_after: int | None = None) -> int:
    """How many `Received:` fields the header section has (RFC 5321 §6.3).

    Reads line by line up to the blank line that ends the header section (or
    the end), at most `_MAX_HEADER_LINE` octets at a time, so a huge header or
    a file with no blank line never sits in memory; continuation lines do not
    count; stops early at `stop_after`. The file is left wherever it stopped.
    """
    count = 0
    at_line_start = True
    while True:
        line = message.readline(_MAX_HEADER_LINE)
        if not line:
            return count
        starts_line, at_line_start = at_line_start, line.endswith(b"\n")
        if not starts_line:
            continue  # the rest of a long line
        if line in (b"\n", b"\r\n"):
            return count
        if _RECEIVED_RE.match(line):
            count += 1
            if stop_after is not None and count >= stop_after:
                return count


def has_8bit(message: BinaryIO, block_size: int = BLOCK_SIZE) -> bool:
    """Whether the message has an octet above 127 (read in blocks, to the end at most)."""
    while chunk := message.read(block_size):
        if not chunk.isascii():
            return True
    return False


def write_data(
    message: BinaryIO, send: Callable[[bytes], object], *, block_size: int = BLOCK_SIZE
) -> int:
    """Send `message` as the content of DATA, ending with `.<CRLF>`; return the octets sent.

    CR, LF and CRLF line ends become CRLF (RFC 5321 §2.3.8; `lines_as_lf`); a line starting
    with "." gets another (§4.5.2); a last line without an end gets a CRLF;
    then the end-of-data `.<CRLF>` (§4.1.1.4). One block of the file in memory
    at a time, however lines fall across blocks.
    """
    sent = 0
    at_line_start = True  # the next octet starts a line
    held = b""  # the CRs the last block ended with: what follows decides what they are

    def put(text: bytes) -> None:
        nonlocal sent, at_line_start
        if at_line_start and text.startswith(b"."):
            text = b"." + text
        text = text.replace(b"\n.", b"\n..")
        at_line_start = text.endswith(b"\n")
        out = text.replace(b"\n", b"\r\n")
        send(out)
        sent += len(out)

    while chunk := message.read(block_size):
        chunk = held + chunk
        kept = chunk.rstrip(b"\r")
        held = chunk[len(kept) :]
        if kept:
            put(lines_as_lf(kept))
    if held:
        put(lines_as_lf(held))
    tail = b"" if at_line_start else b"\r\n"
    tail += b".\r\n"
    send(tail)
    return sent + len(tail)


@contextlib.contextmanager
def _opened(message: BinaryIO | str | os.PathLike[str]) -> Iterator[BinaryIO]:
    if isinstance(message, str | os.PathLike):
        with open(message, "rb") as f:
            yield f
    else:
        yield message


def _size_of(message: BinaryIO, start: int) -> int:
    try:
        return os.fstat(message.fileno()).st_size - start
    except (OSError, AttributeError, ValueError):
        end = message.seek(0, os.SEEK_END)
        message.seek(start)
        return end - start


# ------------------------------------------------------------------ replies

_STATUS_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """`text` without control characters (they could end a DSN header or a log
    line early), at most `limit` characters."""
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_reply(code: int, message: bytes) -> RemoteReply:
    """smtplib's (code, lines joined by LF) as a `RemoteReply`.

    The enhanced status (RFC 2034 §4; RFC 3463) is taken from the first line
    when its class matches the reply code's, and dropped from the lines after
    it when they repeat it, so a multi-line reply reads as one sentence.
    """
    lines = [
        line.strip() for line in message.decode("utf-8", "replace").split("\n") if line.strip()
    ]
    enhanced = None
    if lines:
        m = _STATUS_RE.match(lines[0])
        if m and m.group(1) == str(code)[:1]:
            enhanced = m.group(0)
            lines = [
                line[len(enhanced) :].strip() if line.startswith(enhanced + " ") else line
                for line in lines
            ]
            if lines[0] == enhanced:
                lines[0] = ""
    text = " ".join(line for line in lines if line)
    return RemoteReply(code, enhanced, printable(text))


def _soften(status: str) -> str:
    """The same detail as a temporary status: 5.7.8 -> 4.7.8."""
    return "4" + status[1:] if status[:1] == "5" else status


def _outcome_of(reply: RemoteReply) -> Outcome:
    if 200 <= reply.code < 300:
        return Outcome.DELIVERED
    if 500 <= reply.code < 600:
        return Outcome.PERMANENT
    return Outcome.TEMPORARY  # 4xx, and anything odd: never bounce on a reply we do not follow


def _from_reply(
    recipient: str, reply: RemoteReply, outcome: Outcome | None = None
) -> RecipientResult:
    outcome = outcome or _outcome_of(reply)
    status = reply.status
    if outcome is Outcome.TEMPORARY and not 400 <= reply.code < 500:
        status = "4.5.0" if not 500 <= reply.code < 600 else _soften(status)
    return RecipientResult(recipient, outcome, status, f"smtp; {reply}", reply)


# ------------------------------------------------------- the smtplib connection


class _Lost(Exception):
    """The connection ended or timed out in the middle of the conversation."""

    def __init__(self, detail: str, timed_out: bool) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP with bounded replies, step timeouts, a TLS server name, and
    errors that tell a timeout from a lost connection."""

    ehlo_msg = "EHLO"  # smtplib sends "ehlo"; upper case is what every MTA sends

    def __init__(
        self,
        helo_name: str,
        server_name: str,
        implicit_tls: ssl.SSLContext | None,
        timeouts: Timeouts,
        source_address: tuple[str, int] | None,
    ) -> None:
        super().__init__(
            local_hostname=helo_name, timeout=timeouts.connect, source_address=source_address
        )
        self._host = server_name  # smtplib reads it as the TLS server name
        self._implicit_tls = implicit_tls
        self._timeouts = timeouts

    def open(self, address: str, port: int) -> RemoteReply:
        """Connect (raises OSError, ssl.SSLError for implicit TLS) and read the greeting."""
        sock = socket.create_connection(
            (address, port), self._timeouts.connect, self.source_address
        )
        try:
            if self._implicit_tls is not None:
                sock.settimeout(self._timeouts.tls)
                sock = self._implicit_tls.wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(self._timeouts.greeting)
        except BaseException:
            sock.close()
            raise
        self.sock, self.file = sock, None
        return parse_reply(*self.getreply())

    def set_timeout(self, seconds: float) -> None:
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def command(self, line: str) -> RemoteReply:
        self.putcmd(line)
        return parse_reply(*self.getreply())

    def send(self, s: bytes | str) -> None:  # smtplib's, less its "Server not connected"
        if isinstance(s, str):
            s = s.encode(self.command_encoding)
        if self.sock is None:
            raise _Lost("not connected", timed_out=False)
        try:
            self.sock.sendall(s)
        except TimeoutError:
            self.close()
            raise _Lost("timed out", timed_out=True) from None
        except OSError as exc:
            self.close()
            raise _Lost(exc.strerror or str(exc) or type(exc).__name__, timed_out=False) from None

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's, bounded in lines and octets (a server can send "250-" forever)."""
        if self.sock is None:
            raise _Lost("not connected", timed_out=False)
        if self.file is None:
            self.file = self.sock.makefile("rb")
        lines: list[bytes] = []
        total = 0
        while True:
            try:
                line = self.file.readline(smtplib._MAXLINE + 1)
            except TimeoutError:
                self.close()
                raise _Lost("timed out", timed_out=True) from None
            except OSError as exc:
                self.close()
                raise _Lost(exc.strerror or str(exc) or type(exc).__name__, False) from None
            if not line:
                self.close()
                raise _Lost("connection closed by the server", timed_out=False)
            total += len(line)
            if len(line) > smtplib._MAXLINE or total > MAX_REPLY_BYTES:
                self.close()
                raise _Lost("reply too long", timed_out=False)
            lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                return -1, b"\n".join(lines)
            if line[3:4] != b"-":
                return code, b"\n".join(lines)
            if len(lines) >= MAX_REPLY_LINES:
                self.close()
                raise _Lost("reply with too many lines", timed_out=False)

    @property
    def encrypted(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)

    def tls_description(self) -> str | None:
        if not isinstance(self.sock, ssl.SSLSocket):
            return None
        cipher = self.sock.cipher()
        return f"{self.sock.version()} {cipher[0]}" if cipher else self.sock.version()


# ---------------------------------------------------------------- the attempt


STARTTLS_STAGE = "performing the STARTTLS handshake"


class _TargetFailed(Exception):
    """This address did not take the mail; try the next."""

    def __init__(self, status: str, diagnostic: str, *, tls_failed: bool = False) -> None:
        super().__init__(diagnostic)
        self.status = status
        self.diagnostic = diagnostic
        self.tls_failed = tls_failed


def _tls_name(host: str) -> str:
    """The name to check a certificate against: an address literal's address."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        return inner[5:] if inner[:5].lower() == "ipv6:" else inner
    return host


@functools.cache
def _default_context(verify: bool) -> ssl.SSLContext:
    """The standard library's default client context, made once per process and
    shared: making one loads the system's CA certificates, about 35 ms of CPU
    during which no other greenlet runs, once per TLS session otherwise.
    `verify=False` is opportunistic TLS (RFC 7435: encrypt, without authenticating)."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _bad_address(address: str) -> bool:
    return any(c in "<>" or ord(c) < 0x20 or ord(c) == 0x7F for c in address)


def deliver(
    hosts: Sequence[Host],
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: BinaryIO | str | os.PathLike[str],
    *,
    helo_name: str,
    tls: TLSMode = "opportunistic",
    tls_context: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
    timeouts: Timeouts | None = None,
    needs_smtputf8: bool = False,
    needs_8bitmime: bool = False,
    size: int | None = None,
    max_received: int = DEFAULT_MAX_RECEIVED,
    source_address: tuple[str, int] | None = None,
) -> AttemptResult:
    """One delivery attempt of `message` to `recipients`, in one SMTP transaction.

    `hosts` are tried in order, every address of each (a `Host` without
    addresses is connected to by name, as a smarthost may be); `port` is the
    same for all. `sender` and `recipients` are addresses as they go between
    `<` and `>` ("" is the null reverse-path of a bounce). `message` is a
    binary file read from its current position, or a path; `size` (the SIZE=
    estimate, RFC 1870) defaults to its length. `needs_8bitmime`: the message
    was received with BODY=8BITMIME or is known to be 8-bit; `needs_smtputf8`:
    it was received with SMTPUTF8 (also implied by a non-ASCII address).
    See the module's docstring for TLS, AUTH and the failure rules.
    """
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
    if not recipients:
        raise ValueError("no recipients")
    with _opened(message) as f:
        return _Attempt(
            hosts=list(hosts),
            port=port,
            sender=sender,
            recipients=list(recipients),
            message=f,
            helo_name=helo_name,
            tls=tls,
            tls_context=tls_context,
            auth=auth,
            timeouts=timeouts or Timeouts(),
            needs_smtputf8=needs_smtputf8,
            needs_8bitmime=needs_8bitmime,
            size=size,
            max_received=max_received,
            source_address=source_address,
        ).run()


@dataclass
class _Attempt:
    hosts: list[Host]
    port: int
    sender: str
    recipients: list[str]
    message: BinaryIO
    helo_name: str
    tls: str
    tls_context: ssl.SSLContext | None
    auth: tuple[str, str] | None
    timeouts: Timeouts
    needs_smtputf8: bool
    needs_8bitmime: bool
    size: int | None
    max_received: int
    source_address: tuple[str, int] | None
    start: int = 0  # where the message begins in the file
    tried: list[Tried] = field(default_factory=list)
    results: dict[int, RecipientResult] = field(default_factory=dict)

    # ------------------------------------------------------------ the whole

    def run(self) -> AttemptResult:
        self.start = start = self.message.tell()
        received = count_received(self.message, stop_after=self.max_received + 1)
        self.message.seek(start)
        if received > self.max_received:
            return self._everyone(
                Outcome.PERMANENT,
                "5.4.6",  # RFC 3463 X.4.6 routing loop detected
                f"x-geosmtp; more than {self.max_received} Received: header fields"
                " (RFC 5321 section 6.3): the message is looping",
            )
        if _bad_address(self.sender):
            return self._everyone(
                Outcome.PERMANENT, "5.1.7", "x-geosmtp; the sender address cannot be sent"
            )
        for i, rcpt in enumerate(self.recipients):
            if _bad_address(rcpt):
                self.results[i] = RecipientResult(
                    rcpt, Outcome.PERMANENT, "5.1.3", "x-geosmtp; the address cannot be sent"
                )
        if len(self.results) == len(self.recipients):
            return self._result()
        if not (self.sender.isascii() and all(r.isascii() for r in self.recipients)):
            self.needs_smtputf8 = True
        if self.size is None:
            self.size = _size_of(self.message, start)

        last: _TargetFailed | None = None
        for host, address in self._targets():
            use_tls = self.tls != "none"
            for _ in range(2):  # the second round: opportunistic TLS failed, plaintext
                try:
                    return self._session(host, address, use_tls)
                except _TargetFailed as failure:
                    last = failure
                    self.tried.append(Tried(host.name, address, failure.status, failure.diagnostic))
                    if not (failure.tls_failed and self.tls == "opportunistic" and use_tls):
                        break
                    use_tls = False
        if last is None:
            return self._everyone(Outcome.TEMPORARY, "4.4.4", "x-geosmtp; no host to deliver to")
        return self._everyone(Outcome.TEMPORARY, last.status, last.diagnostic)

    def _targets(self) -> Iterator[tuple[Host, str]]:
        seen: set[str] = set()
        for host in self.hosts:
            for address in host.addresses or (host.name,):
                if address not in seen:
                    seen.add(address)
                    yield host, address

    def _everyone(self, outcome: Outcome, status: str, diagnostic: str, **remote) -> AttemptResult:
        for i, rcpt in enumerate(self.recipients):
            self.results.setdefault(i, RecipientResult(rcpt, outcome, status, diagnostic))
        return self._result(**remote)

    def _result(self, **remote: object) -> AttemptResult:
        return AttemptResult(
            tuple(self.results[i] for i in range(len(self.recipients))),
            tried=tuple(self.tried),
            **remote,  # type: ignore[arg-type]
        )

    # ---------------------------------------------------------- one session

    def _session(self, host: Host, address: str, use_tls: bool) -> AttemptResult:
        smtp = _SMTP(
            self.helo_name,
            _tls_name(host.name),
            self._context() if self.tls == "tls" else None,
            self.timeouts,
            self.source_address,
        )
        where = f"{host.name}[{address}]:{self.port}"
        try:
            self._open(smtp, where, address, use_tls)
            remote = {
                "remote_host": host.name,
                "remote_address": address,
                "remote_port": self.port,
                "tls": smtp.tls_description(),
            }
            return self._transaction(smtp, where, remote)
        finally:
            smtp.close()

    def _context(self) -> ssl.SSLContext:
        if self.tls_context is not None:
            return self.tls_context
        return _default_context(verify=self.tls != "opportunistic")

    def _open(self, smtp: _SMTP, where: str, address: str, use_tls: bool) -> None:
        """Connect, greeting, EHLO, STARTTLS, AUTH: any failure raises `_TargetFailed`."""
        stage = "receiving the initial server greeting"
        try:
            try:
                greeting = smtp.open(address, self.port)
            except ssl.SSLError as exc:
                raise _TargetFailed(
                    "4.7.5", f"x-geosmtp; TLS with {where} failed: {exc}", tls_failed=True
                ) from None
            except TimeoutError:
                raise _TargetFailed("4.4.1", f"x-geosmtp; connect to {where}: timed out") from None
            except OSError as exc:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise _TargetFailed("4.4.1", f"x-geosmtp; connect to {where}: {reason}") from None
            if greeting.code != 220:
                self._quit(smtp)
                raise _TargetFailed(_soften(greeting.status), f"smtp; {greeting}")

            stage = "performing the EHLO handshake"
            self._hello(smtp)
            if use_tls and self.tls != "tls":
                stage = STARTTLS_STAGE
                self._starttls(smtp, where)
            if self.auth is not None:
                stage = "authenticating"
                self._authenticate(smtp, where)
        except _Lost as exc:
            # a server that drops the connection on STARTTLS is a TLS failure too
            raise _TargetFailed(
                "4.4.2", self._lost(where, stage, exc), tls_failed=stage == STARTTLS_STAGE
            ) from None
        except smtplib.SMTPException as exc:  # a reply smtplib could not follow
            raise _TargetFailed("4.5.0", f"x-geosmtp; {where} while {stage}: {exc}") from None

    @staticmethod
    def _lost(where: str, stage: str, exc: _Lost) -> str:
        if exc.timed_out:
            return f"x-geosmtp; conversation with {where} timed out while {stage}"
        return f"x-geosmtp; lost connection with {where} while {stage}: {exc}"

    def _hello(self, smtp: _SMTP) -> None:
        """EHLO; HELO when EHLO gets a 5xx (RFC 5321 §3.2)."""
        smtp.set_timeout(self.timeouts.helo)
        code, message = smtp.ehlo(self.helo_name)
        if code == 250:
            return
        reply = parse_reply(code, message)
        if 500 <= code < 600:
            reply = smtp.command(f"HELO {self.helo_name}")
            if 200 <= reply.code < 300:
                return
        raise _TargetFailed(_soften(reply.status), f"smtp; {reply}")

    def _starttls(self, smtp: _SMTP, where: str) -> None:
        """RFC 3207: required (`starttls`) or when offered (`opportunistic`)."""
        required = self.tls == "starttls"
        if not smtp.has_extn("starttls"):
            if required:
                raise _TargetFailed(
                    "4.7.4", f"x-geosmtp; TLS is required, but was not offered by {where}"
                )
            return
        smtp.set_timeout(self.timeouts.tls)
        reply = smtp.command("STARTTLS")
        if reply.code != 220:
            if required:
                raise _TargetFailed(_soften(reply.status), f"smtp; {reply}")
            return  # RFC 3207 §4: the session goes on as it was, in plaintext
        try:
            smtp.sock = self._context().wrap_socket(smtp.sock, server_hostname=smtp._host)
        except (ssl.SSLError, OSError) as exc:
            raise _TargetFailed(
                "4.7.5", f"x-geosmtp; TLS handshake with {where} failed: {exc}", tls_failed=True
            ) from None
        # RFC 3207 §4.2: forget what was said before TLS, including anything
        # buffered behind the 220 (a plaintext injection), and start again.
        smtp.file = None
        smtp.helo_resp = smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        smtp.does_esmtp = False
        self._hello(smtp)

    def _authenticate(self, smtp: _SMTP, where: str) -> None:
        """RFC 4954 with PLAIN (RFC 4616) or LOGIN; never the credentials in a message."""
        assert self.auth is not None
        user, password = self.auth
        if not smtp.encrypted and self.tls != "none":
            raise _TargetFailed(
                "4.7.0", f"x-geosmtp; not sending credentials to {where} without TLS"
            )
        mechanisms = smtp.esmtp_features.get("auth", "").upper().split()
        smtp.set_timeout(self.timeouts.auth)

        def b64(text: str) -> str:
            return base64.b64encode(text.encode("utf-8")).decode("ascii")

        if "PLAIN" in mechanisms:
            reply = smtp.command("AUTH PLAIN " + b64(f"\0{user}\0{password}"))
            if reply.code == 334:  # the server ignored the initial response
                reply = smtp.command(b64(f"\0{user}\0{password}"))
        elif "LOGIN" in mechanisms:
            reply = smtp.command("AUTH LOGIN")
            if reply.code == 334:
                reply = smtp.command(b64(user))
            if reply.code == 334:
                reply = smtp.command(b64(password))
        elif not smtp.has_extn("auth"):
            raise _TargetFailed(
                "4.7.0", f"x-geosmtp; {where} offers no AUTH, and credentials are configured"
            )
        else:
            raise _TargetFailed(
                "4.7.0",
                f"x-geosmtp; no AUTH mechanism in common with {where}"
                f" (it offers {' '.join(mechanisms) or 'none'}; we do PLAIN, LOGIN)",
            )
        if reply.code == 334:  # a third challenge: give up the exchange
            smtp.command("*")  # RFC 4954 §4: cancel
            raise _TargetFailed("4.7.0", f"x-geosmtp; {where}: AUTH did not end")
        if reply.code != 235:
            raise _TargetFailed(_soften(reply.status), f"smtp; {reply}")

    # ---------------------------------------------------------- transaction

    def _transaction(self, smtp: _SMTP, where: str, remote: dict) -> AttemptResult:
        """MAIL, RCPT for each, DATA: from here the server's replies decide."""
        features = smtp.esmtp_features if smtp.does_esmtp else {}
        refusal = self._refusal(features, where)
        if refusal is not None:
            self._quit(smtp)
            return self._everyone(*refusal, **remote)

        params = []
        if "size" in features:
            params.append(f"SIZE={self.size}")
        if self.needs_8bitmime and "8bitmime" in features:
            params.append("BODY=8BITMIME")
        if self.needs_smtputf8:
            params.append("SMTPUTF8")
            smtp.command_encoding = "utf-8"
        pending = [i for i in range(len(self.recipients)) if i not in self.results]
        accepted: list[int] = []
        stage = "sending MAIL FROM"
        try:
            smtp.set_timeout(self.timeouts.mail)
            reply = smtp.command(" ".join([f"MAIL FROM:<{self.sender}>", *params]))
            if not 200 <= reply.code < 300:
                self._quit(smtp)
                return self._apply(pending, reply, remote)

            stage = "sending RCPT TO"
            smtp.set_timeout(self.timeouts.rcpt)
            for n, i in enumerate(pending):
                reply = smtp.command(f"RCPT TO:<{self.recipients[i]}>")
                if 200 <= reply.code < 300:
                    accepted.append(i)
                elif reply.code == 552:  # RFC 5321 §4.5.3.1.10: "too many recipients"
                    self.results[i] = _from_reply(self.recipients[i], reply, Outcome.TEMPORARY)
                else:
                    self.results[i] = _from_reply(self.recipients[i], reply)
                if reply.code == 421:  # closing: the rest wait for the next attempt
                    return self._apply(accepted + pending[n + 1 :], reply, remote)
            if not accepted:
                self._quit(smtp)
                return self._result(**remote)

            stage = "sending DATA"
            smtp.set_timeout(self.timeouts.data_init)
            reply = smtp.command("DATA")
            if reply.code != 354:
                self._quit(smtp)
                # a 4xx or 5xx decides; anything else but 354 breaks the protocol
                odd = Outcome.TEMPORARY if 200 <= reply.code < 400 else None
                return self._apply(accepted, reply, remote, odd)

            stage = "sending the message"
            smtp.set_timeout(self.timeouts.data_block)
            self.message.seek(self.start)
            write_data(self.message, smtp.send)

            stage = "waiting for the reply to the end of data"
            smtp.set_timeout(self.timeouts.data_end)
            reply = parse_reply(*smtp.getreply())
        except _Lost as exc:
            # Refused recipients keep their reply; accepted and unsent ones wait.
            diagnostic = self._lost(where, stage, exc)
            return self._everyone(Outcome.TEMPORARY, "4.4.2", diagnostic, **remote)
        self._quit(smtp)
        return self._apply(accepted, reply, remote)

    def _refusal(self, features: dict[str, str], where: str) -> tuple[Outcome, str, str] | None:
        """What this server cannot take, decided before MAIL FROM."""
        if self.needs_smtputf8 and "smtputf8" not in features:
            return (
                Outcome.PERMANENT,
                "5.6.7",  # RFC 6533 §3 / RFC 6531 §3.2
                f"x-geosmtp; the message needs SMTPUTF8 (RFC 6531), which {where} does not offer",
            )
        limit = features.get("size", "").strip()
        if limit.isdigit() and int(limit) > 0 and self.size is not None and self.size > int(limit):
            return (
                Outcome.PERMANENT,
                "5.3.4",  # RFC 3463 X.3.4 message too big for system; RFC 1870 §6
                f"x-geosmtp; the message ({self.size} octets) is larger than {where}"
                f" accepts (SIZE {int(limit)})",
            )
        if "8bitmime" not in features:
            eight_bit = has_8bit(self.message)
            self.message.seek(self.start)
            if eight_bit:
                return (
                    Outcome.PERMANENT,
                    "5.6.3",  # RFC 3463 X.6.3 conversion required but not supported
                    f"x-geosmtp; the message has 8-bit data and {where}"
                    " does not offer 8BITMIME (RFC 6152)",
                )
        return None

    def _apply(
        self, indexes: list[int], reply: RemoteReply, remote: dict, outcome: Outcome | None = None
    ) -> AttemptResult:
        """One reply decides for these recipients (MAIL, DATA, end of data)."""
        for i in indexes:
            self.results[i] = _from_reply(self.recipients[i], reply, outcome)
        return self._result(**remote)

    def _quit(self, smtp: _SMTP) -> None:
        """QUIT politely; whatever happens now does not change the outcome."""
        try:
            smtp.set_timeout(self.timeouts.quit)
            smtp.command("QUIT")
        except (_Lost, smtplib.SMTPException, OSError):
            pass
