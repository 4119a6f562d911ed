"""The relay's SMTP client as a sans-I/O core (RFC 5321): bytes in, events out.

`ClientConnection` drives one connection to one server, as the server's own
core (`geosmtp.smtp.session`) drives one client: the shell writes what
`data_to_send()` returns, feeds what it reads to `receive_data()` (`b""` when
the server closed), and asks `next_event()` what happened, until it says
`NEED_DATA`. No sockets, no clock, no files: the shell (`relay.client`) does
those, the timeouts too (`waiting_for` names the step it waits on).

The conversation: the greeting, EHLO (HELO after a 5xx to EHLO, RFC 5321
§3.2), STARTTLS (RFC 3207; `StartTLS` asks the shell to wrap the socket, and
everything said or buffered before is forgotten, §4.2, then EHLO again),
AUTH PLAIN with an initial response or LOGIN (RFC 4954), then `Ready`. The
shell decides whether this server can take the message and calls
`send_envelope()`: MAIL FROM, each RCPT TO and DATA, in one write when the
server offers PIPELINING (RFC 2920), one at a time otherwise; `SendMessage`
when the server said 354 to a transaction with at least one recipient (the
shell streams the content, with `DataEncoder`, then calls `message_sent()`),
and `TransactionDone` with every reply. After that the connection is `Ready`
again when it can carry another transaction (`send_envelope(reset=True)` puts
RSET before it, RFC 5321 §4.1.1.5, pipelined too), and `quit()` ends it.

Every reply is parsed once, bounded: `MAX_LINE` octets a line, `MAX_REPLY_LINES`
lines and `MAX_REPLY_BYTES` octets a reply; past them the server misbehaves and
the connection is given up (`Lost`).

LMTP (RFC 2033), with `lmtp=True`: LHLO instead of EHLO, and no HELO after
a refusal (§4.1); after the end of data one reply per recipient that RCPT
accepted, in RCPT order (§4.2), given as `TransactionDone.finals`. The rest
(PIPELINING, RSET before a reused connection's next transaction, STARTTLS and
AUTH only when asked for) is the same conversation.

`DataEncoder` turns message content into what goes between DATA and the end
of data: CRLF line ends (RFC 5321 §2.3.8), dot-stuffing (§4.5.2), and lines of
more than 998 octets folded (§4.5.3.1.6; Postfix's `smtp_line_length_limit`).
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..mail.lineends import lines_as_lf

#: One reply line, CRLF included (smtplib's bound, which the client had before).
MAX_LINE = 8192
#: A reply longer than this is a misbehaving server ("250-" forever).
MAX_REPLY_LINES = 200
MAX_REPLY_BYTES = 64 * 1024
#: Diagnostic text kept for a DSN or a log line.
MAX_TEXT = 2000
#: RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
MAX_LINE_OCTETS = 998

STARTTLS_STAGE = "performing the STARTTLS handshake"


# ------------------------------------------------------------------ replies


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


_STATUS_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """`text` without control characters (they could end a DSN header or a log
    line early), at most `limit` characters."""
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_reply(code: int, message: bytes) -> RemoteReply:
    """A reply's code and its lines' text (after the code, joined by LF) as a `RemoteReply`.

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


def parse_features(lines: Sequence[bytes]) -> dict[str, str]:
    """The EHLO reply's lines after the first: keyword (lower case) -> its parameters."""
    features: dict[str, str] = {}
    for raw in lines:
        line = raw.decode("ascii", "replace").strip()
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9-]*)[ =]?(.*)", line)
        if m:
            keyword = m.group(1).lower()
            params = m.group(2).strip()
            # "AUTH=LOGIN" (an old form) and "AUTH PLAIN" on two lines: all mechanisms
            features[keyword] = " ".join(p for p in (features.get(keyword, ""), params) if p)
    return features


def xtext(text: str) -> str:
    """RFC 3461 §4: "+" and "=", controls, space and non-ASCII as "+XX" (UTF-8)."""
    out = []
    for octet in text.encode("utf-8"):
        if 33 <= octet <= 126 and octet not in (ord("+"), ord("=")):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


# ------------------------------------------------------------------- events


