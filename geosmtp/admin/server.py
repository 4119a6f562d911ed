"""The admin listener: gevent's WSGI server running `AdminAPI` (no threads)."""

from __future__ import annotations

import hmac
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from email import errors
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gevent import Timeout
from gevent import socket as gsocket
from gevent.pool import Pool
from gevent.pywsgi import Input, WSGIHandler, WSGIServer
from loguru import logger

from ..config import Admin, ConfigError
from ..logs import LogWriter
from .api import BAD_FRAMING, LENGTH_REQUIRED, AdminAPI, ShortBody

if TYPE_CHECKING:
    from ..app import App


def admin_token(admin: Admin, create: bool = True) -> str:
    """The write token: the configured one, or the token file's (made with a
    random token if missing)."""
    if admin.token is not None:
        return admin.token
    if admin.token_file is None:
        raise ConfigError("admin.token: the admin listener needs a token or a token_file")
    return _token_from_file(admin.token_file, "admin.token_file", create)


def admin_read_token(admin: Admin, create: bool = True) -> str | None:
    """The read-only token (`admin.read_token` or its file), or None when none is set."""
    if admin.read_token is not None:
        return admin.read_token
    if admin.read_token_file is None:
        return None
    return _token_from_file(admin.read_token_file, "admin.read_token_file", create)


def admin_tokens(admin: Admin) -> tuple[str, str | None]:
    """Both tokens, as the master reads them before it drops privileges; the
    same secret in both would make the read token a write token."""
    token = admin_token(admin)
    read_token = admin_read_token(admin)
    if read_token is not None and hmac.compare_digest(read_token.encode(), token.encode()):
        raise ConfigError("admin.read_token_file: holds the write token; the two must differ")
    return token, read_token


def _token_from_file(path: Path, key: str, create: bool) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"{key}: no such file: '{path}'") from None
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        except OSError as exc:
            raise ConfigError(f"{key}: cannot create '{path}': {exc.strerror}") from None
        logger.info("admin {} written to {}", "read token" if "read" in key else "token", path)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read '{path}': {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"{key}: the token in '{path}' is shorter than 16 characters")
    return token


#: A Content-Length value (RFC 9112 §6.3: 1*DIGIT; leading zeros are fine).
_OCTETS = re.compile(r"[0-9]+")
#: What pywsgi answers a malformed request with; ours too, for a late request line.
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def framing_error(headers: Message) -> str | None:
    """Why a request's header section cannot frame it (RFC 9112 §5 and §6.3),
    or None. A line the parser could not take as a header field (no colon, a
    space before it, a continuation first) would hide the fields after it;
    two Content-Length headers (even equal ones) or a value that is not
    digits leave the body's end in doubt: nothing after such a header section
    can be trusted to be where the client meant it."""
    if _lines_left_out(headers):
        return "a header line that is not a header field (no colon, or white space before it)"
    if any("\n" in value for value in headers.values()):
        return "a header field folded over lines (obs-fold)"
    lengths = headers.get_all("Content-Length") or []
    if len(lengths) > 1:
        return f"{len(lengths)} Content-Length headers; a request may have one"
    if lengths and not _OCTETS.fullmatch(lengths[0].strip(" \t")):
        return f"Content-Length is not a number of octets: {lengths[0][:40]!r}"
    return None


#: The defects of a header line the parser could not take as a field: no
#: colon or white space before it, a continuation first, `From ` in the
#: middle, an empty name (`: value`).
_LOST_LINE = (
    errors.MissingHeaderBodySeparatorDefect,
    errors.FirstHeaderLineIsContinuationDefect,
    errors.MisplacedEnvelopeHeaderDefect,
    errors.InvalidHeaderDefect,
)


def _lines_left_out(headers: Message) -> bool:
    """Whether the parser took lines of a header section for something other
    than header fields: a body, an envelope `From ` line. (The body it parses
    by the Content-Type is empty otherwise: a multipart one has defects of
    its own, which are no concern here.)"""
    if headers.get_unixfrom() is not None:
        return True
    if any(isinstance(defect, _LOST_LINE) for defect in headers.defects):
        return True
    payload = headers.get_payload()
    if isinstance(payload, list):  # message/rfc822: a message inside
        return any(
            isinstance(part, Message) and (bool(part.keys()) or _lines_left_out(part))
            for part in payload
        )
    return bool(payload)


class BodyInput(Input):
    """A request body that must arrive by the request's deadline: a read that
    would wait past it raises `ShortBody` (and the connection closes); once the
    reply is sent on a closing connection, nothing more is read."""

    def __init__(self, handler: AdminHandler, socket: gsocket.socket | None) -> None:
        super().__init__(handler.rfile, handler.content_length, socket=socket)
        self.handler = handler
        self.finished = False  # the reply is sent and the connection closes

    def read(self, length: int | None = None) -> bytes:
        return self._before_deadline(super().read, length)

    def readline(self, size: int | None = None) -> bytes:
        return self._before_deadline(super().readline, size)

    def _before_deadline(self, read: Callable[[int | None], bytes], size: int | None) -> bytes:
        if self.finished:
            return b""  # pywsgi discards the unread body of a closing connection: no need
        seconds = self.handler.server.limits.request_timeout
        left = max(0.0, self.handler.deadline - time.monotonic())
        try:
            with Timeout(left, ShortBody(f"the body did not arrive within {seconds:g} s")):
                return read(size)
        except OSError:
            self.handler.close_connection = True  # what is left of it is not a request
            self.finished = True
            raise


