"""The admin listener: gevent's WSGI server running `AdminAPI` (no threads)."""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING

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


def start_admin(server: App) -> WSGIServer:
    admin = server.config.admin
    app = AdminAPI(server, admin_token(admin))
    wsgi = WSGIServer(
        (admin.address, admin.port),
        app,
        log=LogWriter("DEBUG", "admin"),  # one line per request
        error_log=LogWriter("WARNING", "admin"),  # malformed requests, handler errors
    )
    try:
        wsgi.start()
    except OSError as exc:
        # gevent appends the address to strerror; the message names it already.
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror
        raise OSError(
            exc.errno, f"cannot listen on [{admin.address}]:{admin.port}: {reason}"
        ) from None
    host, port = wsgi.socket.getsockname()[:2]
    logger.info("admin API listening on http://{}:{}/api/v1/", host, port)
    return wsgi
