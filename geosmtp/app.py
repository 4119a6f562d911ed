"""Composition: config -> services -> listeners, keyed by protocol.

Everything geosmtp runs is built here, in one place: the storage (spool and
Maildirs), the mail pipeline and its stages, the outbound queue and its
reports, the DNS resolver, the login check (`logins.Logins`: the users and
the throttle), TLS, metrics, and the listeners, each serving the session
class of its protocol. A protocol is registered once in `PROTOCOLS`
(`server.protocols`: its roles, its session class, the builder of its core).

`App` is also what sessions and the admin API see of the server: the running
config, the services, the open sessions, and live configuration changes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import gevent
from loguru import logger

from . import config as cfg
from . import logs
from .config import Config, ConfigError, Listener
from .filters.stages import Filters
from .logins import Logins
from .mail import Domains, Envelope, Recipient
from .mail.ids import share_of, take_share
from .mailauth.stages import DKIMSign, SenderChecks, build_signer, sign_file
from .metrics import Metrics
from .pipeline import MaildirDestination, Message, Pipeline, Router, Verdict, deliver
from .queue.destination import QueueDestination
from .queue.reports import Reporter, ReportMessage
from .queue.runner import QueueRunner, RunnerSettings
from .queue.schedule import RetrySchedule
from .queue.store import QueueStore
from .relay.client import Relay, Timeouts
from .relay.mx import Resolver
from .server import tls
from .server.anvil import Anvil
from .server.cluster import Cluster, run_dir
from .server.host import ConfigChange
from .server.listeners import Listeners, trusted
from .server.lmtp import LMTPSession
from .server.lmtp import build_core as lmtp_core
from .server.pop3 import POP3Session
from .server.pop3 import build_core as pop3_core
from .server.protocols import Protocols, ServerProtocol, Session
from .server.shared import SharedClientTable, SharedState
from .server.smtp import SMTPSession
from .server.smtp import build_core as smtp_core
from .server.threads import in_thread
from .smtp import RecipientPolicy, Security
from .smtp.parser import SyntaxProblem, parse_mailbox
from .storage import MaildirStore, Spool
from .storage.spool import UniqueNames

#: Seconds between two tries for the lock of this worker's share of the queue.
SHARE_POLL = 0.2

#: The protocols a listener can speak: roles, session class, core builder.
PROTOCOLS = (
    ServerProtocol(
        "smtp",
        ("mx", "submission", "submissions"),
        SMTPSession,
        smtp_core,
        all_client_limits=True,
    ),
    ServerProtocol("pop3", ("pop3", "pop3s"), POP3Session, pop3_core),
    ServerProtocol("lmtp", ("lmtp",), LMTPSession, lmtp_core),
)


def share_of_limit(limit: int, share: tuple[int, int]) -> int:
    """Worker `index`'s part of a server-wide limit (relay and filter
    concurrency), for `share` = (index, of how many): the parts add up to the
    limit exactly (5 over 2 workers: 3 and 2); a limit below the number of
    workers still gives each worker 1."""
    index, shares = share
    return max(1, limit // shares + (1 if index < limit % shares else 0))


def runner_settings(config: Config) -> RunnerSettings:
    """The queue runner's settings from the `relay:` section."""
    relay = config.relay
    auth = None
    if relay.smarthost_auth is not None:
        a = relay.smarthost_auth
        password = a.password
        if a.password_file is not None:
            try:
                password = a.password_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise ConfigError(
                    f"relay.smarthost_auth.password_file: cannot read '{a.password_file}': {reason}"
                ) from None
        auth = (a.user or "", password or "")
    tls_context = None
    if relay.smarthost_ca_file is not None:
        # The smarthost's certificate is checked against these CAs only.
        try:
            tls_context = ssl.create_default_context(cafile=str(relay.smarthost_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"relay.smarthost_ca_file: {exc}") from None
    return RunnerSettings(
        hostname=config.hostname,
        schedule=RetrySchedule(relay.retry_schedule, relay.max_lifetime),
        delay_warning=relay.delay_warning,
        concurrency=relay.concurrency,
        per_domain_concurrency=relay.per_domain_concurrency,
        mx_port=relay.mx_port,
        smarthost=cfg.host_port(relay.smarthost) if relay.smarthost else None,
        smarthost_tls=relay.smarthost_tls,
        smarthost_auth=auth,
        max_received=relay.max_received,
        timeouts=client_timeouts(relay.timeouts),
        tls_context=tls_context,
        lmtp=cfg.lmtp_target(config.delivery.lmtp) if config.delivery.lmtp else None,
    )


def client_timeouts(t: cfg.RelayTimeouts) -> Timeouts:
    """The queue's client timeouts from `relay.timeouts`: `command` for every
    command step, QUIT at most 10 s (the outcome is known by then), a reused
    connection's RSET at most 20 s (a fresh connection is the remedy)."""
    command = {s: t.command for s in ("greeting", "helo", "tls", "auth", "mail", "rcpt")}
    return Timeouts(
        connect=t.connect,
        data_init=t.data_init,
        data_block=t.data_block,
        data_end=t.data_end,
        quit=min(10.0, t.command),
        rset=min(20.0, t.command),
        **command,
    )


@dataclass(frozen=True)
class Prepared:
    """What the master reads with its own rights before a worker drops them:
    the TLS key and certificate, the DKIM signing key, the smarthost password."""

    tls_context: ssl.SSLContext | None
    signer: Any  # mailauth's signer, None when dkim: is off
    settings: RunnerSettings


def prepare(config: Config) -> Prepared:
    """Read the config's secrets; ConfigError when one cannot be used."""
    try:
        signer = build_signer(config.dkim)
    except OSError as exc:  # a key gone since the config check
        raise ConfigError(f"dkim: cannot read '{exc.filename}': {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"dkim: {exc}") from None
    return Prepared(
        tls.server_context(config.tls, config.hostname), signer, runner_settings(config)
    )


def plan_change(
    running: Config, new: Config, *, allow_restart_keys: bool = False
) -> tuple[Config, ConfigChange]:
    """The config that would run after a change to `new`, and what changed.

    Unless `allow_restart_keys` (reload: the rest is applied, those are
    reported), a changed key that needs a restart makes it a `ConfigError`.
    The config that would run (with those keys at their running values) must
    pass the start's whole-config check: a file valid on its own may not
    leave a running listener unable to serve (a `submissions` listener
    without TLS), else `ConfigError`.
    """
    changed = cfg.changed_keys(cfg.to_mapping(running), cfg.to_mapping(new))
    restart = cfg.needs_restart(changed)
    if restart and not allow_restart_keys:
        raise ConfigError(f"{restart[0]}: cannot change while running; restart geosmtp")
    if restart:  # keep the running values of those keys
        kept = {k: getattr(running, k) for k in {r.split(".")[0] for r in restart}}
        if "log" in kept:
            kept["log"] = dataclasses.replace(new.log, dir=running.log.dir)
        new = dataclasses.replace(new, **kept)
        try:
            cfg._check(new)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (keeping the running {', '.join(restart)}, which need a restart to change)"
            ) from None
    else:
        cfg._check(new)
    return new, ConfigChange(changed, restart)


class Master(Protocol):
    """What a worker asks of the master (`server.worker.MasterLink`)."""

    def change(self, mapping: dict) -> ConfigChange: ...
    def reload(self) -> ConfigChange: ...


class App:
    def __init__(
        self,
        config: Config,
        prepared: Prepared | None = None,
        *,
        master: Master | None = None,
        share: tuple[int, int] = (0, 1),
        shared: SharedState | None = None,
    ) -> None:
        """`prepared` comes from the master (else it is read here); `master`
        applies configuration changes to every worker; `share` is this
        worker's part of the outbound queue (index, of how many); `shared`
        the state all workers count in (connections, failed logins)."""
        prepared = prepared or prepare(config)
        self.config = config
        self.master = master
        self.share = share
        self._signer = prepared.signer
        self.metrics = Metrics()
        # A worker process counts its connections and its clients' failed
        # logins in the state it shares with the others (`shared`), made by the
        # master before the fork and bound to the worker's slot; else in itself.
        self.shared = shared
        # The users and the login throttle; one password check per core in the
        # whole server: this worker's share.
        self.logins = Logins(
            self.metrics,
            self.run_blocking,
            checks=share_of_limit(os.cpu_count() or 1, share),
            records=shared.throttle_records if shared else None,
        )
        # The per-client limits (client_limits:), counted across the workers.
        self.anvil = Anvil(
            shared.clients if shared else SharedClientTable.private(100_000),
            self.metrics,
            lambda peer: bool(self.trusted_networks) and self._trusted(peer),
        )
        self.tls_context = prepared.tls_context
        # Storage: the spool and the Maildirs share one naming scheme and, when they
        # are on one filesystem, delivery is a hard link.
        names = UniqueNames(config.hostname)
        self.store = MaildirStore(
            config.mail_dir, fsync=config.fsync, names=names, offload=in_thread
        )
        self.spool = Spool(config.spool_path, names)
        # The outbound queue: remote recipients of clients that may relay.
        self.queue_store = QueueStore(config.queue_path, fsync=config.fsync, offload=in_thread)
        # One resolver (dns.nameservers, dns.timeout) for the relay's MX lookups
        # and the sender checks' SPF, DKIM and DMARC questions.
        self.resolver = Resolver(config.dns.nameservers, config.dns.timeout)
        # The relay's SMTP client, with its cache of open connections to next hops.
        self.relay = Relay(config.relay.connection_reuse_limit, config.relay.connection_cache_time)
        # Delivery reports, built in the queue and handed to the router (`_inject_report`).
        self.reporter = Reporter(
            self.spool,
            config.hostname,
            self._inject_report,
            open_queued=self.queue_store.open_message,
            # Hashing a returned original is CPU and file work: in the threadpool.
            sign=(
                None
                if self._signer is None
                else partial(in_thread, sign_file, self._signer, self.spool)
            ),
            max_full_size=config.limits.max_message_size // 2,
            max_lifetime=prepared.settings.schedule.max_lifetime,
        )
        self.queue = QueueRunner(
            self.queue_store,
            dataclasses.replace(
                prepared.settings,
                concurrency=share_of_limit(prepared.settings.concurrency, share),
                per_domain_concurrency=share_of_limit(
                    prepared.settings.per_domain_concurrency, share
                ),
            ),
            self.resolver,
            self.reporter.queued,
            metrics=self.metrics,
            send=self.relay.deliver,
        )
        self.metrics.watch_queue(self.queue)  # the queue gauges, read at scrape time
        # Filter stages (the `filters:` section), rebuilt at each config change.
        self.filters = Filters(self.spool)
        self.metrics.watch_filters(self.filters.slots, lambda: self.config.filter_concurrency)
        # Local mail: the Maildirs, or with delivery.lmtp an LMTP server, through
        # the queue (its runner reports those deliveries, not the pipeline).
        lmtp = config.delivery.lmtp is not None
        queue = QueueDestination(
            self.queue_store, self.queue, lmtp_domain=config.hostname if lmtp else None
        )
        self.pipeline = Pipeline(
            Router(local=queue if lmtp else MaildirDestination(self.store), remote=queue),
            after_delivery=None if lmtp else self.reporter.delivered_locally,
            observer=self.metrics,
        )
        self.protocols = Protocols(*PROTOCOLS)
        self.listeners = Listeners(self, self.protocols, connections=shared)
        self.cluster = Cluster(self, run_dir())
        self._access_writer: gevent.Greenlet | None = None
        self._share_lock: int | None = None
        self._queue_starter: gevent.Greenlet | None = None
        self.apply_config(config)

    # ------------------------------------------------------------ config

    def apply_config(self, config: Config) -> None:
        """Derive what each new session needs from the config (sessions keep theirs)."""
        sender = self.auth_stages(config)  # may raise ConfigError: before anything changes
        self.config = config
        domains = Domains(config.domains)  # one IDNA-aware comparison for all
        self.policy = RecipientPolicy(
            local_domains=domains,
            users=frozenset(config.users),
            accept_unknown=config.unknown_recipients == "accept",
            postmaster=config.postmaster,
            hostname=config.hostname,
            relay=True,  # the outbound queue takes remote recipients
        )
        # The config's `limits:` and `extensions:` are the core's own dataclasses.
        self.limits = config.limits
        # A failed report returns the original whole up to half the size limit.
        self.reporter.max_full_size = config.limits.max_message_size // 2
        self.reporter.hostname = config.hostname
        self.extensions = config.extensions
        self.logins.configure(config, domains)
        self.trusted_networks = [
            ipaddress.ip_network(n, strict=False) for n in config.trusted_networks
        ]
        self.anvil.configure(config.client_limits)
        self.filters.configure(
            dataclasses.replace(
                config, filter_concurrency=share_of_limit(config.filter_concurrency, self.share)
            )
        )
        self.pipeline.stages = self.pipeline_stages(*sender)
        for stage in self.pipeline.stages:
            self.metrics.stage_declared(stage.name)

    def pipeline_stages(self, checks: list, signing: list) -> list:
        """Every stage a message goes through, in order: the sender checks first
        (on the message as the sender made it), the filters, DKIM signing last
        (on the message as it leaves). Messages already in the pipeline go on
        with the stages they began with."""
        return [*checks, *self.filters.stages, *signing]

    def auth_stages(self, config: Config) -> tuple[list, list]:
        """The stages of `auth_checks:` and `dkim:`: (the sender checks, signing)."""
        checks: list = []
        try:
            if config.auth_checks.enabled:
                checks.append(
                    SenderChecks(
                        config.auth_checks,
                        config.hostname,
                        self.resolver,
                        self.spool,
                        self._trusted,
                        in_thread,
                    )
                )
        except OSError as exc:  # the suffix list, gone since the config check
            raise ConfigError(
                f"auth_checks: cannot read '{exc.filename}': {exc.strerror}"
            ) from None
        signer = self._signer
        signing = [] if signer is None else [DKIMSign(signer, self.spool, self._trusted, in_thread)]
        return checks, signing

    def security(self, listener: Listener, peer: str) -> Security:
        """What a client on `listener` from `peer` may do; see `Security`."""
        config = self.config
        return Security(
            tls_available=self.tls_context is not None,
            tls_active=listener.role in cfg.IMPLICIT_TLS_ROLES,
            auth_available=bool(self.logins.users),
            auth_plaintext=config.auth.allow_plaintext,
            auth_required=listener.role != "mx",
            trusted=bool(self.trusted_networks) and self._trusted(peer),
            sender_must_match=config.auth.sender_must_match,
        )

    def _trusted(self, peer: str) -> bool:
        return trusted(peer, self.trusted_networks)

    def lmtp_client_allowed(self, peer: str) -> bool:
        """A TCP `lmtp` listener serves the MTAs in `trusted_networks`, or, when
        there is none, on loopback: LMTP has no AUTH to tell anyone else apart."""
        if self.trusted_networks:
            return self._trusted(peer)
        try:
            return ipaddress.ip_address(peer.partition("%")[0]).is_loopback
        except ValueError:
            return False

    #: CPU-heavy or blocking work (password checks) in the hub's threadpool.
    run_blocking = staticmethod(in_thread)

    def change_config(self, mapping: dict) -> ConfigChange:
        """Run the server on the config `mapping` (the admin API's PATCH): the
        master checks it and starts workers on it; open sessions finish on the
        config they began with. ConfigError when it is refused (nothing changes)."""
        if self.master is None:
            raise ConfigError("configuration changes need the master process")
        return self._now_running(self.master.change(mapping))

    def reload(self) -> ConfigChange:
        """Re-read the config file, in the master; an invalid one changes nothing
        (ConfigError)."""
        if self.master is None:
            raise ConfigError("reload: needs the master process")
        return self._now_running(self.master.reload())

    def retire(self, mapping: dict) -> None:
        """This worker's generation is being replaced by workers on `mapping`:
        the timeouts of its open sessions become the new ones (as one process
        applied them to every session); the rest stays as the sessions began."""
        new = cfg.from_mapping(mapping)
        self.config = dataclasses.replace(self.config, timeouts=new.timeouts)

    def _now_running(self, change: ConfigChange) -> ConfigChange:
        """This worker is retiring (it accepts no one now): its views (the API's
        answer to this request) show the config the new workers run."""
        if change.config is not None:
            self.apply_config(cfg.from_mapping(change.config))
        return change

    # ----------------------------------------------------------- reports

    def _inject_report(self, report: ReportMessage) -> Verdict:
        """The port the queue's reports come in by: to the sender's mailbox when
        it is local, else into the queue, through the router alone (no stage,
        no after-delivery report: the data path runs one way). A sender there
        is no way to is a permanent failure (the report is dropped, logged)."""
        try:
            mailbox = parse_mailbox(report.to, utf8=True)
        except SyntaxProblem as exc:
            return Verdict(False, reason=f"not an address ({exc})")
        recipient = self.policy.resolve(mailbox, may_relay=True)
        if not isinstance(recipient, Recipient):
            return Verdict(False, reason=f"{recipient.code} {recipient.text}")
        envelope = Envelope(self.config.hostname, True, None, recipients=(recipient,))
        message = Message(envelope, report.spool, report.queue_id, report.size)
        return deliver(self.pipeline.router, message)

    # ---------------------------------------------------------- running

    @property
    def by_id(self) -> dict[str, Session]:
        """The open sessions of every listener, by session id."""
        return self.listeners.by_id

    def start(
        self,
        bound: list[tuple[Listener, socket.socket]],
        *,
        clean: bool = False,
    ) -> None:
        """Check the storage, serve the `bound` listeners, take this worker's
        share of the outbound queue. `clean`: no other process serves yet, so
        what a crash left half-written (spool files, queue entries) may go."""
        self.queue_store.link = self.spool.same_filesystem(self.queue_store.root)
        if not self.spool.same_filesystem(self.store.root):
            self.store.link = False
            logger.warning(
                "spool_dir {} is not on the filesystem of mail_dir {}: "
                "delivery copies each message instead of linking it",
                self.spool.root,
                self.store.root,
            )
        if clean:
            stale = self.spool.remove_stale()
            if stale:
                logger.info("removed {} stale spool files (never acknowledged)", stale)
        self._access_writer = gevent.spawn(logs.access_log.run)
        self.cluster.start()
        self.listeners.start(bound)
        self.metrics.start()  # with workers: writes the queue and filter gauges each second
        index, shares = self.share
        take_share(index, shares)
        path = f"{self.queue_store.root}/.share-{index}.lock"
        self._share_lock = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._take_share_lock():  # the usual case: the queue is loaded before "ready"
            self._start_queue(clean)
        else:
            self._queue_starter = gevent.spawn(self._wait_for_share)

    def _take_share_lock(self) -> bool:
        try:
            fcntl.flock(self._share_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]  # start() opened it
            return True
        except BlockingIOError:
            return False

    def _wait_for_share(self) -> None:
        """This worker's share of the queue is still delivered by a worker of
        the generation before a reload, which holds the share's lock until it
        has finished its sessions and ended: deliver it once that one is gone."""
        while not self._take_share_lock():
            gevent.sleep(SHARE_POLL)
        logger.debug("queue share {}/{}: the previous owner has ended", *self.share)
        self._start_queue(False)

    def _start_queue(self, clean: bool) -> None:
        index, shares = self.share

        def mine(queue_id: str) -> bool:
            return share_of(queue_id, shares) == index

        self.queue.start(mine, clean)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions finish for `grace` seconds, then stop the rest.
        The queue share is delivered until then, and let go last."""
        grace = self.config.timeouts.shutdown_grace if grace is None else grace
        if self._queue_starter is not None:
            self._queue_starter.kill()
        self.listeners.close()  # first: a reload's new workers take every new client
        self.listeners.stop(grace)
        self.cluster.stop()
        self.queue.stop(timeout=grace)
        self.relay.close()  # the connections kept for more messages
        self.metrics.stop()
        if self._access_writer is not None:
            self._access_writer.kill()
        logs.access_log.flush()
        if self._share_lock is not None:
            os.close(self._share_lock)  # the next owner of the share may start
            self._share_lock = None