class AdminHandler(WSGIHandler):
    """pywsgi's handler with the admin listener's limits (`admin:` in the config).

    A connection waits at most `idle_timeout` for a request's first byte, then
    is closed; from that byte, the request line and headers must be in within
    `request_timeout` (else 400, a WARNING line and close) and so must the
    body (else the API answers 400 and closes). A request with a
    Transfer-Encoding (a chunked body: no Content-Length) gets 411, one whose
    header section cannot frame it (`framing_error`) 400, and the connection
    closes.
    """

    server: AdminServer
    deadline = 0.0  # monotonic time by which this request must be in
    length_required = False  # it came with a Transfer-Encoding
    bad_framing: str | None = None  # why its header section cannot frame it

    def handle(self) -> None:
        limits = self.server.limits
        # A backstop for writes to a client that reads nothing (reads have their own).
        self.socket.settimeout(max(limits.idle_timeout, limits.request_timeout))
        super().handle()

    def read_requestline(self) -> str:
        limits = self.server.limits
        self.length_required = False
        with Timeout(limits.idle_timeout, TimeoutError("idle")):
            if not self.rfile.peek(1):
                return ""  # the client closed: pywsgi ends the connection
        self.deadline = time.monotonic() + limits.request_timeout
        try:
            with Timeout(limits.request_timeout, TimeoutError("request line")):
                return super().read_requestline()
        except TimeoutError:
            self._late_request_line(limits.request_timeout)
            return ""  # pywsgi ends the connection

    def _late_request_line(self, seconds: float) -> None:
        """Answer a request line not in by `request_timeout` as pywsgi answers
        late headers: 400, a WARNING line, and the connection closes."""
        self.close_connection = True
        self.log_error(
            "Invalid request (from %s): request line not in after %g s",
            self.client_address,
            seconds,
        )
        try:
            self.socket.sendall(BAD_REQUEST)
        except OSError:
            pass  # the client is gone: nothing to tell it

    def read_request(self, raw_requestline: str) -> bool:  # type: ignore[override]  # pywsgi's returns True; its stub says OldMessage
        seconds = self.server.limits.request_timeout
        left = max(0.0, self.deadline - time.monotonic())
        self.bad_framing = None
        parsed = self.headers  # the last request's, until this one's are parsed
        # A ValueError is pywsgi's "bad request": 400, logged, and the connection closes.
        with Timeout(left, ValueError(f"request headers not in after {seconds:g} s")):
            try:
                ok = bool(super().read_request(raw_requestline))
            except ValueError:
                # A Content-Length pywsgi refused ("x", "-1"): the API answers why.
                if self.headers is parsed or framing_error(self.headers) is None:
                    raise
                ok = True
        if ok and "Transfer-Encoding" in self.headers:
            # No Content-Length to bound the body: 411, and nothing of it is read.
            self.length_required = True
            self._no_body()
        elif ok:
            self.bad_framing = framing_error(self.headers)
            if self.bad_framing is not None:  # 400 from the API, nothing of the body read
                self._no_body()
        return ok

    def _no_body(self) -> None:
        """Read nothing after this request's headers, and close once it is answered."""
        self.close_connection = True
        del self.headers["Transfer-Encoding"]
        del self.headers["Content-Length"]
        self.content_length = None  # type: ignore[assignment]  # pywsgi's "no body"; its stub says int

    def get_environ(self) -> dict:
        env = super().get_environ()
        env[LENGTH_REQUIRED] = self.length_required
        env[BAD_FRAMING] = self.bad_framing
        if env["wsgi.input"] is self.wsgi_input:
            expect = env.get("HTTP_EXPECT", "").lower() == "100-continue"
            self.wsgi_input = env["wsgi.input"] = BodyInput(self, self.socket if expect else None)
        return env

    def run_application(self) -> None:
        try:
            super().run_application()
        finally:
            if self.close_connection and isinstance(self.wsgi_input, BodyInput):
                self.wsgi_input.finished = True


class AdminServer(WSGIServer):
    """gevent's WSGI server with `AdminHandler` and the `admin:` limits."""

    handler_class = AdminHandler

    def __init__(
        self, listener: gsocket.socket, application: AdminAPI, limits: Admin, **kwargs: Any
    ) -> None:
        super().__init__(listener, application, **kwargs)
        self.limits = limits


def start_admin(
    server: App, bound: socket.socket, token: str, read_token: str | None
) -> WSGIServer:
    """Serve the management API on `bound` (the master bound it and read the tokens)."""
    from ..app import share_of_limit

    limits = server.config.admin
    wsgi = AdminServer(
        gsocket.socket(fileno=bound.detach()),
        AdminAPI(server, token, read_token),
        limits,
        # The connection cap: a full pool accepts nothing more (the rest wait in
        # the kernel's backlog, holding no descriptor here). A pool also lets a
        # worker that stops finish the requests it took (a reload's answer among
        # them) before it ends: `stop()` waits for them.
        spawn=Pool(share_of_limit(limits.max_connections, server.share)),
        log=LogWriter("DEBUG", "admin"),  # one line per request
        error_log=LogWriter("WARNING", "admin"),  # malformed requests, handler errors
    )
    wsgi.start()
    return wsgi
