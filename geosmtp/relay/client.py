"""Outbound delivery over SMTP (RFC 5321): the gevent shell of `protocol`'s client core.

`deliver()` makes one attempt: it takes the hosts to try (MX hosts from
`mx.Resolver.resolve_mx`, or one smarthost), the envelope and the message
file, and returns an `AttemptResult`: per recipient delivered / temporary
failure / permanent failure, with the remote's reply as RFC 3464 wants it for
a DSN. It never raises for anything the network or the remote does; only for
bad arguments and for a message file it cannot read (`OSError`, a local fault).
`Relay.deliver()` is the same with connection reuse (`cache.ConnectionCache`):
after a transaction that ended well the connection is kept, and the next
message to the same address, port, TLS mode, HELO name, AUTH identity and
source address (and with TLS, the same context, and the same name when the
context checks names) goes on it after a RSET.

The conversation is `protocol.ClientConnection`'s (bytes in, events out); this
module does the sockets (`socket.create_connection`, cooperative under
gevent's monkey-patching), TLS (`ssl`), the timeouts of each step, and the
message file, streamed in blocks. The caller may also wrap an attempt in
`gevent.Timeout` for an overall limit.

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
  that server: its replies decide. A cached connection is looked for under
  the first address only; one that turns out dead (its RSET not answered
  with 250) is closed and the delivery goes on on a new connection, without
  counting as a failure of the address.
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
- **PIPELINING** (RFC 2920): when offered, MAIL, every RCPT and DATA (and the
  RSET of a reused connection before them) go in one write, and the replies
  are read in order; if every recipient was refused, the message is never
  sent (§3.1). Without it, one command at a time.
- **SIZE** (RFC 1870): `SIZE=` is sent when offered: the size of the content
  as it is sent (CRLF line ends, long lines folded; not the dot-stuffing nor
  the end of data, §3), measured from the file. A message larger than the
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
- **DSN** (RFC 3461 §6.2.1): to a server that offers DSN, `RET` and `ENVID`
  go with MAIL, `NOTIFY` and `ORCPT` with each RCPT (an ORCPT of
  `rfc822;` and the recipient when the client gave none, §4.2);
  `AttemptResult.dsn` says whether the server that took the mail offered it.
- **The message** is streamed (`protocol.DataEncoder`): CR, LF and CRLF line
  ends all become CRLF (RFC 5321 §2.3.8: a bare CR or LF is never sent, so no
  `<CR>.<CR><LF>` or `<LF>.<LF>` reaches a server that might take it for the
  end of data), lines starting with "." are dot-stuffed (§4.5.2), a line of
  more than 998 octets is folded (§4.5.3.1.6, as Postfix's
  `smtp_line_length_limit`), a final CRLF is added if missing, then `.<CRLF>`;
  memory stays at one block whatever the message's size.
- **Loop detection** (RFC 5321 §6.3): more than `max_received` `Received:`
  fields in the header section is a permanent failure (5.4.6) without
  connecting anywhere.
- **LMTP** (RFC 2033, `lmtp=True`: the queue's local delivery to Dovecot or
  another LMTP server): LHLO, no HELO fallback, and after the end of data one
  reply per accepted recipient, each deciding for its own recipient (a 250
  for one and a 452 for the next); a connection lost among those replies
  keeps the outcomes of the replies that came (those recipients are never
  sent again). A `Host` whose name starts with "/" is a UNIX socket's path.
  No DSN parameters go to an LMTP server: it is the final delivery, and its
  success is geosmtp's to report (RFC 3461 §6.2.2.1).
- **Replies**: 4xx is temporary, 5xx permanent, per recipient at RCPT and for
  all accepted recipients at the end of data; a 552 to RCPT is temporary (RFC
  5321 §4.5.3.1.10: it meant "too many recipients" in RFC 821). Reply text is
  kept as sent, less control characters, for the DSN and the log. A connection
  that failed in any way (lost, timed out, 421, a reply that is not one, TLS)
  is never kept for another message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, TypedDict, Unpack

from ..mail.xtext import is_xtext
from . import protocol
from .cache import ConnectionCache
from .mx import Host
from .protocol import (
    MAX_REPLY_BYTES,
    MAX_REPLY_LINES,
    MAX_TEXT,
    NEED_DATA,
    STARTTLS_STAGE,
    ClientConnection,
    DataEncoder,
    RemoteReply,
    parse_reply,
    printable,
    soften,
)

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_REPLY_LINES",
    "MAX_TEXT",
    "AttemptResult",
    "Outcome",
    "RecipientResult",
    "Relay",
    "RemoteReply",
    "Timeouts",
    "Tried",
    "count_received",
    "deliver",
    "has_8bit",
    "message_size",
    "parse_reply",
    "printable",
    "write_data",
]

TLSMode = Literal["none", "starttls", "tls", "opportunistic"]
TLS_MODES: tuple[str, ...] = ("none", "starttls", "tls", "opportunistic")

#: RFC 5321 §6.3 suggests 100 hops as a loop; Postfix and issue 10 use 50.
DEFAULT_MAX_RECEIVED = 50
#: Bytes read from the message file at a time (and so, about, sent at a time).
BLOCK_SIZE = 64 * 1024
#: Bytes read from a socket at a time.
READ_SIZE = 64 * 1024


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
    # The RSET before a reused connection's next transaction: a cached peer that
    # vanished without closing costs this, not MAIL's 5 minutes, before a fresh
    # connection is opened (Postfix's smtp_rset_timeout, 20 s).
    rset: float = 20.0
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
    #: The server that decided offered DSN (RFC 3461): the NOTIFY, ORCPT, ENVID
    #: and RET parameters went on with the message, and it reports from now on.
    dsn: bool = False

    @property
    def remote_mta(self) -> str | None:
        """The RFC 3464 §2.3.5 `Remote-MTA` value: "dns; mx.example.org" (None
        for a UNIX socket: no host name to give)."""
        if not self.remote_host or _is_path(self.remote_address or ""):
            return None
        return f"dns; {self.remote_host}"

    @property
    def relay(self) -> str:
        """Who it was, for a log line: "mx.example.org[192.0.2.1]:25", a UNIX
        socket's path, or "none"."""
        if self.remote_host is None:
            return "none"
        address = self.remote_address or ""
        if _is_path(address):
            return address
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

    `DataEncoder` does the line ends, the dot-stuffing and the folding of long
    lines; then the end-of-data `.<CRLF>` (§4.1.1.4). One block of the file in
    memory at a time, however lines fall across blocks.
    """
    sent = 0
    encoder = DataEncoder()
    while chunk := message.read(block_size):
        out = encoder.feed(chunk)
        if out:
            send(out)
            sent += len(out)
    tail = encoder.end() + b".\r\n"
    send(tail)
    return sent + len(tail)


def message_size(message: BinaryIO, block_size: int = BLOCK_SIZE) -> int:
    """The RFC 1870 size of `message` from its current position, as `write_data`
    sends it, less the dot-stuffing and the end of data (RFC 1870 §3: "not the
    SMTP DATA command's terminating dot or doubled quoting dots"). The file is
    read to its end and left where it was."""
    start = message.tell()
    encoder = DataEncoder(stuff=False)
    size = 0
    while chunk := message.read(block_size):
        size += len(encoder.feed(chunk))
    size += len(encoder.end())
    message.seek(start)
    return size


@contextlib.contextmanager
def _opened(message: BinaryIO | str | os.PathLike[str]) -> Iterator[BinaryIO]:
    if isinstance(message, str | os.PathLike):
        with open(message, "rb") as f:
            yield f
    else:
        yield message


# ------------------------------------------------------------------ replies


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
        status = "4.5.0" if not 500 <= reply.code < 600 else soften(status)
    return RecipientResult(recipient, outcome, status, f"smtp; {reply}", reply)


# -------------------------------------------------------------- a connection


class _Lost(Exception):
    """The connection ended or timed out in the middle of the conversation."""

    def __init__(self, lost: protocol.Lost) -> None:
        super().__init__(lost.detail)
        self.lost = lost


class _Stale(Exception):
    """A reused connection did not answer its RSET: nothing was done on it."""


class Connection:
    """One connection to one server: the socket, the core, and who it is with."""

    def __init__(
        self,
        sock: socket.socket,
        core: ClientConnection,
        timeouts: Timeouts,
        *,
        host: str,
        address: str,
        port: int,
        key: tuple[object, ...],
    ) -> None:
        self.sock = sock
        self.core = core
        self.timeouts = timeouts
        self.host = host
        self.address = address
        self.port = port
        self.key = key
        self.closed = False

    @property
    def transactions(self) -> int:
        return self.core.transactions

    def next_event(self) -> protocol.Event:
        """Write what the core has to say, read until it has an event. Raises
        `_Lost` when the connection is gone, `_Stale` when a reused one was."""
        core = self.core
        while True:
            event = core.next_event()
            out = core.data_to_send()  # what the replies just read called for, first
            if out:
                self._io(self.sock.sendall, out)
                if event is NEED_DATA:
                    continue  # (a failed write is an event now)
            if event is NEED_DATA:
                self.sock.settimeout(getattr(self.timeouts, core.waiting_for))
                data = self._io(self.sock.recv, READ_SIZE)
                core.receive_data(data if data is not None else b"")
                continue
            if isinstance(event, protocol.Lost):
                raise _Lost(event)
            if isinstance(event, protocol.ResetFailed):
                raise _Stale()
            return event

    def _io(self, call: Callable[[Any], bytes | None], arg: object) -> bytes | None:
        try:
            return call(arg)
        except TimeoutError:
            self.core.connection_lost("timed out", timed_out=True)
        except OSError as exc:
            self.core.connection_lost(exc.strerror or str(exc) or type(exc).__name__)
        return None

    def send_message(self, message: BinaryIO) -> None:
        """Stream the content and the end of data (the core said `SendMessage`)."""
        self.sock.settimeout(self.timeouts.data_block)
        pending = bytearray()

        def send(data: bytes) -> None:
            pending.extend(data)
            if len(pending) >= BLOCK_SIZE:
                self._sendall(bytes(pending))
                pending.clear()

        write_data(message, send)
        if pending:
            self._sendall(bytes(pending))
        self.core.message_sent()

    def _sendall(self, data: bytes) -> None:
        self._io(self.sock.sendall, data)
        if self.core.state is protocol.State.CLOSED:
            event = self.core.next_event()
            assert isinstance(event, protocol.Lost)
            raise _Lost(event)

    def start_tls(self, context: ssl.SSLContext, server_name: str) -> None:
        self.sock.settimeout(self.timeouts.tls)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_name)
        self.core.tls_started()

    def tls_description(self) -> str | None:
        if not isinstance(self.sock, ssl.SSLSocket):
            return None
        cipher = self.sock.cipher()
        return f"{self.sock.version()} {cipher[0]}" if cipher else self.sock.version()

    def quit(self) -> None:
        """QUIT politely and close; whatever happens now changes no outcome."""
        if self.closed:
            return
        try:
            self.core.quit()
            self.next_event()  # the reply, within Timeouts.quit
        except (_Lost, _Stale, protocol.ClientError, OSError):
            pass
        self.close()

    def quiet(self) -> bool:
        """Whether an idle connection is still open with nothing said since its
        last reply. A server that closed it, or spoke unasked (a 421 as it timed
        the session out), would only answer the RSET with that: not worth the
        round trip. What the core holds is looked at for every connection, the
        socket only for plaintext (TLS records such as session tickets may wait
        there); the RSET tells the rest."""
        if self.core.unread:
            return False  # came with the last reply, after it
        if isinstance(self.sock, ssl.SSLSocket):
            return True
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0.0)  # gevent waits for data otherwise
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: open and quiet
        except OSError:
            return False
        finally:
            self.sock.settimeout(timeout)
        return False  # b"" (closed by the server) or bytes nobody asked for

    def close(self) -> None:
        """Close now (a cached connection says QUIT first, without waiting for the reply)."""
        if self.closed:
            return
        self.closed = True
        if self.core.state is protocol.State.READY:
            self.core.quit()
            with contextlib.suppress(OSError):
                self.sock.settimeout(1.0)
                self.sock.sendall(self.core.data_to_send())
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------- the attempt


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


def _is_path(address: str) -> bool:
    """A UNIX socket's path (LMTP) rather than a host's address."""
    return address.startswith("/")


def _bad_address(address: str) -> bool:
    return any(c in "<>" or ord(c) < 0x20 or ord(c) == 0x7F for c in address)


_NOTIFY_WORDS = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


def _notify_param(notify: Sequence[str] | None) -> list[str]:
    words = [w.upper() for w in notify or () if w.upper() in _NOTIFY_WORDS]
    return [f"NOTIFY={','.join(words)}"] if words else []


def _orcpt_param(orcpt: str | None, recipient: str) -> list[str]:
    """ORCPT as the client gave it (addr-type;xtext), or the recipient (RFC 3461 §4.2)."""
    if orcpt is not None:
        addr_type, sep, value = orcpt.partition(";")
        if sep and re.fullmatch(r"[A-Za-z0-9-]+", addr_type) and is_xtext(value):
            return [f"ORCPT={orcpt}"]
    if recipient.isascii():
        return [f"ORCPT=rfc822;{protocol.xtext(recipient)}"]
    return []


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
    max_received: int = DEFAULT_MAX_RECEIVED,
    source_address: tuple[str, int] | None = None,
    envid: str | None = None,
    ret: str | None = None,
    notify: Sequence[Sequence[str] | None] | None = None,
    orcpt: Sequence[str | None] | None = None,
    cache: ConnectionCache[Connection] | None = None,
    lmtp: bool = False,
) -> AttemptResult:
    """One delivery attempt of `message` to `recipients`, in one SMTP transaction.

    `hosts` are tried in order, every address of each (a `Host` without
    addresses is connected to by name, as a smarthost may be); `port` is the
    same for all. `sender` and `recipients` are addresses as they go between
    `<` and `>` ("" is the null reverse-path of a bounce). `message` is a
    binary file read from its current position, or a path. `needs_8bitmime`:
    the message was received with BODY=8BITMIME or is known to be 8-bit;
    `needs_smtputf8`: it was received with SMTPUTF8 (also implied by a
    non-ASCII address). `envid` (xtext) and `ret` ("FULL", "HDRS"), and per
    recipient `notify` (["SUCCESS", "FAILURE"], ...) and `orcpt`
    ("rfc822;xtext"), as the message was received: the RFC 3461 parameters
    passed on to a server that offers DSN. `cache`: keep and reuse connections.
    `lmtp`: speak LMTP (RFC 2033) to the hosts; a host named by a path ("/...")
    is a UNIX socket (`port` unused). See the module's docstring for TLS, AUTH
    and the failure rules.
    """
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
    if not recipients:
        raise ValueError("no recipients")
    for name, values in (("notify", notify), ("orcpt", orcpt)):
        if values is not None and len(values) != len(recipients):
            raise ValueError(f"{name} needs one value per recipient")
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
            max_received=max_received,
            source_address=source_address,
            envid=envid if envid is not None and is_xtext(envid) else None,
            ret=ret.upper() if ret is not None and ret.upper() in ("FULL", "HDRS") else None,
            notify=list(notify) if notify is not None else [None] * len(recipients),
            orcpt=list(orcpt) if orcpt is not None else [None] * len(recipients),
            cache=cache,
            lmtp=lmtp,
        ).run()


class Relay:
    """`deliver()` with connections kept for the next message to the same
    destination: at most `reuse_limit` transactions on one connection
    (`relay.connection_reuse_limit`), idle at most `cache_time` seconds
    (`relay.connection_cache_time`). `close()` closes the idle ones."""

    def __init__(self, reuse_limit: int = 100, cache_time: float = 2.0) -> None:
        self.cache: ConnectionCache[Connection] = ConnectionCache(reuse_limit, cache_time)

    def deliver(self, *args: Any, **kwargs: Any) -> AttemptResult:
        """`deliver()`'s arguments, and the same result."""
        return deliver(*args, cache=self.cache, **kwargs)

    def close(self) -> None:
        self.cache.close()


class _Remote(TypedDict, total=False):
    """Who decided an attempt: `AttemptResult`'s fields of that name."""

    remote_host: str
    remote_address: str
    remote_port: int | None  # None: a UNIX socket
    tls: str | None
    dsn: bool


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
    max_received: int
    source_address: tuple[str, int] | None
    envid: str | None
    ret: str | None
    notify: list[Sequence[str] | None]
    orcpt: list[str | None]
    cache: ConnectionCache[Connection] | None
    lmtp: bool = False
    size: int = 0
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
        self.size = message_size(self.message)

        targets = list(self._targets())
        if targets and self.cache is not None:
            host, address = targets[0]
            while (conn := self.cache.take(self._key(host, address))) is not None:
                if not conn.quiet():
                    conn.close()  # closed, or said something unasked: not worth an RSET
                    continue
                try:
                    return self._deliver_on(conn, host, reused=True)
                except _Stale:
                    conn.close()  # dead or unwilling: a new connection, no failure counted
        last: _TargetFailed | None = None
        for host, address in targets:
            use_tls = self.tls != "none"
            for _ in range(2):  # the second round: opportunistic TLS failed, plaintext
                try:
                    conn = self._open(host, address, use_tls)
                    return self._deliver_on(conn, host, reused=False)
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

    def _key(self, host: Host, address: str) -> tuple[object, ...]:
        """What a connection must share to carry this message (Postfix: the next hop,
        and the TLS policy). With TLS, the context whose policy checked the
        certificate, and the name it was checked against when it checks names:
        a connection verified for one MX name, or under a context a reload
        replaced, is never used for another without checking again."""
        user = self.auth[0] if self.auth is not None else None
        checked: tuple[object, ...] = ()
        if self.tls != "none":
            context = self._context()
            checked = (context, _tls_name(host.name) if context.check_hostname else None)
        return (
            address, self.port, self.tls, self.helo_name, user, self.source_address, checked,
            self.lmtp,
        )  # fmt: skip

    def _everyone(
        self, outcome: Outcome, status: str, diagnostic: str, **remote: Unpack[_Remote]
    ) -> AttemptResult:
        for i, rcpt in enumerate(self.recipients):
            self.results.setdefault(i, RecipientResult(rcpt, outcome, status, diagnostic))
        return self._result(**remote)

    def _result(self, **remote: Unpack[_Remote]) -> AttemptResult:
        return AttemptResult(
            tuple(self.results[i] for i in range(len(self.recipients))),
            tried=tuple(self.tried),
            **remote,
        )

    # ---------------------------------------------------------- one connection

    def _context(self) -> ssl.SSLContext:
        if self.tls_context is not None:
            return self.tls_context
        return _default_context(verify=self.tls != "opportunistic")

    def _where(self, host: Host, address: str) -> str:
        """The server in a diagnostic: "mx.example.org[192.0.2.1]:25", or a socket's path."""
        if _is_path(address):
            return address
        return f"{host.name}[{address}]:{self.port}"

    def _connect(self, address: str) -> socket.socket:
        if not _is_path(address):
            return socket.create_connection(
                (address, self.port), self.timeouts.connect, self.source_address
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeouts.connect)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open(self, host: Host, address: str, use_tls: bool) -> Connection:
        """Connect, greeting, EHLO, STARTTLS, AUTH: any failure raises `_TargetFailed`."""
        where = self._where(host, address)
        server_name = _tls_name(host.name)
        try:
            sock = self._connect(address)
        except TimeoutError:
            raise _TargetFailed("4.4.1", f"x-geosmtp; connect to {where}: timed out") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise _TargetFailed("4.4.1", f"x-geosmtp; connect to {where}: {reason}") from None
        try:
            if self.tls == "tls":
                sock.settimeout(self.timeouts.tls)
                sock = self._context().wrap_socket(sock, server_hostname=server_name)
        except ssl.SSLError as exc:
            sock.close()
            raise _TargetFailed(
                "4.7.5", f"x-geosmtp; TLS with {where} failed: {exc}", tls_failed=True
            ) from None
        except TimeoutError:
            sock.close()
            raise _TargetFailed("4.4.1", f"x-geosmtp; connect to {where}: timed out") from None
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise _TargetFailed("4.4.1", f"x-geosmtp; connect to {where}: {reason}") from None
        core = ClientConnection(
            self.helo_name,
            where=where,
            tls=self.tls,
            starttls=use_tls,
            auth=self.auth,
            lmtp=self.lmtp,
        )
        conn = Connection(
            sock, core, self.timeouts, host=host.name, address=address, port=self.port,
            key=self._key(host, address),
        )  # fmt: skip
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, protocol.Ready):
                    return conn
                if isinstance(event, protocol.StartTLS):
                    try:
                        conn.start_tls(self._context(), server_name)
                    except (ssl.SSLError, OSError) as exc:
                        raise _TargetFailed(
                            "4.7.5",
                            f"x-geosmtp; TLS handshake with {where} failed: {exc}",
                            tls_failed=True,
                        ) from None
                elif isinstance(event, protocol.OpenFailed):
                    conn.quit()
                    raise _TargetFailed(event.status, event.diagnostic, tls_failed=event.tls_failed)
        except _Lost as exc:
            # a server that drops the connection on STARTTLS is a TLS failure too
            raise _TargetFailed(
                "4.4.2", self._lost(where, exc.lost), tls_failed=exc.lost.stage == STARTTLS_STAGE
            ) from None
        except _Stale:  # cannot happen before a transaction; as a lost connection
            raise _TargetFailed("4.4.2", f"x-geosmtp; lost connection with {where}") from None
        finally:
            if not conn.closed and conn.core.state is not protocol.State.READY:
                conn.close()

    @staticmethod
    def _lost(where: str, lost: protocol.Lost) -> str:
        if lost.timed_out:
            return f"x-geosmtp; conversation with {where} timed out while {lost.stage}"
        return f"x-geosmtp; lost connection with {where} while {lost.stage}: {lost.detail}"

    def _release(self, conn: Connection, reusable: bool) -> None:
        """Keep a connection that may carry another message; QUIT the others."""
        if reusable and self.cache is not None and self.cache.put(conn.key, conn):
            return
        if conn.core.state is protocol.State.READY:
            conn.quit()
        else:
            conn.close()

    # ---------------------------------------------------------- transaction

    def _deliver_on(self, conn: Connection, host: Host, *, reused: bool) -> AttemptResult:
        """MAIL, RCPT for each, DATA: from here the server's replies decide."""
        where = self._where(host, conn.address)
        core = conn.core
        features = core.features if core.esmtp else {}
        dsn = "dsn" in features and not self.lmtp  # LMTP: the final delivery, ours to report
        remote: _Remote = {
            "remote_host": host.name,
            "remote_address": conn.address,
            "remote_port": None if _is_path(conn.address) else self.port,
            "tls": conn.tls_description(),
            "dsn": dsn,
        }
        refusal = self._refusal(features, where)
        if refusal is not None:
            self._release(conn, reusable=True)
            return self._everyone(*refusal, **remote)

        params = []
        if "size" in features:
            params.append(f"SIZE={self.size}")
        if self.needs_8bitmime and "8bitmime" in features:
            params.append("BODY=8BITMIME")
        if self.needs_smtputf8:
            params.append("SMTPUTF8")
        if dsn and self.ret is not None:
            params.append(f"RET={self.ret}")
        if dsn and self.envid is not None:
            params.append(f"ENVID={self.envid}")
        pending = [i for i in range(len(self.recipients)) if i not in self.results]
        rcpts = [
            (
                self.recipients[i],
                [*_notify_param(self.notify[i]), *_orcpt_param(self.orcpt[i], self.recipients[i])]
                if dsn
                else [],
            )
            for i in pending
        ]
        encoding = "utf-8" if self.needs_smtputf8 else "ascii"
        try:
            core.send_envelope(self.sender, params, rcpts, encoding=encoding, reset=reused)
            while True:
                event = conn.next_event()
                if isinstance(event, protocol.SendMessage):
                    self.message.seek(self.start)
                    conn.send_message(self.message)
                elif isinstance(event, protocol.TransactionDone):
                    break
        except _Stale:
            raise
        except _Lost as exc:
            conn.close()
            lost = exc.lost
            # Refused recipients keep their reply; accepted and unsent ones wait.
            if lost.mail is not None and not 200 <= lost.mail.code < 300:
                return self._apply(pending, lost.mail, remote)
            for i, reply in zip(pending, lost.rcpts, strict=False):
                if not 200 <= reply.code < 300:
                    self.results[i] = self._refused(i, reply)
            # LMTP: the replies to the end of data that came decide for theirs
            for i, final in zip(pending, lost.finals, strict=False):
                if final is not None:
                    self.results[i] = _from_reply(self.recipients[i], final)
            diagnostic = self._lost(where, lost)
            return self._everyone(Outcome.TEMPORARY, "4.4.2", diagnostic, **remote)
        except BaseException:
            conn.close()  # a local fault mid-transaction (the file, a kill): closed now
            raise
        self._release(conn, event.reusable)
        return self._decide(pending, event, remote)

    def _refused(self, i: int, reply: RemoteReply) -> RecipientResult:
        if reply.code == 552:  # RFC 5321 §4.5.3.1.10: "too many recipients"
            return _from_reply(self.recipients[i], reply, Outcome.TEMPORARY)
        return _from_reply(self.recipients[i], reply)

    def _decide(
        self, pending: list[int], done: protocol.TransactionDone, remote: _Remote
    ) -> AttemptResult:
        """What the replies of a transaction mean for each recipient."""
        if not 200 <= done.mail.code < 300:
            return self._apply(pending, done.mail, remote)
        accepted: list[int] = []
        unanswered: list[int] = []
        closing: RemoteReply | None = None
        for i, reply in zip(pending, done.rcpts, strict=True):
            if reply is None:
                unanswered.append(i)
            elif 200 <= reply.code < 300:
                accepted.append(i)
            else:
                self.results[i] = self._refused(i, reply)
                if reply.code == 421:
                    closing = reply
        if closing is not None:  # the server is closing: the rest wait for the next attempt
            return self._apply(accepted + unanswered, closing, remote)
        if not accepted:
            return self._result(**remote)
        if done.data is None or done.data.code != 354:
            reply = done.data or RemoteReply(-1, None, "no reply to DATA")
            # a 4xx or 5xx decides; anything else but 354 breaks the protocol
            odd = Outcome.TEMPORARY if not 400 <= reply.code < 600 else None
            return self._apply(accepted, reply, remote, odd)
        if done.finals:  # LMTP (RFC 2033 §4.2): each accepted recipient's own reply
            for place, i in enumerate(pending):
                if i in accepted:
                    reply = done.finals[place] or RemoteReply(-1, None, "no reply after the data")
                    self.results[i] = _from_reply(self.recipients[i], reply)
            return self._result(**remote)
        assert done.final is not None
        return self._apply(accepted, done.final, remote)

    def _refusal(self, features: dict[str, str], where: str) -> tuple[Outcome, str, str] | None:
        """What this server cannot take, decided before MAIL FROM."""
        if self.needs_smtputf8 and "smtputf8" not in features:
            return (
                Outcome.PERMANENT,
                "5.6.7",  # RFC 6533 §3 / RFC 6531 §3.2
                f"x-geosmtp; the message needs SMTPUTF8 (RFC 6531), which {where} does not offer",
            )
        limit = features.get("size", "").strip()
        if limit.isdigit() and int(limit) > 0 and self.size > int(limit):
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
        self,
        indexes: list[int],
        reply: RemoteReply,
        remote: _Remote,
        outcome: Outcome | None = None,
    ) -> AttemptResult:
        """One reply decides for these recipients (MAIL, DATA, end of data)."""
        for i in indexes:
            self.results[i] = _from_reply(self.recipients[i], reply, outcome)
        return self._result(**remote)