class _NeedData(enum.Enum):
    """A one-member enum, so that `event is NEED_DATA` narrows the type."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: `next_event()`: nothing more until more input comes.
NEED_DATA = _NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The server said 220 to STARTTLS: wrap the socket, then `tls_started()`."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The session is open (greeting, EHLO, TLS, AUTH done): a transaction may start."""

    esmtp: bool
    features: dict[str, str]  # the EHLO keywords (lower case) -> parameters; {} after HELO


@dataclass(frozen=True, slots=True)
class OpenFailed:
    """This server will not take mail on this connection (before MAIL FROM):
    the shell tries the next address. `status` is temporary (4.x.x)."""

    status: str
    diagnostic: str
    tls_failed: bool = False


@dataclass(frozen=True, slots=True)
class SendMessage:
    """354: stream the content (`DataEncoder`), then call `message_sent()`."""


@dataclass(frozen=True, slots=True)
class TransactionDone:
    """Every reply of a transaction, in order; `None` where none came (not sent,
    or the server closed first). `reusable`: the connection may carry another.
    LMTP: `final` is None and `finals` has one item per recipient, its reply
    to the end of data (None for one RCPT refused); SMTP: `finals` is ()."""

    mail: RemoteReply
    rcpts: tuple[RemoteReply | None, ...]
    data: RemoteReply | None
    final: RemoteReply | None
    reusable: bool
    finals: tuple[RemoteReply | None, ...] = ()


@dataclass(frozen=True, slots=True)
class ResetFailed:
    """The RSET before a transaction on a reused connection got no 250: nothing
    of that transaction happened; the connection is done with."""

    reply: RemoteReply | None


@dataclass(frozen=True, slots=True)
class Lost:
    """The connection ended, or the server sent what is not a reply, while `stage`.
    In a transaction: `mail` and `rcpts`, the replies that came before; with
    LMTP, `finals`: the replies to the end of data that came, one per
    recipient as `TransactionDone.finals` (None: refused, or none came)."""

    stage: str
    detail: str
    timed_out: bool = False
    mail: RemoteReply | None = None
    rcpts: tuple[RemoteReply, ...] = ()
    finals: tuple[RemoteReply | None, ...] = ()


@dataclass(frozen=True, slots=True)
class Closed:
    """QUIT was answered (or the server closed after it)."""


Event = StartTLS | Ready | OpenFailed | SendMessage | TransactionDone | ResetFailed | Lost | Closed


class State(enum.Enum):
    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    TLS = "tls"  # the shell is wrapping the socket
    AUTH = "auth"
    READY = "ready"
    TRANSACTION = "transaction"  # MAIL, RCPTs, DATA replies awaited
    MESSAGE = "message"  # the shell streams the content
    END_OF_DATA = "end_of_data"
    QUIT = "quit"
    CLOSED = "closed"


#: The `Timeouts` field a state waits with.
_WAITS = {
    State.GREETING: "greeting",
    State.EHLO: "helo",
    State.HELO: "helo",
    State.STARTTLS: "tls",
    State.TLS: "tls",
    State.AUTH: "auth",
    State.READY: "mail",
    State.MESSAGE: "data_block",
    State.END_OF_DATA: "data_end",
    State.QUIT: "quit",
    State.CLOSED: "quit",
}


class ClientError(Exception):
    """A call the connection's state does not allow (a bug in the shell)."""


@dataclass
class _Transaction:
    rcpts: int
    mail: RemoteReply | None = None
    replies: list[RemoteReply] = field(default_factory=list)
    data: RemoteReply | None = None
    accepted: int = 0
    accepted_at: list[int] = field(default_factory=list)  # the accepted RCPTs' places
    finals: list[RemoteReply] = field(default_factory=list)  # LMTP: in `accepted_at` order
    pipelined: bool = False
    reset: bool = False  # RSET first (a reused connection), its reply not yet come


# ---------------------------------------------------------------- the core


