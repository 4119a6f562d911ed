"""A worker process: one gevent loop serving every listener, as `user:`.

The master forks it with everything it may not read itself once it has
dropped its privileges (the bound sockets, the TLS context, the DKIM key, the
relay settings with the smarthost password, the admin API's tokens) in
`WorkerContext`; it drops its privileges, serves, and says `ready` (or
why it could not start) on its control channel. SIGTERM stops it under the
usual grace rules; the master alone answers SIGINT and SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from loguru import logger

from .. import logs
from ..config import Config, ConfigError, Listener
from . import logpipe, privileges
from .host import ConfigChange

if TYPE_CHECKING:
    from .shared import SharedState

#: Exit statuses a worker that could not start uses (as the CLI's).
EXIT_FAILURE, EXIT_USAGE = 1, 2
#: Seconds a stopping worker gives the admin requests it took to finish.
ADMIN_STOP = 10.0


@dataclass
class WorkerContext:
    """What the master hands a worker across the fork."""

    config: Config
    prepared: Any  # app.Prepared, which the server passes on without knowing it
    account: privileges.Account | None
    index: int  # its place among the workers: its share of the outbound queue
    count: int  # how many workers share the queue
    bound: list[tuple[Listener, socket.socket]]
    admin: socket.socket | None
    token: str | None  # the admin API's write token
    read_token: str | None  # its read-only token (None: there is none)
    log_fd: int
    control: socket.socket  # SOCK_SEQPACKET to the master
    master_pid: int
    clean: bool  # the first worker of a start: no other process writes yet
    shared: SharedState  # what all workers count in
    slot: int  # this worker's counters in it
    #: Builds and starts the app and its admin API (`host.Runtime.start_worker`).
    start: Callable[[WorkerContext, MasterLink], tuple[Any, Any]]


class MasterLink:
    """The worker's end of its control channel: one JSON message a packet.

    One greenlet reads it: a reply goes to the request waiting for it; a
    `retire` message (this worker's generation is being replaced) carries the
    config the new workers run, and `on_retire` gets it.
    """

    def __init__(self, control: socket.socket) -> None:
        self.sock = gsocket.socket(fileno=control.detach())
        self._lock = Semaphore()  # one request at a time: replies come in order
        self._reply: AsyncResult | None = None
        self.on_retire: Callable[[dict], None] | None = None
        self._reader: gevent.Greenlet | None = None

    def start(self) -> None:
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            message = json.loads(data) if data else None
            if message is not None and "retire" in message:
                if self.on_retire is not None:
                    self.on_retire(message["retire"])
                continue
            if self._reply is not None:
                self._reply.set(message)
            if message is None:
                return

    def send(self, message: dict) -> None:
        self.sock.send(json.dumps(message).encode())

    def request(self, message: dict) -> dict:
        with self._lock:
            self._reply = AsyncResult()
            self.send(message)
            reply = self._reply.get()
            self._reply = None
        if reply is None:
            raise ConfigError("the master process is gone")
        return reply

    def _change(self, message: dict) -> ConfigChange:
        reply = self.request(message)
        if "error" in reply:
            raise ConfigError(reply["error"])
        return ConfigChange(reply["changed"], reply["restart"], reply.get("config"))

    def change(self, mapping: dict[str, Any]) -> ConfigChange:
        return self._change({"op": "change", "config": mapping})

    def reload(self) -> ConfigChange:
        return self._change({"op": "reload"})


def run(ctx: WorkerContext) -> NoReturn:
    """The worker's life, in the forked child; never returns."""
    link: MasterLink | None = None
    try:
        gevent.reinit()  # the master's loop state is not this process's
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        privileges.drop(ctx.account)
        privileges.die_with_parent()
        if os.getppid() != ctx.master_pid:  # the master died before the line above
            os._exit(EXIT_FAILURE)
        logpipe.forward(ctx.log_fd, ctx.config.log)
        link = MasterLink(ctx.control)
        logs.capture_hub_errors(gevent.get_hub())
        ctx.shared.bind(ctx.slot)
        app, admin = ctx.start(ctx, link)
    except BaseException as exc:
        status, reason = _failure(exc)
        try:
            if link is None:
                link = MasterLink(ctx.control)
            link.send({"failed": reason, "status": status})
        except OSError:
            pass
        os._exit(status)

    def retire(config: dict) -> None:
        # The new config for what this worker still serves: open sessions
        # keep their settings, but the timeouts apply to all of them.
        try:
            app.retire(config)
        except Exception:
            logger.exception("worker {}: could not take the new timeouts", ctx.index)

    link.on_retire = retire
    link.start()
    link.send({"ready": True, "pid": os.getpid()})
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    try:
        if admin is not None:
            admin.stop(timeout=ADMIN_STOP)  # the requests it took are answered first
        app.stop()
        logger.debug("worker {} stopped", ctx.index)
    except BaseException:
        logger.exception("worker {}: error while stopping", ctx.index)
    finally:
        sys.stdout.flush()
        os._exit(0)


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one-line reason for a worker that could not start."""
    from ..storage import StorageError

    if isinstance(exc, ConfigError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, StorageError):
        return EXIT_FAILURE, str(exc)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.filename is not None:
            reason = f"{reason}: '{exc.filename}'"
        return EXIT_FAILURE, reason
    logger.opt(exception=exc).error("worker could not start")
    return EXIT_FAILURE, f"internal error: {exc!r}"
