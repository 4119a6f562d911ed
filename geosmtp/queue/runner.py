"""The queue runner: delivers queued messages, retries, gives up, reports.

One greenlet keeps the schedule: it wakes when the earliest entry is due (or
when a new one arrives) and starts an attempt for every due entry, at most
`concurrency` at once, and at most as many connections to one destination
(a domain, or the smarthost) as its adaptive limit allows: it starts at 5,
grows while deliveries succeed up to `per_domain_concurrency`, shrinks on
connection failures and 421s, and a destination that keeps failing at 1 is
suspended for a while (`concurrency.py`, Postfix's destination concurrency
feedback). An attempt takes an entry's pending
recipients domain by domain (all of one domain in one SMTP transaction, the
client splitting nothing: RFC 5321 §4.5.3.1.8 says servers take 100), finds
the hosts (the smarthost, or the domain's MX per RFC 5321 §5), and applies the
outcome per recipient: delivered (the record is rewritten and fsynced at
once), a permanent failure (bounced), or a temporary one (retried on the
schedule until the lifetime is over, then bounced).

Local recipients queued for LMTP (`delivery.lmtp`, `destination.LMTPDestination`)
are one more destination: all of an entry's go in one LMTP transaction
(RFC 2033) to the configured server, each recipient's reply after the data
deciding for it as a remote server's RCPT reply does (delivered, deferred,
bounced), under the same schedule, concurrency feedback and reports.

Reports to the sender (RFC 3461/3464) are made by the `report` callable the
app gives (`reports.Reporter.queued`: it builds the DSN here in `queue/` and
hands it to the router's destinations through its one port, never back
through the pipeline's stages); never to the null sender.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import gevent
from gevent.event import Event
from gevent.pool import Pool
from loguru import logger

from .. import logs
from ..relay.client import AttemptResult, Outcome, deliver
from ..relay.mx import DNSError, DNSPermanentError, DNSTemporaryError, Host, Resolver
from ..storage import StorageError
from ..storage.spool import read_return_path
from .concurrency import DestinationLimits, Slot, Verdict
from .dsn import Kind
from .reports import ReportNotStored
from .schedule import RetrySchedule, delay_warning_due
from .store import (
    DELIVERED,
    FAILED,
    PENDING,
    Quarantined,
    QueuedRecipient,
    QueueRecord,
    QueueStore,
    shortened,
)

#: How a finished recipient is reported: ("failed" | "delayed" | "delivered").
#: It raises when the report could not be stored (`ReportNotStored`, or any
#: other error): a bounce is then deferred with its recipients, never dropped.
Report = Callable[[QueueRecord, list[QueuedRecipient], Kind], None]


@dataclass
class RunnerSettings:
    """What the `relay:` section of the config says about delivering."""

    hostname: str
    schedule: RetrySchedule
    delay_warning: float = 4 * 3600
    concurrency: int = 20
    per_domain_concurrency: int = 20
    mx_port: int = 25
    smarthost: tuple[str, int] | None = None
    smarthost_tls: str = "starttls"
    smarthost_auth: tuple[str, str] | None = None
    max_received: int = 50
    #: the client's timeouts; None: RFC 5321 §4.5.3.2's
    timeouts: Any = None
    tls_context: Any = None  # for a smarthost's certificate; MX delivery is opportunistic
    #: `delivery.lmtp`: the LMTP server local recipients go to, (host, port) or
    #: (a UNIX socket's path, 0); None: they go to the Maildirs, never queued.
    lmtp: tuple[str, int] | None = None


#: The group of an entry's LMTP recipients in `_try` (no domain is empty).
LMTP_GROUP = ""


@dataclass(order=True)
class _Due:
    at: float
    queue_id: str = field(compare=False)


class QueueRunner:
    def __init__(
        self,
        store: QueueStore,
        settings: RunnerSettings,
        resolver: Resolver,
        report: Report,
        *,
        metrics: Any = None,
        send: Callable[..., AttemptResult] = deliver,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.resolver = resolver
        self.report = report
        self.metrics = metrics
        self.send = send
        self.clock = clock
        self.records: dict[str, QueueRecord] = {}
        self._heap: list[_Due] = []
        self._busy: set[str] = set()  # entries with an attempt in flight
        #: what an operator asked while an attempt was in flight, to do at its end
        self._after_attempt: dict[str, list[Callable[[], None]]] = {}
        self._wake = Event()
        self._pool = Pool(settings.concurrency)
        #: each destination's adaptive limit; a suspended one waits the first retry delay
        self._limits = DestinationLimits(
            lambda: self.settings.per_domain_concurrency,
            lambda: self.settings.schedule.delay_after(1),
            clock,
        )
        self._loop: gevent.Greenlet[[], None] | None = None

    # ---------------------------------------------------------- control

    def start(self, mine: Callable[[str], bool] | None = None, clean: bool = True) -> None:
        """Read the queue from disk (the entries `mine` selects: this worker's
        share) and start delivering; `clean` as for `QueueStore.load`."""
        loaded = self.store.load(mine, clean)
        for bad in loaded.quarantined:
            self._report_quarantined(bad)
        if loaded.orphans:
            logger.info("queue: removed {} messages never acknowledged", loaded.orphans)
        for record in loaded.records:
            if record.id not in self.records:  # submitted while it waited for its share
                self._track(record)
        if loaded.records:
            logger.info("queue: {} messages to deliver", len(loaded.records))
        self._loop = gevent.spawn(self._run)

    def _report_quarantined(self, bad: Quarantined) -> None:
        """One log line per entry that could not be used: its file, the field, where it went."""
        problem = logs.clean(bad.problem)
        if bad.error is None:
            logger.warning(
                "queue {}: {} cannot be used ({}): moved to {}",
                bad.queue_id,
                bad.record,
                problem,
                ", ".join(bad.moved),
            )
            if self.metrics is not None:
                self.metrics.queue_quarantined.inc()
            return
        # Left in place (not loaded, not removed): the next start tries again.
        logger.error(
            "queue {}: {} cannot be used ({}) nor moved to quarantine/: {}",
            bad.queue_id,
            bad.record,
            problem,
            logs.clean(bad.error),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop starting attempts; let those in flight finish for `timeout` seconds.
        Anything still running then is killed: its recipients stay pending on
        disk and are tried again after a restart."""
        if self._loop is not None:
            self._loop.kill()
        self._pool.join(timeout=timeout)
        self._pool.kill(block=True, timeout=5)

    def submit(self, record: QueueRecord) -> None:
        """A new entry (already durable on disk): try it now."""
        self._track(record)

    def flush(self, queue_id: str | None = None) -> int:
        """Try now, whatever the schedule says: one entry, or all. How many."""
        ids = [queue_id] if queue_id is not None else list(self.records)
        now = self.clock()
        count = 0
        for qid in ids:
            record = self.records.get(qid)
            if record is None:
                continue
            for rcpt in record.pending:
                rcpt.next_attempt = now
            heapq.heappush(self._heap, _Due(now, qid))
            count += 1
        self._wake.set()
        return count

    # ------------------------------------------------------------- loop

    def _track(self, record: QueueRecord) -> None:
        self.records[record.id] = record
        heapq.heappush(self._heap, _Due(self._due(record), record.id))
        self._wake.set()

    @staticmethod
    def _due(record: QueueRecord) -> float:
        """When the entry needs an attempt: now when a report is owed (a crash
        came before it was made), else at its earliest pending recipient's."""
        if record.unreported:
            return 0.0
        return min((r.next_attempt for r in record.pending), default=0.0)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            while self._heap and self._heap[0].at <= now:
                due = heapq.heappop(self._heap)
                record = self.records.get(due.queue_id)
                if record is None or record.held or record.id in self._busy:
                    continue
                if self._due(record) > now:  # rescheduled meanwhile: a later entry is there
                    continue
                self._busy.add(record.id)
                self._pool.spawn(self._attempt, record)
            wait = self._heap[0].at - now if self._heap else None
            self._wake.wait(timeout=None if wait is None else max(wait, 0.01))

    def _attempt(self, record: QueueRecord) -> None:
        try:
            self._try(record)
        except Exception:  # a bug must not stop the queue: the entry is retried later
            logger.exception("queue {}: attempt failed with an internal error", record.id)
            now = self.clock()
            for rcpt in record.pending:
                if rcpt.next_attempt > now:  # this attempt's outcome is applied already
                    continue
                rcpt.next_attempt = now + self.settings.schedule.delay_after(max(rcpt.attempts, 1))
                rcpt.status, rcpt.last_error = "4.3.0", _INTERNAL_ERROR  # X.3.0: other
                self._log_attempt(record, rcpt, "none", None, _INTERNAL_ERROR)
            try:  # the reports of the domains tried before the error
                self._settle(record)
            except Exception:
                logger.exception("queue {}: its reports failed with an internal error", record.id)
        finally:
            self._attempt_ended(record.id)
            if record.id in self.records:
                if record.done:
                    self._finish(record)
                else:
                    heapq.heappush(self._heap, _Due(self._due(record), record.id))
                    self._wake.set()

    def _try(self, record: QueueRecord) -> None:
        now = self.clock()
        by_domain: dict[str, list[QueuedRecipient]] = defaultdict(list)
        for rcpt in record.pending:
            if rcpt.next_attempt <= now:
                by_domain[LMTP_GROUP if rcpt.lmtp else rcpt.domain].append(rcpt)
        groups = list(by_domain.items())
        for i, (domain, rcpts) in enumerate(groups):
            with self._limits.slot(self._destination(domain)) as slot:
                if slot.suspended is not None:
                    outcome = self._suspended(record, slot.destination, rcpts, slot.suspended)
                else:
                    outcome = self._deliver_domain(record, domain, rcpts, slot)
            logger.debug("queue {}: {} to {}", record.id, outcome, domain)
            if i < len(groups) - 1:
                # Delivered recipients are never sent twice; a failed one (or
                # one delivered with NOTIFY=SUCCESS) is saved with its report
                # due, so a crash before `_settle` makes it at the next start.
                self._save(record)
        self._settle(record)

    def _settle(self, record: QueueRecord) -> None:
        """Make the reports due (this attempt's, and any an earlier one left:
        a crash, an internal error), then save the record. A crash between the
        two makes a report twice, never not at all."""
        self._reports(record)
        if not all(r.state == DELIVERED for r in record.recipients):
            self._save(record)
        # Delivered everywhere: the entry is removed next, so rewriting its
        # record first would only cost a pair of fsyncs. A crash before the
        # removal re-sends this last attempt, the one in flight, which is what
        # may be sent twice (and its success reports).

    def _destination(self, domain: str) -> str:
        """Whose concurrency a domain's delivery counts against: the smarthost's
        (everything goes there then), or the domain's own; the LMTP server's."""
        if domain == LMTP_GROUP:
            return f"lmtp:{self._lmtp_name()}"
        if self.settings.smarthost is not None:
            host, port = self.settings.smarthost
            return f"[{host}]:{port}"
        return domain

    def _suspended(
        self, record: QueueRecord, destination: str, rcpts: list[QueuedRecipient], why: Verdict
    ) -> str:
        """The destination is suspended (it kept failing): defer without connecting."""
        diagnostic = f"x-geosmtp; delivery to {destination} temporarily suspended: " + (
            why.diagnostic.removeprefix("x-geosmtp; ")
        )
        for rcpt in rcpts:
            self._apply(record, rcpt, Outcome.TEMPORARY, why.status, diagnostic, None)
            self._log_attempt(record, rcpt, "none", None, diagnostic)
        return "suspended"

    def _deliver_domain(
        self,
        record: QueueRecord,
        domain: str,
        rcpts: list[QueuedRecipient],
        slot: Slot | None = None,
    ) -> str:
        started = time.perf_counter()
        try:
            hosts, port, tls = self._route(domain)
        except DNSError as exc:
            permanent = isinstance(exc, DNSPermanentError)
            for rcpt in rcpts:
                self._apply(
                    record,
                    rcpt,
                    Outcome.PERMANENT if permanent else Outcome.TEMPORARY,
                    exc.status,
                    exc.diagnostic,
                    None,
                )
                self._log_attempt(record, rcpt, "none", None, exc.diagnostic)
            return "dns: " + str(exc)
        lmtp = domain == LMTP_GROUP
        with self.store.open_message(record.id) as message:
            # A relaying server must not pass the Return-Path on (RFC 5321 §4.4);
            # an LMTP server adds its own from MAIL FROM at the final delivery.
            read_return_path(message)
            result = self._send(record, rcpts, hosts, port, tls, message, lmtp)
        if slot is not None:
            slot.feedback(result)  # the destination's limit moves with what it did
        if self.metrics is not None:
            self.metrics.relay_attempt_seconds.observe(time.perf_counter() - started)
        relay = f"lmtp:{result.relay}" if lmtp else result.relay
        for n, rcpt in enumerate(rcpts):
            # LMTP: by place, as sent (two spellings may share one mailbox)
            r = result.recipients[n] if lmtp else result[rcpt.address]
            self._apply(
                record,
                rcpt,
                r.outcome,
                r.status,
                r.diagnostic,
                result.remote_mta,
                result.dsn,
            )
            self._log_attempt(record, rcpt, relay, result.tls, r.diagnostic)
        return relay

    def _log_attempt(
        self,
        record: QueueRecord,
        rcpt: QueuedRecipient,
        relay: str,
        tls: str | None,
        diagnostic: str,
    ) -> None:
        """The access-log line of one recipient's attempt, once `_apply` has
        decided what became of it: Postfix's words for the outcome (`sent`,
        `deferred`, `bounced`, as the relay metrics count them), the time since
        the message arrived, and the reason as the DSN's Diagnostic-Code puts
        it (with "given up after N attempts" at the end of the lifetime)."""
        logs.access_log.write(
            logs.access_line(
                queue=record.id,
                to=f"<{rcpt.address}>",
                relay=relay,
                tls=tls,
                delay=f"{max(self.clock() - record.arrival, 0.0):.2f}",
                status=rcpt.status,
                outcome=_OUTCOME_WORDS[rcpt.state],
                reason=diagnostic if rcpt.state == DELIVERED else rcpt.last_error,
            )
        )

    def _send(
        self,
        record: QueueRecord,
        rcpts: list[QueuedRecipient],
        hosts: list[Host],
        port: int,
        tls: str,
        message: BinaryIO,
        lmtp: bool = False,
    ) -> AttemptResult:
        settings = self.settings
        return self.send(
            hosts,
            port,
            record.sender,
            [r.lmtp if lmtp else r.address for r in rcpts],
            message,
            helo_name=settings.hostname,
            tls=tls,
            tls_context=settings.tls_context if settings.smarthost else None,
            auth=settings.smarthost_auth if settings.smarthost else None,
            timeouts=settings.timeouts,
            needs_smtputf8=record.smtputf8,
            needs_8bitmime=record.body == "8BITMIME",
            max_received=settings.max_received,
            # RFC 3461 §6.2.1: the DSN parameters go on to a next hop that offers DSN
            envid=record.envid,
            ret=record.ret,
            notify=[r.notify for r in rcpts],
            orcpt=[r.orcpt for r in rcpts],
            lmtp=lmtp,
        )

    def _route(self, domain: str) -> tuple[list[Host], int, str]:
        settings = self.settings
        if domain == LMTP_GROUP:
            host, port = self._lmtp_target()
            return [Host(host)], port, "none"
        if settings.smarthost is not None:
            host, port = settings.smarthost
            return [Host(host)], port, settings.smarthost_tls
        return self.resolver.resolve_mx(domain), settings.mx_port, "opportunistic"

    def _lmtp_target(self) -> tuple[str, int]:
        """The LMTP server; an entry queued for LMTP before a restart that
        unset `delivery.lmtp` waits (deferred, as a failed lookup) rather than
        going anywhere the operator did not say."""
        if self.settings.lmtp is None:
            raise DNSTemporaryError(
                "queued for LMTP, and delivery.lmtp is not set",
                "4.3.5",  # RFC 3463 X.3.5: system incorrectly configured
            )
        return self.settings.lmtp

    def _lmtp_name(self) -> str:
        if self.settings.lmtp is None:
            return "none"
        host, port = self.settings.lmtp
        return host if host.startswith("/") else f"[{host}]:{port}"

    def _apply(
        self,
        record: QueueRecord,
        rcpt: QueuedRecipient,
        outcome: Outcome,
        status: str,
        diagnostic: str,
        remote_mta: str | None,
        dsn_passed_on: bool = False,
    ) -> None:
        """What became of `rcpt` at this attempt; `dsn_passed_on`: the server
        that took it offered DSN, so NOTIFY and ORCPT went on with it."""
        now = self.clock()
        rcpt.attempts += 1
        rcpt.status = status
        # Cut to what a record holds (`store.MAX_TEXT`): a long reply, or an
        # exception's text, must never make the record unreadable at the next start.
        rcpt.remote_mta = None if remote_mta is None else shortened(remote_mta)
        if outcome is Outcome.DELIVERED:
            rcpt.state = DELIVERED
            # A `relayed` notice only where the next hop did not take the DSN
            # request (RFC 3461 §6.2.1): one that did reports the delivery itself.
            rcpt.report_due = _wants(rcpt, "SUCCESS", False) and not dsn_passed_on
            rcpt.last_error = None
            self._count("sent")
            return
        rcpt.last_error = shortened(diagnostic)
        if outcome is Outcome.TEMPORARY:
            later = self.settings.schedule.next_attempt(record.arrival, rcpt.attempts, now)
            if later is not None:
                rcpt.next_attempt = later
                self._count("deferred")
                return
            rcpt.last_error = shortened(diagnostic, f" (given up after {rcpt.attempts} attempts)")
            rcpt.status = "4.4.7" if status.startswith("4") else status  # X.4.7: expired
        rcpt.state = FAILED
        rcpt.report_due = _wants(rcpt, "FAILURE", True)
        self._count("bounced")

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.relay_deliveries.labels(result).inc()

    # ---------------------------------------------------------- reports

    def _reports(self, record: QueueRecord) -> None:
        """The reports due (`report_due`, set by `_apply` as NOTIFY asks), then
        the delay reports; each made clears its recipients' marks."""
        unreported = record.unreported
        bounced = [r for r in unreported if r.state == FAILED]
        delivered = [r for r in unreported if r.state == DELIVERED]
        if bounced and not self._report(record, bounced, "failed"):
            self._defer_bounce(record, bounced)
        # Not stored: logged. The mail went, and sending it again for its
        # report would be worse than the report missing.
        self._report(record, delivered, "delivered")
        for rcpt in unreported:
            rcpt.report_due = False
        if delay_warning_due(record.arrival, self.clock(), self.settings.delay_warning, False):
            late = [r for r in record.pending if not r.delay_warned and _wants(r, "DELAY", True)]
            if late and self._report(record, late, "delayed"):
                for r in late:
                    r.delay_warned = True  # else warned at a later attempt

    def _report(self, record: QueueRecord, rcpts: list[QueuedRecipient], kind: Kind) -> bool:
        """Report `kind` about `rcpts` to the sender; False when it was not stored."""
        if not rcpts:
            return True
        if not record.sender:  # never a report to the null sender (RFC 5321 §6.1)
            logger.warning(
                "queue {}: {} for {} not reported: the sender is <>",
                record.id,
                kind,
                ", ".join(r.address for r in rcpts),
            )
            return True
        try:
            self.report(record, rcpts, kind)
        except ReportNotStored as exc:
            logger.error(
                "queue {}: could not store the {} report to <{}>: {}",
                record.id,
                kind,
                record.sender,
                logs.clean(exc),
            )
            return False
        except Exception:
            logger.exception(
                "queue {}: could not report {} to <{}>", record.id, kind, record.sender
            )
            return False
        return True

    def _defer_bounce(self, record: QueueRecord, rcpts: list[QueuedRecipient]) -> None:
        """The bounce for `rcpts` was not stored: they are deferred instead of
        given up (Postfix's "bounce or trace service failure"), so the message
        stays queued and the failure, and its bounce, come again at the next
        attempt. Nothing is lost while the disk is full."""
        now = self.clock()
        for rcpt in rcpts:
            rcpt.state = PENDING
            rcpt.next_attempt = now + self.settings.schedule.delay_after(max(rcpt.attempts, 1))
            # The attempt's line said "bounced": this one says what became of it.
            logs.access_log.write(
                logs.access_line(
                    queue=record.id,
                    to=f"<{rcpt.address}>",
                    relay="none",
                    delay=f"{max(now - record.arrival, 0.0):.2f}",
                    status="4.3.0",
                    outcome="deferred",
                    reason=_BOUNCE_NOT_STORED,
                )
            )
        logger.warning(
            "queue {}: {} deferred, not given up: their bounce could not be stored",
            record.id,
            ", ".join(f"<{r.address}>" for r in rcpts),
        )

    def _finish(self, record: QueueRecord) -> None:
        self.records.pop(record.id, None)
        self.store.remove(record.id)
        states = ", ".join(_final_state(r) for r in record.recipients)
        logger.info("queue {}: done ({})", record.id, states)

    # ------------------------------------------------------------ views

    def pending_count(self) -> int:
        return len(self.records)

    def oldest_age(self) -> float:
        now = self.clock()
        return max((now - r.arrival for r in self.records.values()), default=0.0)

    def held_count(self) -> int:
        return sum(1 for r in self.records.values() if r.held)

    # ------------------------------------------------------- operations
    # What `geosmtp queue` and /api/v1/queue do. An unknown id is a KeyError.

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first, as `queue list` shows it."""
        now = self.clock()
        records = sorted(self.records.values(), key=lambda r: (r.arrival, r.id))
        return [self._summary(r, now) for r in records]

    def entry(self, queue_id: str) -> dict[str, Any] | None:
        """One entry in full (`queue show`), or None."""
        record = self.records.get(queue_id)
        if record is None:
            return None
        out = self._summary(record, self.clock())
        out.update(
            envid=record.envid,
            ret=record.ret,
            smtputf8=record.smtputf8,
            body=record.body,
            client=record.client,
            auth_user=record.auth_user,
        )
        for view, rcpt in zip(out["recipients"], record.recipients, strict=True):
            view.update(
                notify=rcpt.notify,
                orcpt=rcpt.orcpt,
                remote_mta=rcpt.remote_mta,
                delay_warned=rcpt.delay_warned,
                report_due=rcpt.report_due,
            )
        return out

    def _summary(self, record: QueueRecord, now: float) -> dict[str, Any]:
        return {
            "id": record.id,
            "sender": record.sender,
            "arrival": _iso(record.arrival),
            "age_seconds": round(max(now - record.arrival, 0.0), 3),
            "size": record.size,
            "held": record.held,
            "in_flight": record.id in self._busy,
            "recipients": [
                {
                    "address": r.address,
                    "state": r.state,
                    "attempts": r.attempts,
                    "next_attempt": (
                        None if r.state != PENDING or record.held else _iso(r.next_attempt)
                    ),
                    "status": r.status,
                    "last_error": r.last_error,
                }
                for r in record.recipients
            ],
        }

    def _get(self, queue_id: str) -> QueueRecord:
        record = self.records.get(queue_id)
        if record is None:
            raise KeyError(queue_id)
        return record

    def hold(self, queue_id: str) -> bool:
        """No more attempts for this entry until `release`; kept on disk, so a
        restart keeps it held. An attempt already in flight ends as it would
        (its outcome is applied). False if it was held already."""
        record = self._get(queue_id)
        if record.held:
            return False
        record.held = True  # first: the loop starts nothing held from here on
        self._save_when_idle(record)
        logger.info("queue {}: held by the administrator", queue_id)
        return True

    def release(self, queue_id: str) -> bool:
        """Undo `hold`: the entry is tried at once. False if it was not held."""
        record = self._get(queue_id)
        if not record.held:
            return False

        def released() -> None:
            if self.records.get(queue_id) is not record:  # deleted meanwhile
                return
            # Saved as released while still held in memory: no attempt (which
            # saves the record too) can start before the write is done.
            self._save(dataclasses.replace(record, held=False))
            record.held = False
            self.flush(queue_id)

        self._when_idle(record, released)
        logger.info("queue {}: released by the administrator", queue_id)
        return True

    def delete(self, queue_id: str) -> QueueRecord:
        """Remove an entry from the queue and the disk, reporting nothing to the
        sender. Refused (`QueueBusy`) while an attempt is in flight: that attempt
        may be handing the message to the remote server right now."""
        record = self._get(queue_id)
        if queue_id in self._busy:
            raise QueueBusy(queue_id)
        self.records.pop(queue_id, None)
        self.store.remove(queue_id)
        pending = ", ".join(f"<{r.address}>" for r in record.pending) or "none"
        logger.info("queue {}: deleted by the administrator (pending: {})", queue_id, pending)
        return record

    def _save(self, record: QueueRecord) -> None:
        """Write the record; a failure is logged (the entry stays in memory and
        is retried as it would be). One deleted meanwhile is removed again."""
        try:
            self.store.save(record)
        except StorageError as exc:
            logger.error("queue {}: cannot save its record: {}", record.id, exc)
        if record.id not in self.records:  # deleted while it was being written
            self.store.remove(record.id)

    def _save_when_idle(self, record: QueueRecord) -> None:
        def save() -> None:
            if self.records.get(record.id) is record:
                self._save(record)

        self._when_idle(record, save)

    def _attempt_ended(self, queue_id: str) -> None:
        """The entry's attempt is over: do what was asked meanwhile."""
        self._busy.discard(queue_id)
        for action in self._after_attempt.pop(queue_id, ()):
            action()

    def _when_idle(self, record: QueueRecord, action: Callable[[], None]) -> None:
        """Run `action` now, or once the attempt in flight has ended (and saved
        the record itself: two writers of one record at once would share its
        temporary file)."""
        if record.id not in self._busy:
            action()
            return
        self._after_attempt.setdefault(record.id, []).append(action)