class ClientConnection:
    """One SMTP client connection's protocol state; see the module's docstring.

    `tls`: "none", "starttls" (required), "opportunistic" (when offered) or
    "tls" (the shell wrapped the socket before the greeting: `encrypted`).
    `starttls`: whether to try STARTTLS at all (False: the plaintext retry of
    opportunistic TLS). `auth`: (user, password) for AUTH, never sent without
    TLS unless `tls` is "none". `where` names the server in diagnostics.
    `lmtp`: speak LMTP (RFC 2033) instead of SMTP.
    """

    def __init__(
        self,
        helo_name: str,
        *,
        where: str = "the server",
        tls: str = "none",
        starttls: bool = True,
        auth: tuple[str, str] | None = None,
        lmtp: bool = False,
    ) -> None:
        self.helo_name = helo_name
        self.lmtp = lmtp
        self.where = where
        self.tls = tls
        self.try_starttls = starttls and tls in ("starttls", "opportunistic")
        self.auth = auth
        self.encrypted = tls == "tls"
        self.state = State.GREETING
        self.esmtp = False
        self.features: dict[str, str] = {}
        self.stage = "receiving the initial server greeting"
        self.transactions = 0  # transactions begun on this connection
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._eof = False
        self._tx: _Transaction | None = None
        self._auth_step = ""
        self._pending_lines: list[bytes] = []
        self._pending_bytes = 0
        self._encoding = "ascii"
        self._mail_line = ""
        self._rcpt_lines: list[str] = []
        self._garbled = False  # a reply without a 2xx-5xx code came: where it ends is unknown

    # ------------------------------------------------------------ the shell's calls

    @property
    def waiting_for(self) -> str:
        """The `Timeouts` field for the reply awaited now."""
        if self.state is State.TRANSACTION and self._tx is not None:
            tx = self._tx
            if tx.reset:  # a reused connection's RSET: is the server still there?
                return "rset"
            if tx.mail is None:
                return "mail"
            if len(tx.replies) < tx.rcpts:
                return "rcpt"
            return "data_init"
        return _WAITS.get(self.state, "quit")

    @property
    def unread(self) -> int:
        """Octets received and not yet read as a reply: on an idle connection
        (READY, every command answered) anything here came unasked."""
        return len(self._buf)

    @property
    def pipelining(self) -> bool:
        return self.esmtp and "pipelining" in self.features

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the server; `b""` when it closed its side."""
        if self.state is State.CLOSED:
            return
        if not data:
            self._eof = True
        else:
            self._buf += data

    def next_event(self) -> Event | _NeedData:
        """The next thing that happened, or `NEED_DATA`; first write `data_to_send()`."""
        while not self._events:
            if self.state in (State.CLOSED, State.TLS, State.MESSAGE, State.READY):
                return NEED_DATA
            reply = self._next_reply()
            if reply is None:
                if self._eof and self.state is not State.CLOSED:
                    self._lose("connection closed by the server")
                    continue
                return NEED_DATA
            self._handle(reply)
        return self._events.pop(0)

    def tls_started(self) -> None:
        """The socket is wrapped: forget the plaintext session (RFC 3207 §4.2), EHLO again."""
        self._expect(State.TLS, "tls_started()")
        self.encrypted = True
        self._buf.clear()
        self._eof = False
        self._pending_lines, self._pending_bytes = [], 0
        self.esmtp, self.features = False, {}
        self.stage = "performing the EHLO handshake"
        self._ehlo()

    def send_envelope(
        self,
        sender: str,
        mail_params: Sequence[str],
        rcpts: Sequence[tuple[str, Sequence[str]]],
        *,
        encoding: str = "ascii",
        reset: bool = False,
    ) -> None:
        """MAIL FROM, each RCPT TO, DATA: in one write with PIPELINING, else one
        at a time. `reset`: RSET first (a connection that carried a transaction);
        if it gets no 2xx, `ResetFailed` and nothing of this one counts."""
        self._expect(State.READY, "send_envelope()")
        if not rcpts:
            raise ClientError("no recipients")
        self.transactions += 1
        self._encoding = encoding
        self._mail_line = " ".join([f"MAIL FROM:<{sender}>", *mail_params])
        self._rcpt_lines = [
            " ".join([f"RCPT TO:<{address}>", *params]) for address, params in rcpts
        ]
        tx = self._tx = _Transaction(len(rcpts), pipelined=self.pipelining, reset=reset)
        self.state = State.TRANSACTION
        if reset:
            self.stage = "sending RSET"
            self._send("RSET")
            if not tx.pipelined:
                return
        self._send_mail(tx)

    def _send_mail(self, tx: _Transaction) -> None:
        self.stage = "sending MAIL FROM"
        self._send(self._mail_line)
        if tx.pipelined:
            for line in self._rcpt_lines:
                self._send(line)
            self._send("DATA")

    def message_sent(self) -> None:
        """The shell wrote the content and the end of data: the final reply comes next."""
        self._expect(State.MESSAGE, "message_sent()")
        self.state = State.END_OF_DATA
        self.stage = "waiting for the reply to the end of data"

    def quit(self) -> None:
        """QUIT (ignored once closed); `Closed` follows its reply."""
        if self.state in (State.CLOSED, State.QUIT):
            return
        if self.state is State.MESSAGE:
            raise ClientError("quit() in the middle of the message")
        self.state = State.QUIT
        self.stage = "sending QUIT"
        self._send("QUIT")

    # ------------------------------------------------------------ replies in

    def _next_reply(self) -> tuple[int, bytes, list[bytes]] | None:
        """(code, text lines joined by LF, the raw text lines) of the next whole
        reply; None if it has not all come. A bad one loses the connection."""
        buf = self._buf
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) >= MAX_LINE:
                    self._bad("reply too long")
                return None
            if nl + 1 > MAX_LINE:
                self._bad("reply too long")
                return None
            line = bytes(buf[: nl + 1])
            del buf[: nl + 1]
            self._pending_bytes += len(line)
            if self._pending_bytes > MAX_REPLY_BYTES:
                self._bad("reply too long")
                return None
            text = line[4:].strip(b" \t\r\n")
            self._pending_lines.append(text)
            lines = self._pending_lines
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
            if code == -1 or line[3:4] != b"-":
                self._pending_lines, self._pending_bytes = [], 0
                return code, b"\n".join(lines), lines
            if len(lines) >= MAX_REPLY_LINES:
                self._bad("reply with too many lines")
                return None

    def _bad(self, detail: str) -> None:
        self._lose(detail)

    def connection_lost(self, detail: str, *, timed_out: bool = False) -> None:
        """The shell could not read or write (`detail`): the next event says what it cost."""
        if self.state is not State.CLOSED:
            self._lose(detail, timed_out)

    def _lose(self, detail: str, timed_out: bool = False) -> None:
        self._buf.clear()
        state, tx = self.state, self._tx
        self.state = State.CLOSED
        if state is State.QUIT:
            self._events.append(Closed())
        elif tx is not None and tx.reset:
            self._events.append(ResetFailed(None))
        elif tx is not None and state in (State.TRANSACTION, State.MESSAGE, State.END_OF_DATA):
            finals = self._finals(tx) if self.lmtp else ()
            lost = Lost(self.stage, detail, timed_out, tx.mail, tuple(tx.replies), finals)
            self._events.append(lost)
        else:
            self._events.append(Lost(self.stage, detail, timed_out))

    def _handle(self, raw: tuple[int, bytes, list[bytes]]) -> None:
        code, text, lines = raw
        reply = parse_reply(code, text)
        if not 200 <= code < 600:
            self._garbled = True
        state = self.state
        if state is State.GREETING:
            if code != 220:
                self._fail(soften(reply.status), f"smtp; {reply}", quit=True)
            else:
                self.stage = "performing the EHLO handshake"
                self._ehlo()
        elif state is State.EHLO:
            if code == 250:
                self.esmtp = True
                self.features = parse_features(lines[1:])
                self._after_hello()
            elif 500 <= code < 600 and not self.lmtp:  # RFC 2033 §4.1: no HELO in LMTP
                self.state = State.HELO
                self._send(f"HELO {self.helo_name}")
            else:
                self._fail(soften(reply.status), f"smtp; {reply}", quit=True)
        elif state is State.HELO:
            if 200 <= code < 300:
                self.esmtp, self.features = False, {}
                self._after_hello()
            else:
                self._fail(soften(reply.status), f"smtp; {reply}", quit=True)
        elif state is State.STARTTLS:
            if code == 220:
                self.state = State.TLS
                self._buf.clear()  # RFC 3207 §4.2: nothing sent before the handshake counts
                self._events.append(StartTLS())
            elif self.tls == "starttls":
                self._fail(soften(reply.status), f"smtp; {reply}", quit=True)
            else:  # RFC 3207 §4: the session goes on as it was, in plaintext
                self.try_starttls = False
                self._after_hello()
        elif state is State.AUTH:
            self._auth_reply(reply)
        elif state is State.TRANSACTION:
            self._transaction_reply(reply)
        elif state is State.END_OF_DATA:
            tx = self._tx
            assert tx is not None
            if not self.lmtp:
                self._done(tx, reply, reusable=reply.code != 421)
                return
            tx.finals.append(reply)  # RFC 2033 §4.2: one per accepted RCPT, in order
            if len(tx.finals) == tx.accepted:
                reusable = all(r.code != 421 for r in tx.finals)
                self._done(tx, None, reusable=reusable)
        elif state is State.QUIT:
            self.state = State.CLOSED
            self._events.append(Closed())

    def _fail(self, status: str, diagnostic: str, *, quit: bool, tls_failed: bool = False) -> None:
        self._events.append(OpenFailed(status, diagnostic, tls_failed))
        if quit:
            self.state = State.READY  # so that quit() is allowed
            self.quit()
        else:
            self.state = State.CLOSED

    # ------------------------------------------------------------ opening

    def _ehlo(self) -> None:
        self.state = State.EHLO
        self._send(f"{'LHLO' if self.lmtp else 'EHLO'} {self.helo_name}")

    def _after_hello(self) -> None:
        if self.try_starttls and not self.encrypted:
            if self.esmtp and "starttls" in self.features:
                self.state = State.STARTTLS
                self.stage = STARTTLS_STAGE
                self._send("STARTTLS")
                return
            if self.tls == "starttls":
                self._fail(
                    "4.7.4",
                    f"x-geosmtp; TLS is required, but was not offered by {self.where}",
                    quit=True,
                )
                return
        if self.auth is not None:
            self.stage = "authenticating"
            self._authenticate()
            return
        self._ready()

    def _ready(self) -> None:
        self.state = State.READY
        self.stage = "sending MAIL FROM"
        self._events.append(Ready(self.esmtp, self.features))

    def _authenticate(self) -> None:
        """RFC 4954 with PLAIN (RFC 4616) or LOGIN; never the credentials in the clear."""
        assert self.auth is not None
        if not self.encrypted and self.tls != "none":
            self._fail(
                "4.7.0",
                f"x-geosmtp; not sending credentials to {self.where} without TLS",
                quit=True,
            )
            return
        offered = "auth" in self.features
        mechanisms = self.features.get("auth", "").upper().split()
        self.state = State.AUTH
        user, password = self.auth
        if "PLAIN" in mechanisms:
            self._auth_step = "plain"
            self._send("AUTH PLAIN " + _b64(f"\0{user}\0{password}"))
        elif "LOGIN" in mechanisms:
            self._auth_step = "login"
            self._send("AUTH LOGIN")
        elif not offered:
            self._fail(
                "4.7.0",
                f"x-geosmtp; {self.where} offers no AUTH, and credentials are configured",
                quit=True,
            )
        else:
            self._fail(
                "4.7.0",
                f"x-geosmtp; no AUTH mechanism in common with {self.where}"
                f" (it offers {' '.join(mechanisms) or 'none'}; we do PLAIN, LOGIN)",
                quit=True,
            )

    def _auth_reply(self, reply: RemoteReply) -> None:
        assert self.auth is not None
        user, password = self.auth
        step = self._auth_step
        if step == "cancel":  # the reply to "*"
            self._fail("4.7.0", f"x-geosmtp; {self.where}: AUTH did not end", quit=True)
            return
        if reply.code == 334:
            following = {"plain": "plain-again", "login": "login-user", "login-user": "login-pass"}
            answer = {
                "plain": f"\0{user}\0{password}",  # the server ignored the initial response
                "login": user,
                "login-user": password,
            }
            if step in following:
                self._auth_step = following[step]
                self._send(_b64(answer[step]))
            else:  # a challenge too many: give up the exchange (RFC 4954 §4: "*")
                self._auth_step = "cancel"
                self._send("*")
            return
        if reply.code != 235:
            self._fail(soften(reply.status), f"smtp; {reply}", quit=True)
            return
        self._ready()

    # ------------------------------------------------------------ the transaction

    def _transaction_reply(self, reply: RemoteReply) -> None:
        tx = self._tx
        assert tx is not None
        if tx.reset:
            tx.reset = False
            if not 200 <= reply.code < 300:
                self.state = State.CLOSED
                self._events.append(ResetFailed(reply))
            elif not tx.pipelined:
                self._send_mail(tx)
            return
        if tx.mail is None:
            tx.mail = reply
            self.stage = "sending RCPT TO"
            if not 200 <= reply.code < 300 or reply.code == 421:
                if not tx.pipelined or reply.code == 421:
                    self._done(tx, None, reusable=reply.code != 421 and not tx.pipelined)
                    return
            elif not tx.pipelined:
                self._send(self._rcpt_lines[0])
            return
        if len(tx.replies) < tx.rcpts:
            tx.replies.append(reply)
            if 200 <= reply.code < 300 and 200 <= tx.mail.code < 300:
                tx.accepted += 1
                tx.accepted_at.append(len(tx.replies) - 1)
            if reply.code == 421:  # closing: the rest wait for the next attempt
                self._done(tx, None, reusable=False)
                return
            if len(tx.replies) < tx.rcpts:
                if not tx.pipelined:
                    self._send(self._rcpt_lines[len(tx.replies)])
                return
            self.stage = "sending DATA"
            if not tx.pipelined:
                if not tx.accepted:
                    self._done(tx, None, reusable=True)
                else:
                    self._send("DATA")
            return
        tx.data = reply
        if reply.code == 354 and tx.accepted:
            self.state = State.MESSAGE
            self.stage = "sending the message"
            self._events.append(SendMessage())
        elif reply.code == 354:
            # RFC 2920 §3.1: every recipient was refused (or MAIL was), yet the
            # server waits for data. Nothing of the message is sent: the
            # connection is given up (a lone "." could deliver an empty message).
            self._done(tx, None, reusable=False)
        else:
            self._done(tx, None, reusable=reply.code != 421)

    def _done(self, tx: _Transaction, final: RemoteReply | None, *, reusable: bool) -> None:
        assert tx.mail is not None
        replies: list[RemoteReply | None] = list(tx.replies)
        replies += [None] * (tx.rcpts - len(replies))
        self._tx = None
        # After a line that was no reply, the replies may no longer match the
        # commands: never another transaction on this connection.
        reusable = reusable and not self._garbled
        self.state = State.READY if reusable else State.CLOSED
        self.stage = "sending MAIL FROM"
        finals = self._finals(tx) if self.lmtp else ()
        done = TransactionDone(tx.mail, tuple(replies), tx.data, final, reusable, finals)
        self._events.append(done)

    @staticmethod
    def _finals(tx: _Transaction) -> tuple[RemoteReply | None, ...]:
        """The replies to the end of data, one per recipient (None: refused, or
        none came), from those that came in the accepted recipients' order."""
        finals: list[RemoteReply | None] = [None] * tx.rcpts
        for place, reply in zip(tx.accepted_at, tx.finals, strict=False):
            finals[place] = reply
        return tuple(finals)

    # ------------------------------------------------------------ output

    def _send(self, line: str) -> None:
        self._out.append(line.encode(self._encoding, "replace") + b"\r\n")

    def _expect(self, state: State, call: str) -> None:
        if self.state is not state:
            raise ClientError(f"{call} in state {self.state.name}")


