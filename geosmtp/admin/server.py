"""The admin listener: gevent's WSGI server running `AdminAPI` (no threads)."""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gevent import Timeout
from gevent import socket as gsocket
from gevent.pool import Pool
from gevent.pywsgi import Input, WSGIHandler, WSGIServer
from loguru import logger

from ..config import Admin, ConfigError
from ..logs import LogWriter
from .api import LENGTH_REQUIRED, AdminAPI, ShortBody

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


class BodyInput(Input):
    """A request body that must arrive by the request's deadline: a read that
    would wait past it raises `ShortBody` (and the connection closes); once the
    reply is sent on a closing connection, nothing more is read."""

    def __init__(self, handler: AdminHandler, socket: object) -> None:
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
    `request_timeout` (else 400 and close) and so must the body (else the API
    answers 400 and closes). A request with a Transfer-Encoding (a chunked
    body: no Content-Length) gets 411 and the connection closes.
    """

    deadline = 0.0  # monotonic time by which this request must be in
    length_required = False  # it came with a Transfer-Encoding

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
        with Timeout(limits.request_timeout, TimeoutError("request line")):
            return super().read_requestline()

    def read_request(self, raw_requestline: str) -> bool:
        seconds = self.server.limits.request_timeout
        left = max(0.0, self.deadline - time.monotonic())
        # A ValueError is pywsgi's "bad request": 400, logged, and the connection closes.
        with Timeout(left, ValueError(f"request headers not in after {seconds:g} s")):
            ok = super().read_request(raw_requestline)
        if ok and "Transfer-Encoding" in self.headers:
            # No Content-Length to bound the body: 411, and nothing of it is read.
            self.length_required = True
            self.close_connection = True
            del self.headers["Transfer-Encoding"]
            del self.headers["Content-Length"]
            self.content_length = None
        return ok

    def get_environ(self) -> dict:
        env = super().get_environ()
        env[LENGTH_REQUIRED] = self.length_required
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

    def __init__(self, listener: object, application: AdminAPI, limits: Admin, **kwargs) -> None:
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