class QueueBusy(Exception):
    """The entry has a delivery attempt in flight."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(
            f"queue {queue_id}: a delivery attempt is in flight; try again when it ends "
            "(hold it first to stop further attempts)"
        )
        self.queue_id = queue_id


#: The reason an attempt that failed with a bug gives (the traceback is in log.txt).
_INTERNAL_ERROR = "x-geosmtp; internal error (see the server log)"

#: The reason a recipient whose bounce could not be stored is deferred.
_BOUNCE_NOT_STORED = "x-geosmtp; its bounce could not be stored (see the server log)"

#: A recipient's state after an attempt, in the access log's (and Postfix's) words.
_OUTCOME_WORDS = {DELIVERED: "sent", PENDING: "deferred", FAILED: "bounced"}


def _wants(rcpt: QueuedRecipient, what: str, default: bool) -> bool:
    """Whether the recipient's NOTIFY asks for this report (`default` without one)."""
    if rcpt.notify is None:
        return default
    return what in rcpt.notify


def _final_state(rcpt: QueuedRecipient) -> str:
    """`<a@example.org>: delivered`, or for a failure why: `<b@nosuch.example>:
    failed (5.1.2 x-geosmtp; nosuch.example: no such domain ...)`."""
    if rcpt.state != FAILED:
        return f"<{rcpt.address}>: {rcpt.state}"
    return f"<{rcpt.address}>: failed ({rcpt.status} {logs.clean(rcpt.last_error or '')})"


def _iso(t: float) -> str:
    """A time as ISO 8601 in UTC, to the second: 2026-12-01T12:44:03Z."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = ["PENDING", "QueueBusy", "QueueRunner", "ReportNotStored", "RunnerSettings"]
