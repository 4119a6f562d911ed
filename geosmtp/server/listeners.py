"""The running server: listeners, the connection cap, graceful stop.

One `gevent.server.StreamServer` per configured listener. Sessions run in a
`gevent.pool.Group`; the cap is checked as each connection's greenlet starts,
so a client over it gets `421` at once instead of waiting in the backlog
(gevent's `Pool` as `spawn` would stop accepting instead, and cannot be
resized live).
"""

from __future__ import annotations

import resource
import socket

import gevent
from gevent import socket as gsocket
from gevent.pool import Group
from gevent.server import StreamServer
from loguru import logger

from ..config import Config
from ..smtp import Extensions, Limits, RecipientPolicy, SMTPConnection
from ..smtp import replies as R
from ..storage.maildir import MaildirStore
from .smtp import SMTPSession


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit: one descriptor per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _threadpool_apply(fn, *args):  # type: ignore[no-untyped-def]
    return gevent.get_hub().threadpool.apply(fn, args)


class MailServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = MaildirStore(
            config.mail_dir,
            fsync=config.fsync,
            hostname=config.hostname,
            offload=_threadpool_apply,
        )
        self.sessions: Group = Group()
        self._live: dict[gevent.Greenlet, SMTPSession] = {}
        self.servers: list[StreamServer] = []
        self.stopping = False
        self.apply_config(config)

    # ------------------------------------------------------------ config

    def apply_config(self, config: Config) -> None:
        """Derive what each new session needs from the config (sessions keep theirs)."""
        self.config = config
        self.policy = RecipientPolicy(
            local_domains=frozenset(config.domains),
            users=frozenset(config.users),
            accept_unknown=config.unknown_recipients == "accept",
            postmaster=config.postmaster,
        )
        lim = config.limits
        self.limits = Limits(
            command_line=lim.command_line,
            text_line=lim.text_line,
            max_message_size=lim.max_message_size,
            max_recipients=lim.max_recipients,
            max_errors=lim.max_errors,
        )
        ext = config.extensions
        self.extensions = Extensions(
            pipelining=ext.pipelining,
            size=ext.size,
            eightbitmime=ext.eightbitmime,
            enhancedstatuscodes=ext.enhancedstatuscodes,
        )

    def new_connection(self) -> SMTPConnection:
        return SMTPConnection(
            self.config.hostname,
            self.policy,
            self.limits,
            self.extensions,
            vrfy=self.config.vrfy,
        )

    # --------------------------------------------------------- listeners

    def start(self) -> None:
        for listener in self.config.listeners:
            family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
            sock = gsocket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((listener.address, listener.port))
            except OSError as exc:
                sock.close()
                self.close_listeners()
                raise OSError(
                    exc.errno,
                    f"cannot listen on [{listener.address}]:{listener.port}: {exc.strerror}",
                ) from None
            sock.listen(1024)
            server = StreamServer(sock, self._handle)
            server.start()
            self.servers.append(server)
            host, port = sock.getsockname()[:2]
            logger.info("listening on [{}]:{}", host, port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.socket.getsockname()[:2] for s in self.servers]

    def _refuse(self, client: socket.socket, address: tuple) -> None:
        """Over the cap: answer 421 and close (RFC 5321 §3.1), never leave it hanging."""
        reply = R.SHUTTING_DOWN if self.stopping else R.TOO_MANY_CLIENTS
        try:
            client.setblocking(False)
            client.send(reply.to_bytes())
        except OSError:
            pass
        finally:
            client.close()
        logger.warning("refused [{}]: {}", address[0], reply.text)

    def _handle(self, client: socket.socket, address: tuple) -> None:
        # Checked and counted with no switch in between, so the cap is exact.
        if self.stopping or len(self._live) >= self.config.max_clients:
            self._refuse(client, address)
            return
        greenlet = gevent.getcurrent()
        session = SMTPSession(self, client, address)
        session.greenlet = greenlet  # type: ignore[assignment]
        self._live[greenlet] = session
        self.sessions.add(greenlet)  # type: ignore[arg-type]
        try:
            session.run()
        finally:
            del self._live[greenlet]

    # --------------------------------------------------------------- stop

    def close_listeners(self) -> None:
        for server in self.servers:
            server.close()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions finish for `grace` seconds, then 421 the rest."""
        grace = self.config.timeouts.shutdown_grace if grace is None else grace
        self.stopping = True
        self.close_listeners()
        if self.sessions:
            logger.info("stopping: waiting up to {}s for {} sessions", grace, len(self.sessions))
            self.sessions.join(timeout=grace)
        for session in list(self._live.values()):
            session.shutdown()
        # Sessions that were delivering finish that message, then see the flag.
        self.sessions.join(timeout=max(5.0, self.config.timeouts.command / 60))
        if self.sessions:
            self.sessions.kill(block=True, timeout=5)
        logger.info("stopped")
