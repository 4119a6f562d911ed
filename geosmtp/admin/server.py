"""The admin listener: gevent's WSGI server running `AdminAPI` (no threads)."""

from __future__ import annotations

import os
import secrets
import socket
from typing import TYPE_CHECKING

from gevent import socket as gsocket
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from loguru import logger

from ..config import Admin, ConfigError
from ..logs import LogWriter
from .api import AdminAPI

if TYPE_CHECKING:
    from ..app import App


def admin_token(admin: Admin, create: bool = True) -> str:
    """The configured token, or the token file's (made with a random token if missing)."""
    if admin.token is not None:
        return admin.token
    path = admin.token_file
    if path is None:
        raise ConfigError("admin.token: the admin listener needs a token or a token_file")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"admin.token_file: no such file: '{path}'") from None
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        except OSError as exc:
            raise ConfigError(f"admin.token_file: cannot create '{path}': {exc.strerror}") from None
        logger.info("admin token written to {}", path)
    except OSError as exc:
        raise ConfigError(f"admin.token_file: cannot read '{path}': {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"admin.token_file: the token in '{path}' is shorter than 16 characters")
    return token


#: Admin requests one worker serves at once; more wait in the backlog.
MAX_REQUESTS = 64


def start_admin(server: App, bound: socket.socket, token: str) -> WSGIServer:
    """Serve the management API on `bound` (the master bound it and read `token`)."""
    wsgi = WSGIServer(
        gsocket.socket(fileno=bound.detach()),
        AdminAPI(server, token),
        # A pool, so that a worker that stops finishes the requests it took (a
        # reload's answer among them) before it ends: `stop()` waits for them.
        spawn=Pool(MAX_REQUESTS),
        log=LogWriter("DEBUG", "admin"),  # one line per request
        error_log=LogWriter("WARNING", "admin"),  # malformed requests, handler errors
    )
    wsgi.start()
    return wsgi
