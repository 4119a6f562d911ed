"""The router: each recipient to the one destination that takes it.

Local recipients (a mailbox here) go to the Maildir destination. The outbound
queue (remote recipients) and LMTP (a mailbox server such as Dovecot) are the
destinations still to come; until then a remote recipient has no route, and
the recipient policy refuses it before it gets here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..mail import Recipient
from ..queue.store import QueuedRecipient, QueueRecord, QueueStore
from ..storage import MaildirStore
from ..storage.maildir import Delivery
from .message import Message

if TYPE_CHECKING:
    from ..queue.runner import QueueRunner


class Destination(Protocol):
    """Where a message goes for some recipients. `deliver` returns only once the
    message is durable there (fsynced), raises StorageError otherwise, and
    returns a handle whose `undo()` takes the delivery back."""

    name: str

    def deliver(self, message: Message, recipients: tuple[Recipient, ...]) -> Delivery: ...


class MaildirDestination:
    """Local mailboxes: a hard link of the spool file into each `new/`."""

    name = "maildir"

    def __init__(self, store: MaildirStore) -> None:
        self.store = store

    def deliver(self, message: Message, recipients: tuple[Recipient, ...]) -> Delivery:
        return self.store.deliver(message.spool, [r.box for r in recipients if r.box])


class QueueDestination:
    """Remote recipients: an entry in the outbound queue (message and record
    fsynced), handed to the queue runner once the whole message is accepted."""

    name = "queue"

    def __init__(self, store: QueueStore, runner: QueueRunner) -> None:
        self.store = store
        self.runner = runner

    def deliver(self, message: Message, recipients: tuple[Recipient, ...]) -> Delivery:
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


class NoRoute(Exception):
    """A recipient no destination takes (a remote one, while there is no queue)."""


@dataclass
class Router:
    local: Destination
    remote: Destination | None = None  # the outbound queue

    def route(self, recipients: tuple[Recipient, ...]) -> list[tuple[Destination, tuple]]:
        """[(destination, its recipients)], in delivery order: local mailboxes first."""
        local = tuple(r for r in recipients if r.box is not None)
        remote = tuple(r for r in recipients if r.box is None)
        routes: list[tuple[Destination, tuple]] = [(self.local, local)] if local else []
        if remote:
            if self.remote is None:
                raise NoRoute(f"no route to <{remote[0].mailbox.address}>: no outbound queue")
            routes.append((self.remote, remote))
        return routes