def soften(status: str) -> str:
    """The same detail as a temporary status: 5.7.8 -> 4.7.8."""
    return "4" + status[1:] if status[:1] == "5" else status


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# ----------------------------------------------------------------- the content


_LONG_CACHE: dict[int, re.Pattern[bytes]] = {}


class DataEncoder:
    """Message content, fed in blocks, as it goes between DATA and the end of data.

    CR, LF and CRLF line ends become CRLF (RFC 5321 §2.3.8; `lines_as_lf`: a
    CR right before a CRLF is dropped), a line starting with "." gets another
    (§4.5.2, unless `stuff` is False: the size of the content, RFC 1870),
    a last line without an end gets a CRLF (`end()`). A line longer than
    `limit` octets (998, §4.5.3.1.6) is folded as Postfix's
    `smtp_line_length_limit` does: in the header section at the last space or
    tab within the limit (RFC 5322 §2.2.3: unfolding gives the line back), or
    else by inserting CRLF and a space; in the body by inserting CRLF. The
    limit counts the octets of the content, not a stuffed dot. One block in
    memory at a time, however lines fall across blocks.
    """

    def __init__(self, *, stuff: bool = True, limit: int = MAX_LINE_OCTETS) -> None:
        self.stuff = stuff
        self.limit = limit
        self.in_header = True
        self.column = 0  # content octets on the current output line
        self._held = b""  # CRs the last block ended with: what follows decides
        self._line = b""  # the header line not yet ended (at most `limit` octets)
        self._long = _LONG_CACHE.get(limit) or _LONG_CACHE.setdefault(
            limit, re.compile(rb"[^\n]{%d}" % (limit + 1))
        )

    def feed(self, block: bytes) -> bytes:
        chunk = self._held + block
        kept = chunk.rstrip(b"\r")
        self._held = chunk[len(kept) :]
        return self._encode(lines_as_lf(kept)) if kept else b""

    def end(self) -> bytes:
        """What is left (held CRs, a header line), and the CRLF a last line without one needs."""
        out = self._encode(lines_as_lf(self._held)) if self._held else b""
        self._held = b""
        if self._line:
            rest: list[bytes] = [out]
            self._put(rest, self._fold_header(rest, self._line))
            self._line = b""
            out = b"".join(rest)
        return out if self.column == 0 else out + b"\r\n"

    def _encode(self, text: bytes) -> bytes:
        if self.in_header:
            end = self._header_end(text)
            if end < 0 or self._line:
                return self._slow(text)
            head = self._fast(text[:end])  # every header line whole: short ones go fast
            if head is None:
                return self._slow(text)
            self.in_header = False
            return head + self._encode(text[end:]) if end < len(text) else head
        body = self._fast(text)
        return self._slow(text) if body is None else body

    def _header_end(self, text: bytes) -> int:
        """Where the body starts in `text` (after the blank line), or -1."""
        if self.column == 0 and not self._line and text.startswith(b"\n"):
            return 1
        blank = text.find(b"\n\n")
        return blank + 2 if blank >= 0 else -1

    def _fast(self, text: bytes) -> bytes | None:
        """`text` with no line to fold, as a whole; None if one needs folding."""
        nl = text.find(b"\n")
        first = len(text) if nl < 0 else nl
        if self.column + first > self.limit or self._long.search(text):
            return None
        last = text.rfind(b"\n")
        column = self.column + len(text) if last < 0 else len(text) - last - 1
        if self.stuff:
            if self.column == 0 and text.startswith(b"."):
                text = b"." + text
            text = text.replace(b"\n.", b"\n..")
        self.column = column
        return text.replace(b"\n", b"\r\n")

    def _slow(self, text: bytes) -> bytes:
        """Line by line: the header section's end, and folding."""
        out: list[bytes] = []
        pieces = text.split(b"\n")
        for n, piece in enumerate(pieces):
            ends = n < len(pieces) - 1
            if self.in_header:
                line, self._line = self._line + piece, b""
                if ends and not line and self.column == 0:
                    self.in_header = False  # the blank line: the body follows
                    out.append(b"\r\n")
                    continue
                line = self._fold_header(out, line)
                if not ends:
                    self._line = line  # held: where to fold is seen when it ends or overflows
                    continue
                self._put(out, line)
            else:
                while self.column + len(piece) > self.limit:
                    room = self.limit - self.column
                    self._put(out, piece[:room])
                    out.append(b"\r\n")
                    self.column = 0
                    piece = piece[room:]
                if piece:
                    self._put(out, piece)
            if ends:
                out.append(b"\r\n")
                self.column = 0
        return b"".join(out)

    def _fold_header(self, out: list[bytes], line: bytes) -> bytes:
        """Emit the folded lines of a header line longer than the limit; the rest."""
        while self.column + len(line) > self.limit:
            room = self.limit - self.column
            cut = max(line.rfind(b" ", 1, room + 1), line.rfind(b"\t", 1, room + 1))
            if cut > 0:
                self._put(out, line[:cut])
                out.append(b"\r\n")
                self.column = 0
                line = line[cut:]  # starts with the space or tab: a continuation
            else:
                self._put(out, line[:room])
                out.append(b"\r\n ")
                self.column = 1
                line = line[room:]
        return line

    def _put(self, out: list[bytes], piece: bytes) -> None:
        if self.stuff and self.column == 0 and piece.startswith(b"."):
            out.append(b".")
        out.append(piece)
        self.column += len(piece)
