"""Scripted receiving SMTP servers for the outbound relay's tests.

A `Sink` is a small SMTP server on the standard library's `socketserver`, one
thread per connection, listening on a loopback address (127.0.0.x or ::1). Its
`Script` says what it offers and answers: EHLO keywords, STARTTLS (with a
trustme certificate), AUTH, a reply per command or per recipient, replies to
the end of data that change from one message to the next ("451, then 250"),
dropping the connection in the middle of DATA, or going silent at a given step.
Everything it was sent is recorded in `Sink.transactions` (the wire bytes and
the content with the dot-stuffing undone), so a test can assert the exact
envelope and message a client delivered.

    with Sink(Script(final_replies=["451 4.3.0 later", "250 2.0.0 ok"])) as sink:
        ...deliver to (sink.address, sink.port)...
        assert sink.transactions[-1].data == b"..."
"""

from __future__ import annotations

import base64
import contextlib
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field

#: How long a silent ("stalled") server stays silent at most, and any read waits.
STALL_LIMIT = 30.0
READ_TIMEOUT = 15.0


@dataclass
class Script:
    """What the server says. Replies are whole lines without CRLF, e.g. "550 5.1.1 no"."""

    hostname: str = "sink.test"
    greeting: str = "220 sink.test ESMTP"
    #: EHLO keywords besides STARTTLS and AUTH (which follow `tls` and `users`).
    extensions: list[str] = field(
        default_factory=lambda: ["8BITMIME", "SMTPUTF8", "SIZE 10000000", "ENHANCEDSTATUSCODES"]
    )
    ehlo_reply: str | None = None  # e.g. "502 5.5.1 no EHLO here": the client must HELO
    helo_reply: str = "250 sink.test"
    #: Offer STARTTLS with this server context (RFC 3207).
    tls: ssl.SSLContext | None = None
    starttls_reply: str = "220 2.0.0 ready to start TLS"
    #: Answer 220 to STARTTLS, then send plaintext instead of a handshake.
    broken_tls: bool = False
    #: Wrap every connection in TLS before the greeting (port 465, RFC 8314).
    implicit_tls: ssl.SSLContext | None = None
    #: Offer AUTH with these mechanisms for these logins and passwords.
    users: dict[str, str] | None = None
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    mail_reply: str = "250 2.1.0 ok"
    #: address -> reply; the others get "250 2.1.5 ok".
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "354 end data with <CR><LF>.<CR><LF>"
    #: The n-th message ended gets the n-th reply; the last one repeats.
    final_replies: list[str] = field(default_factory=lambda: ["250 2.0.0 queued"])
    #: Close the connection once this many octets of message data have come.
    drop_in_data_after: int | None = None
    #: Go silent at this step: "greeting", a verb ("EHLO", "MAIL", "RCPT",
    #: "DATA"), or "." (after the whole message, before the final reply).
    stall_at: str | None = None
    #: Seconds to wait before each final reply (deliveries stay in flight a while).
    final_delay: float = 0.0
    #: Stop reading in the middle of DATA once this many octets have come, and
    #: say nothing, until `Sink.unstall` is set; then read to the end of the
    #: connection (counted in `Sink.peer_closed`) without taking the message.
    #: The sink's receive buffer is small, so a large message fills it and the
    #: client's sending blocks.
    stall_in_data_after: int | None = None
    #: Close each connection (no reply, as an idle timeout would) once it has
    #: carried this many messages (connection reuse, issue 20).
    close_after_messages: int | None = None
    #: A line sent unasked right after each final reply, the connection kept
    #: open (a server announcing its idle timeout: "421 4.4.2 idle too long").
    unasked_after_message: str | None = None


@dataclass
class Transaction:
    """One MAIL FROM the sink accepted, and what followed."""

    helo: str
    mail: str  # what followed "MAIL FROM:", e.g. "<a@x.test> SIZE=120 BODY=8BITMIME"
    tls: bool
    auth: str | None  # the login, when the session authenticated
    rcpts: list[str] = field(default_factory=list)  # accepted, between the < >
    refused: list[str] = field(default_factory=list)
    raw: bytes = b""  # DATA content as sent on the wire, up to and with ".<CRLF>"
    data: bytes = b""  # the content, dot-stuffing undone, line ends as sent
    bad_line_ends: bool = False  # a bare CR or LF came in the data
    complete: bool = False  # the end of data came
    final_reply: str | None = None

    @property
    def sender(self) -> str:
        return self.mail[1 : self.mail.index(">")] if self.mail.startswith("<") else self.mail

    @property
    def params(self) -> list[str]:
        return self.mail[self.mail.index(">") + 1 :].split() if ">" in self.mail else []


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sink = self.server.sink
        sink._opened(self.request)
        try:
            sink._session(self.request)
        except (OSError, ValueError, UnicodeError):
            pass
        finally:
            sink._closed(self.request)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a queue that connects 20 at once the
    # moment a sink starts would overflow it, and Linux then leaves the client
    # "established" while the server holds the connection in SYN-RECV (the
    # client waits for a greeting for minutes).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sink: Sink) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sink = sink
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.sink.script.stall_in_data_after is not None:
            # Inherited by every accepted connection: a small window, no autotuning.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        super().server_bind()


