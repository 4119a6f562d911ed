"""The outbound queue as a destination of the router.

The router (`pipeline.router.Router`) hands it a message's remote recipients;
it writes the queue entry (the message and its record, fsynced) and gives the
record to the runner once the whole message is accepted (`Delivery.commit`).
With `delivery.lmtp` set, the local recipients go the same way, in the same
entry (the router gives this destination every recipient then): queued
first, so the client's `250` comes once the message is safe here, then
handed to the LMTP server by the runner, with the queue's retries, bounces
and reports per recipient.
It knows the message by what it reads of it (`Routed`), not by the pipeline's
class: the queue sits beside the pipeline, never above it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from ..mail import Envelope, Mailbox, Recipient
from ..storage import SpoolFile
from ..storage.maildir import Delivery
from .store import QueuedRecipient, QueueRecord, QueueStore

if TYPE_CHECKING:
    from .runner import QueueRunner


class Routed(Protocol):
    """What the queue reads of a routed message (the pipeline's `Message`)."""

    envelope: Envelope
    spool: SpoolFile
    queue_id: str
    size: int
    client: str


class QueueDestination:
    """Remote recipients: an entry in the outbound queue (message and record
    fsynced), handed to the queue runner once the whole message is accepted.

    `lmtp_domain` (the server's hostname; `delivery.lmtp` is set): local
    recipients too, each queued for the LMTP server as its local mailbox (the
    name the recipient policy resolved it to, as `mail_dir/<name>` would be,
    and the `postmaster` setting's mailbox for postmaster) at the domain it
    was sent to; `<postmaster>` without a domain (RFC 5321 §4.5.1) at
    `lmtp_domain`. The record keeps the address the client gave, for the
    reports."""

    name = "queue"

    def __init__(
        self, store: QueueStore, runner: QueueRunner, *, lmtp_domain: str | None = None
    ) -> None:
        self.store = store
        self.runner = runner
        self.lmtp_domain = lmtp_domain

    def deliver(self, message: Routed, recipients: tuple[Recipient, ...]) -> Delivery:
        env = message.envelope
        params = {k.upper(): v for k, v in env.mail_params.items()}
        now = time.time()
        record = QueueRecord(
            id=message.queue_id,
            sender=env.sender_address,
            arrival=now,
            recipients=[self._queued(r, now) for r in recipients],
            size=message.size,
            ret=(params.get("RET") or "").upper() or None,
            envid=params.get("ENVID"),
            smtputf8=env.smtputf8,
            body=(params.get("BODY") or "").upper() or None,
            client=message.client,
            auth_user=env.auth_user,
        )
        delivery = self.store.add(message.spool, record)
        delivery.on_commit = lambda: self.runner.submit(record)
        return delivery

    def _queued(self, r: Recipient, now: float) -> QueuedRecipient:
        rcpt = QueuedRecipient(
            address=r.mailbox.address,
            domain=r.mailbox.domain,
            notify=sorted(r.notify) if r.notify else None,
            orcpt=r.orcpt,
            next_attempt=now,
        )
        if r.box is not None:
            if self.lmtp_domain is None:
                raise ValueError(f"<{r.mailbox.address}> is local, and there is no LMTP server")
            rcpt.domain = r.mailbox.domain or self.lmtp_domain
            rcpt.address = Mailbox(r.mailbox.local_part, rcpt.domain).address
            rcpt.lmtp = Mailbox(r.box, rcpt.domain).address
        return rcpt
