"""Composition: config -> services -> listeners, keyed by protocol.

Everything geosmtp runs is built here, in one place: the storage (spool and
Maildirs), the mail pipeline, users and the AUTH throttle, TLS, metrics, and
the listeners, each serving the session class of its protocol. A new protocol
(POP3, LMTP) is a session class added to `SESSIONS` and the roles that use it
in `config.ROLE_PROTOCOL`.

`App` is also what sessions and the admin API see of the server: the running
config, the services, the open sessions, and live configuration changes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from loguru import logger

from . import config as cfg
from . import logs
from .auth import AuthThrottle, UserDB
from .config import Config, ConfigError, Listener
from .mail import Domains
from .metrics import Metrics
from .pipeline import MaildirDestination, Pipeline, Router
from .server import tls
from .server.listeners import Listeners, Session
from .server.smtp import SMTPSession
from .server.threads import in_thread
from .smtp import RecipientPolicy, Security, SMTPConnection
from .storage import MaildirStore, Spool
from .storage.spool import UniqueNames

#: The session class of each protocol a listener can speak.
SESSIONS: dict[str, type[Session]] = {"smtp": SMTPSession}  # type: ignore[dict-item]


@dataclass(frozen=True)
class ConfigChange:
    """What a change of configuration did."""

    changed: list[str]  # every dotted key whose value changed
    restart: list[str]  # of those, the ones kept at their running value until a restart


class App:
    def __init__(self, config: Config, loader: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.loader = loader  # reads the config again, for reload()
        self.metrics = Metrics()
        self.auth_throttle = AuthThrottle()
        self.tls_context = tls.server_context(config.tls, config.hostname)  # may raise ConfigError
        # Storage: the spool and the Maildirs share one naming scheme and, when they
        # are on one filesystem, delivery is a hard link.
        names = UniqueNames(config.hostname)
        self.store = MaildirStore(
            config.mail_dir, fsync=config.fsync, names=names, offload=in_thread
        )
        self.spool = Spool(config.spool_path, names)
        self.pipeline = Pipeline(Router(local=MaildirDestination(self.store)))
        self.listeners = Listeners(self, SESSIONS)
        self._access_writer: gevent.Greenlet | None = None
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
        # The config's `limits:` and `extensions:` are the core's own dataclasses.
        self.limits = config.limits
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
        """The SMTP core for a new client on `listener`, with today's settings."""
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

    def change_config(self, new: Config, *, allow_restart_keys: bool = False) -> ConfigChange:
        """Apply `new` to new sessions (open ones keep theirs; timeouts apply to all).

        Unless `allow_restart_keys` (reload: the rest is applied, those are
        reported), a changed key that needs a restart makes it a `ConfigError`
        and nothing changes. The config that would run (with those keys at
        their running values) must pass the start's whole-config check: a file
        valid on its own may not leave a running listener unable to serve (a
        `submissions` listener without TLS), else `ConfigError`.
        """
        changed = cfg.changed_keys(cfg.to_mapping(self.config), cfg.to_mapping(new))
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
        return ConfigChange(changed, restart)

    def reload(self) -> ConfigChange:
        """Re-read the config file; an invalid one changes nothing (ConfigError, logged)."""
        try:
            if self.loader is None:
                raise ConfigError("reload: the server was started without a config file")
            return self.change_config(self.loader(), allow_restart_keys=True)
        except ConfigError as exc:
            logger.error("reload refused, configuration unchanged: {}", exc)
            raise

    # ---------------------------------------------------------- running

    @property
    def by_id(self) -> dict[str, Session]:
        """The open sessions of every listener, by session id."""
        return self.listeners.by_id

    def start(self) -> None:
        """Check the storage, then listen. OSError when a listener cannot bind."""
        if not self.spool.same_filesystem(self.store.root):
            self.store.link = False
            logger.warning(
                "spool_dir {} is not on the filesystem of mail_dir {}: "
                "delivery copies each message instead of linking it",
                self.spool.root,
                self.store.root,
            )
        stale = self.spool.remove_stale()
        if stale:
            logger.info("removed {} stale spool files (never acknowledged)", stale)
        self._access_writer = gevent.spawn(logs.access_log.run)
        self.listeners.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions finish for `grace` seconds, then stop the rest."""
        grace = self.config.timeouts.shutdown_grace if grace is None else grace
        self.listeners.stop(grace)
        if self._access_writer is not None:
            self._access_writer.kill()
        logs.access_log.flush()
        logger.info("stopped")