class Sink:
    """A scripted SMTP server on `address`:`port` (port 0: a free one), in threads."""

    def __init__(self, script: Script | None = None, address: str = "127.0.0.1", port: int = 0):
        self.script = script or Script()
        self.transactions: list[Transaction] = []
        self.connections = 0
        self.unasked = 0  # lines sent unasked (Script.unasked_after_message)
        self.commands: list[bytes] = []
        #: Commands read while the next was already waiting (PIPELINING, RFC
        #: 2920: sent in the same write); plaintext sessions only.
        self.pipelined: list[bytes] = []
        #: `Script.stall_in_data_after`: set it to end the stall; then how many
        #: stalled connections the client closed.
        self.unstall = threading.Event()
        self.peer_closed = 0
        self._messages = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._server = _Server((address, port), self)
        self.address = address
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        with self._lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def completed(self) -> list[Transaction]:
        """The transactions whose message arrived whole and got a 2xx."""
        return [t for t in self.transactions if t.complete and (t.final_reply or "")[:1] == "2"]

    # ---------------------------------------------------------------- server

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._open.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.discard(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def _stall(self) -> None:
        self._stop.wait(STALL_LIMIT)

    def _session(self, conn: socket.socket) -> None:
        s = self.script
        conn.settimeout(READ_TIMEOUT)
        if s.implicit_tls is not None:
            conn = s.implicit_tls.wrap_socket(conn, server_side=True)
        if s.stall_at == "greeting":
            return self._stall()

        def reply(*lines: str) -> None:
            conn.sendall("".join(line + "\r\n" for line in lines).encode("utf-8"))

        if s.unasked_after_message is not None:
            # Sent right behind a reply, the unasked line would wait for that
            # reply's ACK (Nagle) and reach the client only later.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply(s.greeting)
        rfile = conn.makefile("rb")
        helo, tls, auth = "", s.implicit_tls is not None, None
        tx: Transaction | None = None
        messages = 0
        for _ in range(1000):  # commands per session, bounded
            line = rfile.readline(65536)
            if not line:
                return
            with self._lock:
                self.commands.append(line)
                if not tls and _more_waiting(conn, rfile):
                    self.pipelined.append(line)
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            verb, _, arg = command.partition(" ")
            verb = verb.upper()
            if s.stall_at == verb:
                return self._stall()
            if verb == "EHLO":
                if s.ehlo_reply:
                    reply(s.ehlo_reply)
                    continue
                helo, tx = arg, None
                keywords = list(s.extensions)
                if s.tls is not None and not tls:
                    keywords.append("STARTTLS")
                if s.users is not None:
                    keywords.append("AUTH " + " ".join(s.auth_mechanisms))
                lines = [s.hostname, *keywords]
                reply(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
            elif verb == "HELO":
                helo, tx = arg, None
                reply(s.helo_reply)
            elif verb == "STARTTLS" and s.tls is not None and not tls:
                reply(s.starttls_reply)
                if not s.starttls_reply.startswith("220"):
                    continue
                if s.broken_tls:
                    conn.sendall(b"this is not a TLS handshake\r\n")
                    return
                conn = s.tls.wrap_socket(conn, server_side=True)
                rfile = conn.makefile("rb")
                tls, helo, tx = True, "", None
            elif verb == "AUTH" and s.users is not None:
                auth = self._auth(arg, rfile, reply) or auth
            elif verb == "MAIL":
                reply(s.mail_reply)
                if s.mail_reply.startswith("2"):
                    tx = Transaction(helo=helo, mail=arg[len("FROM:") :], tls=tls, auth=auth)
                    with self._lock:
                        self.transactions.append(tx)
            elif verb == "RCPT":
                if tx is None:
                    reply("503 5.5.1 MAIL first")
                    continue
                address = arg[arg.index("<") + 1 : arg.rindex(">")]
                answer = s.rcpt_replies.get(address, "250 2.1.5 ok")
                (tx.rcpts if answer.startswith("2") else tx.refused).append(address)
                reply(answer)
            elif verb == "DATA":
                if tx is None or not tx.rcpts:
                    reply("503 5.5.1 no valid recipients")
                    continue
                reply(s.data_reply)
                if not s.data_reply.startswith("354"):
                    continue
                if not self._data(tx, rfile, conn):
                    return
                if s.stall_at == ".":
                    return self._stall()
                if s.final_delay:
                    time.sleep(s.final_delay)
                with self._lock:
                    answer = s.final_replies[min(self._messages, len(s.final_replies) - 1)]
                    self._messages += 1
                tx.final_reply = answer
                reply(answer)
                tx = None
                messages += 1
                if s.unasked_after_message is not None:
                    reply(s.unasked_after_message)
                    self.unasked += 1
                if s.close_after_messages is not None and messages >= s.close_after_messages:
                    return
            elif verb == "RSET":
                tx = None
                reply("250 2.0.0 ok")
            elif verb == "NOOP":
                reply("250 2.0.0 ok")
            elif verb == "QUIT":
                reply("221 2.0.0 bye")
                return
            else:
                reply("502 5.5.2 not implemented")

    def _data(self, tx: Transaction, rfile, conn: socket.socket) -> bool:
        """Read the message to `.<CRLF>`; False when the connection is gone or dropped."""
        raw, data = bytearray(), bytearray()
        try:
            while True:
                line = rfile.readline(1 << 20)
                if not line:
                    return False
                raw += line
                limit = self.script.drop_in_data_after
                if limit is not None and len(raw) >= limit:
                    conn.shutdown(socket.SHUT_RDWR)
                    return False
                stall = self.script.stall_in_data_after
                if stall is not None and len(raw) >= stall:
                    self._stall_in_data(rfile)
                    return False
                if line == b".\r\n":
                    tx.complete = True
                    return True
                body = line[:-2] if line.endswith(b"\r\n") else line
                if b"\r" in body or b"\n" in body:
                    tx.bad_line_ends = True
                data += line[1:] if line.startswith(b".") else line
        finally:
            tx.raw, tx.data = bytes(raw), bytes(data)

    def _stall_in_data(self, rfile) -> None:  # type: ignore[no-untyped-def]
        """Read nothing until `unstall` (or the stop), then read to the end of
        the connection, counting it in `peer_closed` when the client closed it."""
        deadline = time.monotonic() + STALL_LIMIT
        while not self.unstall.wait(0.05):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
        while rfile.read1(65536):
            pass
        with self._lock:
            self.peer_closed += 1

    def _auth(self, arg: str, rfile, reply) -> str | None:
        """AUTH PLAIN (with or without an initial response) or LOGIN; the login or None."""
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        users = self.script.users or {}

        def ask(challenge: str) -> str:
            reply(f"334 {challenge}")
            return rfile.readline(65536).rstrip(b"\r\n").decode("ascii")

        try:
            if mechanism == "PLAIN" and "PLAIN" in self.script.auth_mechanisms:
                response = initial or ask("")
                _, user, password = base64.b64decode(response).decode("utf-8").split("\0")
            elif mechanism == "LOGIN" and "LOGIN" in self.script.auth_mechanisms:
                user = base64.b64decode(ask("VXNlcm5hbWU6")).decode("utf-8")
                password = base64.b64decode(ask("UGFzc3dvcmQ6")).decode("utf-8")
            else:
                reply("504 5.5.4 unrecognized authentication type")
                return None
        except (ValueError, UnicodeError):
            reply("501 5.5.2 cannot decode the response")
            return None
        if users.get(user) == password:
            reply("235 2.7.0 authentication successful")
            return user
        reply("535 5.7.8 authentication credentials invalid")
        return None


def _more_waiting(conn: socket.socket, rfile) -> bool:  # type: ignore[no-untyped-def]
    """Whether input is already there, buffered or in the socket, without waiting."""
    conn.setblocking(False)
    try:
        return bool(rfile.peek(1))
    except OSError:
        return False
    finally:
        conn.settimeout(READ_TIMEOUT)


def free_port_on(*addresses: str) -> int:
    """A TCP port free on every one of `addresses` (MX hosts share the port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET) as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        ok = True
        for address in addresses[1:]:
            with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
                try:
                    s.bind((address, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no port free on all of {addresses}")


def accepts(address: str, port: int) -> bool:
    """Whether something accepts TCP connections there (a server that started)."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family) as s:
            s.settimeout(0.5)
            s.connect((address, port))
        return True
    except OSError:
        return False
