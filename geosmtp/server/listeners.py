"""The running server: listeners, the connection cap, graceful stop.

One `gevent.server.StreamServer` per configured listener. Sessions run in a
`gevent.pool.Group`; the cap is checked as each connection's greenlet starts,
so a client over it gets `421` at once instead of waiting in the backlog
(gevent's `Pool` as `spawn` would stop accepting instead, and cannot be
resized live).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import resource
import socket
from collections.abc import Callable

import gevent
from gevent import socket as gsocket
from gevent.pool import Group
from gevent.server import StreamServer
from loguru import logger

from .. import config as cfg
from .. import logs
from ..auth import AuthThrottle, UserDB
from ..config import Config, ConfigError, Listener
from ..mail import Domains
from ..metrics import ListenerMetrics, Metrics
from ..smtp import Limits, RecipientPolicy, Security, SMTPConnection
from ..smtp import replies as R
from ..storage.maildir import MaildirStore
from . import tls
from .smtp import SMTPSession
from .threads import in_thread


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


class MailServer:
    def __init__(self, config: Config, loader: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.loader = loader  # reads the config again, for reload()
        self.metrics = Metrics()
        self.auth_throttle = AuthThrottle()
        self.store = MaildirStore(
            config.mail_dir,
            fsync=config.fsync,
            hostname=config.hostname,
            offload=in_thread,
        )
        self.sessions: Group = Group()
        self.by_id: dict[str, SMTPSession] = {}  # open sessions: the cap, stop, the admin API
        self.servers: list[StreamServer] = []
        self.stopping = False
        self._access_writer: gevent.Greenlet | None = None
        self.tls_context = tls.server_context(config.tls, config.hostname)  # may raise ConfigError
        self.apply_config(config)

    # ------------------------------------------------------------ config

    def apply_config(self, config: Config) -> None:
        """Derive what each new session needs from the config (sessions keep theirs)."""
        self.config = config
        domains = Domains(config.domains)  # one IDNA-aware comparison for all
        self.policy = RecipientPolicy(
            local_domains=domains,
            users=frozenset(config.users),
            accept_unknown=config.unknown_recipients == "accept",
            postmaster=config.postmaster,
        )
        # The config's sections and the core's settings have the same fields.
        self.limits = Limits(**dataclasses.asdict(config.limits))
        self.extensions = config.extensions
        self.users = UserDB(
            {name: user.password for name, user in config.users.items()},
            domains,
        )
        # The throttle keeps its record of failures across config changes.
        self.auth_throttle.max_failures = config.auth.max_failures
        self.auth_throttle.base_delay = config.auth.failure_delay
        self.trusted_networks = [
            ipaddress.ip_network(n, strict=False) for n in config.trusted_networks
        ]

    def security(self, listener: Listener, peer: str) -> Security:
        """What a client on `listener` from `peer` may do; see `Security`."""
        config = self.config
        return Security(
            tls_available=self.tls_context is not None,
            tls_active=listener.role == "submissions",
            auth_available=bool(self.users),
            auth_plaintext=config.auth.allow_plaintext,
            auth_required=listener.role != "mx",
            trusted=bool(self.trusted_networks) and self._trusted(peer),
            sender_must_match=config.auth.sender_must_match,
        )

    def _trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.trusted_networks)

    def new_connection(self, listener: Listener, peer: str) -> SMTPConnection:
        return SMTPConnection(
            self.config.hostname,
            self.policy,
            self.limits,
            self.extensions,
            self.security(listener, peer),
            vrfy=self.config.vrfy,
        )

    #: CPU-heavy or blocking work (password checks) in the hub's threadpool.
    run_blocking = staticmethod(in_thread)

    def change_config(self, new: Config, *, allow_restart_keys: bool = False) -> list[str]:
        """Apply `new` to new sessions (open ones keep theirs; timeouts apply to all).

        Returns the changed keys that need a restart. Unless `allow_restart_keys`
        (reload: the rest is applied, those are reported), any such key makes
        it a `ConfigError` and nothing changes. The config that would run (with
        those keys at their running values) must pass the start's whole-config
        check: a file valid on its own may not leave a running listener unable
        to serve (a `submissions` listener without TLS), else `ConfigError`.
        """
        old_map, new_map = cfg.to_mapping(self.config), cfg.to_mapping(new)
        changed = cfg.changed_keys(old_map, new_map)
        restart = cfg.needs_restart(changed)
        if restart and not allow_restart_keys:
            raise ConfigError(f"{restart[0]}: cannot change while running; restart geosmtp")
        if restart:  # keep the running values of those keys
            kept = {k: getattr(self.config, k) for k in {r.split(".")[0] for r in restart}}
            if "log" in kept:
                kept["log"] = dataclasses.replace(new.log, dir=self.config.log.dir)
            new = dataclasses.replace(new, **kept)
            try:
                cfg._check(new)
            except ConfigError as exc:
                raise ConfigError(
                    f"{exc} (keeping the running {', '.join(restart)}, "
                    "which need a restart to change)"
                ) from None
        else:
            cfg._check(new)
        tls_changed = any(k.startswith("tls.") for k in changed)
        context = tls.server_context(new.tls, new.hostname) if tls_changed else self.tls_context
        if new.log != self.config.log:
            logs.setup(new.log)
        self.tls_context = context
        self.apply_config(new)
        if changed:
            logger.info("configuration changed: {}", ", ".join(changed))
        return restart

    def reload(self) -> list[str]:
        """Re-read the config file; an invalid one changes nothing (ConfigError, logged)."""
        try:
            if self.loader is None:
                raise ConfigError("reload: the server was started without a config file")
            return self.change_config(self.loader(), allow_restart_keys=True)
        except ConfigError as exc:
            logger.error("reload refused, configuration unchanged: {}", exc)
            raise

    # --------------------------------------------------------- listeners

    def start(self) -> None:
        self._access_writer = gevent.spawn(self._write_access_log)
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
            server = StreamServer(
                sock,
                self._handler(
                    listener,
                    self.metrics.listener(
                        f"{listener.role}:[{listener.address}]:{sock.getsockname()[1]}"
                    ),
                ),
            )
            server.start()
            self.servers.append(server)
            host, port = sock.getsockname()[:2]
            logger.info("listening on [{}]:{} ({})", host, port, listener.role)

    def _handler(self, listener: Listener, lm: ListenerMetrics):  # type: ignore[no-untyped-def]
        def handle(client: socket.socket, address: tuple) -> None:
            self._handle(client, address, listener, lm)

        return handle

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

    def _handle(
        self, client: socket.socket, address: tuple, listener: Listener, lm: ListenerMetrics
    ) -> None:
        # Checked and counted with no switch in between, so the cap is exact.
        if self.stopping or len(self.by_id) >= self.config.max_clients:
            lm.refused.inc()
            self._refuse(client, address)
            return
        session = SMTPSession(self, client, address, listener, lm)
        self.by_id[session.id] = session
        self.sessions.add(gevent.getcurrent())  # type: ignore[arg-type]
        lm.connections.inc()
        lm.current.inc()
        try:
            session.run()
        finally:
            lm.current.dec()
            del self.by_id[session.id]

    # --------------------------------------------------------------- stop

    @staticmethod
    def _write_access_log(interval: float = 0.1) -> None:
        while True:
            gevent.sleep(interval)
            logs.access_log.flush()

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
        for session in list(self.by_id.values()):
            session.shutdown()
        # Sessions that were delivering finish that message, then see the flag.
        self.sessions.join(timeout=max(5.0, self.config.timeouts.command / 60))
        if self.sessions:
            self.sessions.kill(block=True, timeout=5)
        if self._access_writer is not None:
            self._access_writer.kill()
        logs.access_log.flush()
        logger.info("stopped")
