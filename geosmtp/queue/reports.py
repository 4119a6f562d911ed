"""Delivery reports: built here, signed, and handed on through one port.

Postfix's bounce(8), slimta's `slimta.bounce`: the queue decides that a
report is due (`runner.QueueRunner`: a recipient failed, is late, or was
relayed with NOTIFY=SUCCESS), and so does a local delivery with NOTIFY=SUCCESS
(the pipeline's after-delivery hook). `Reporter` then writes the RFC 3464
report (`dsn.write_dsn`) into a spool file, with the trace lines a local
delivery keeps (`Return-Path: <>`, `Received:`), DKIM-signs it when a key for
the reporting domain is configured (the `sign` port), and hands the finished
message to the one port it was given, `inject`: the router's destinations
(the sender's Maildir, or the outbound queue), never the pipeline's stages.
The data path runs one way:

    queue runner ─┐
                  ├─► Reporter ─► inject (port) ─► router ─► Maildir | queue
    local NOTIFY ─┘

A report is sent from <>, so it can never cause a report of its own
(RFC 3461 §6.1, RFC 5321 §6.1), and it does not go through the sender checks
or the filters again: it is the server's own message.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from loguru import logger

from .. import logs
from ..mail import Envelope
from ..mail.ids import new_queue_id
from ..storage import Spool, SpoolFile, StorageError
from .dsn import Action, Kind, RecipientStatus, write_dsn
from .store import QueuedRecipient, QueueRecord


class ReportNotStored(Exception):
    """A report to the sender was not stored (a full disk, say); the reason."""


@dataclass(frozen=True)
class ReportMessage:
    """A finished report, whole in its spool file, for `to` (the original sender)."""

    to: str
    spool: SpoolFile
    queue_id: str
    size: int


class Injected(Protocol):
    """What the port answers (the pipeline's `Verdict` is one): `delivered`
    once every destination has it durably; else a `temporary` failure (the
    report is not stored: try again) or a permanent one (there is no way to
    this sender: the report is dropped, logged)."""

    @property
    def delivered(self) -> bool: ...
    @property
    def temporary(self) -> bool: ...
    @property
    def reason(self) -> str: ...


#: The one port: a finished report to the destinations (the router's).
Inject = Callable[[ReportMessage], Injected]
#: Signs the file at `path` with the key of the first of `domains` that has
#: one, at `now`: a new spool file, or None when no key fits.
Sign = Callable[[str, Sequence[str], int], SpoolFile | None]


class _Spooled(Protocol):
    @property
    def path(self) -> str: ...


class Delivered(Protocol):
    """A message just delivered locally (the pipeline's `Message`)."""

    @property
    def envelope(self) -> Envelope: ...
    @property
    def queue_id(self) -> str: ...
    @property
    def spool(self) -> _Spooled: ...


def reporting_domains(hostname: str) -> list[str]:
    """The domains whose DKIM key may sign a report, best first: the host name
    (the From: is `MAILER-DAEMON@hostname`), then each domain above it down to
    two labels (`mx.example.org`, `example.org`), aligned with it for DMARC."""
    labels = hostname.rstrip(".").lower().split(".")
    return [".".join(labels[i:]) for i in range(max(len(labels) - 1, 1))]


class Reporter:
    def __init__(
        self,
        spool: Spool,
        hostname: str,
        inject: Inject,
        *,
        open_queued: Callable[[str], BinaryIO],
        sign: Sign | None = None,
        max_full_size: int,
        max_lifetime: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`inject` takes every finished report; `open_queued` opens a queued
        message by its id (`QueueStore.open_message`); `sign` (None: not signed)
        signs it; a failed report returns the original whole up to
        `max_full_size` octets (RET=FULL); a delay report promises retries
        until `max_lifetime` seconds after arrival."""
        self.spool = spool
        self.hostname = hostname
        self.inject = inject
        self.open_queued = open_queued
        self.sign = sign
        self.max_full_size = max_full_size
        self.max_lifetime = max_lifetime
        self.clock = clock

    # ---------------------------------------------------------- queued

    def queued(self, record: QueueRecord, rcpts: list[QueuedRecipient], kind: Kind) -> None:
        """A report about `rcpts` of a queued message, to its sender (the
        runner's `Report`). A success here is `relayed` (RFC 3461 §6.2.2.2):
        the next server did not take the DSN request; `delivered` for a
        recipient an LMTP server took (§6.2.2.1: the final delivery).
        `ReportNotStored` when it could not be stored: the queue then keeps
        the message."""
        now = self.clock()
        statuses = [
            RecipientStatus(
                final_recipient=r.address,
                action=_action(kind, r),
                status=r.status or {"failed": "5.0.0", "delayed": "4.0.0"}.get(kind, "2.0.0"),
                original_recipient=r.orcpt,
                remote_mta=r.remote_mta.removeprefix("dns; ") if r.remote_mta else None,
                diagnostic_code=r.last_error,
                last_attempt_date=email.utils.formatdate(now, localtime=True),
                will_retry_until=(
                    email.utils.formatdate(record.arrival + self.max_lifetime, True)
                    if kind == "delayed"
                    else None
                ),
            )
            for r in rcpts
        ]
        self._send(
            record.id,
            record.sender,
            record.envid,
            record.ret,
            record.arrival,
            statuses,
            kind,
            lambda: self.open_queued(record.id),
        )

    # ----------------------------------------------------------- local

    def delivered_locally(self, message: Delivered) -> None:
        """NOTIFY=SUCCESS on a local recipient: a `delivered` report (RFC 3461
        §6.2.2.1) once the message is in the mailbox. Called while the spool
        file still exists; a failure here never undoes the delivery, it is
        logged."""
        env = message.envelope
        rcpts = [
            r for r in env.recipients if r.box is not None and r.notify and "SUCCESS" in r.notify
        ]
        if not rcpts or not env.sender:
            return
        now = self.clock()
        statuses = [
            RecipientStatus(
                final_recipient=r.mailbox.address,
                action="delivered",
                status="2.0.0",
                original_recipient=r.orcpt,
                last_attempt_date=email.utils.formatdate(now, localtime=True),
            )
            for r in rcpts
        ]
        params = {k.upper(): v for k, v in env.mail_params.items()}
        try:
            self._send(
                message.queue_id,
                env.sender_address,
                params.get("ENVID"),
                params.get("RET"),
                now,
                statuses,
                "delivered",
                lambda: open(message.spool.path, "rb"),  # noqa: SIM115 - closed by the caller
            )
        except ReportNotStored as exc:
            logger.error(
                "{}: could not store the delivery report to <{}>: {}",
                message.queue_id,
                env.sender_address,
                logs.clean(exc),
            )
        except Exception:
            logger.exception(
                "{}: could not report the delivery to <{}>", message.queue_id, env.sender_address
            )

    # -------------------------------------------------------- building

    def _send(
        self,
        about: str,
        sender: str,
        envid: str | None,
        ret: str | None,
        arrival: float,
        statuses: Iterable[RecipientStatus],
        kind: Kind,
        open_original: Callable[[], BinaryIO],
    ) -> None:
        """Build the report, sign it, inject it; the spool file is gone after.
        `ReportNotStored` when the port could not store it."""
        queue_id = new_queue_id()
        spool = self._build(
            queue_id, sender, envid, ret, arrival, list(statuses), kind, open_original
        )
        try:
            spool = self._signed(queue_id, spool)
            verdict = self.inject(ReportMessage(sender, spool, queue_id, spool.size))
        finally:
            spool.remove()
        if not verdict.delivered:
            if verdict.temporary:
                raise ReportNotStored(verdict.reason)
            logger.warning("{}: no way to report to <{}>: {}", about, sender, verdict.reason)
            return
        logger.info("{}: {} report to <{}>: queued as {}", about, kind, sender, queue_id)

    def _build(
        self,
        queue_id: str,
        sender: str,
        envid: str | None,
        ret: str | None,
        arrival: float,
        statuses: list[RecipientStatus],
        kind: Kind,
        open_original: Callable[[], BinaryIO],
    ) -> SpoolFile:
        """The report in a new spool file, flushed; `ReportNotStored` on a
        storage error (a spool that cannot be opened or written)."""
        date = email.utils.formatdate(self.clock(), localtime=True)
        try:
            spool = self.spool.open()
            try:
                # The trace lines a local delivery keeps (the queue drops the
                # Return-Path when the report goes on to another server).
                spool.write(
                    f"Return-Path: <>\nReceived: by {self.hostname} (geosmtp) "
                    f"id {queue_id}; {date}\n".encode()
                )
                with open_original() as original:
                    write_dsn(
                        spool,
                        reporting_mta=self.hostname,
                        original_envelope_id=envid,
                        sender=sender,
                        arrival_date=email.utils.formatdate(arrival, localtime=True),
                        recipients=statuses,
                        kind=kind,
                        original=original,
                        ret=ret or "HDRS",
                        max_full_size=self.max_full_size,
                        date=date,
                        message_id=f"<{queue_id}@{self.hostname}>",
                        boundary=f"{queue_id}/{secrets.token_hex(8)}",
                    )
                spool.flush()
            except BaseException:
                spool.remove()
                raise
        except StorageError as exc:
            raise ReportNotStored(str(exc)) from exc
        return spool

    def _signed(self, queue_id: str, spool: SpoolFile) -> SpoolFile:
        """`spool` signed with the reporting domain's key (a new file; the old
        one is removed), or `spool` itself when no key fits."""
        if self.sign is None:
            return spool
        try:
            signed = self.sign(spool.path, reporting_domains(self.hostname), int(self.clock()))
        except (OSError, StorageError) as exc:
            raise ReportNotStored(f"cannot sign the report: {exc}") from exc
        if signed is None:
            logger.debug("{}: report not signed (no key for {})", queue_id, self.hostname)
            return spool
        spool.remove()
        return signed


def _action(kind: Kind, rcpt: QueuedRecipient) -> Action:
    """The DSN's Action of a queued recipient's report (RFC 3464 §2.3.3)."""
    if kind == "delivered":
        return "delivered" if rcpt.lmtp else "relayed"
    return kind
