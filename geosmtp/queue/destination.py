"""The outbound queue as a destination of the router.

The router (`pipeline.router.Router`) hands it a message's remote recipients;
it writes the queue entry (the message and its record, fsynced) and gives the
record to the runner once the whole message is accepted (`Delivery.commit`).
It knows the message by what it reads of it (`Routed`), not by the pipeline's
class: the queue sits beside the pipeline, never above it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from ..mail import Envelope, Recipient
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
    fsynced), handed to the queue runner once the whole message is accepted."""

    name = "queue"

    def __init__(self, store: QueueStore, runner: QueueRunner) -> None:
        self.store = store
        self.runner = runner

    def deliver(self, message: Routed, recipients: tuple[Recipient, ...]) -> Delivery:
        env = message.envelope
        params = {k.upper(): v for k, v in env.mail_params.items()}
        now = time.time()
        record = QueueRecord(
            id=message.queue_id,
            sender=env.sender_address,
            arrival=now,
            recipients=[
                QueuedRecipient(
                    address=r.mailbox.address,
                    domain=r.mailbox.domain,
                    notify=sorted(r.notify) if r.notify else None,
                    orcpt=r.orcpt,
                    next_attempt=now,
                )
                for r in recipients
            ],
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
