"""The router: each recipient to the one destination that takes it.

Local recipients (a mailbox here) go to the Maildir destination; remote ones
to the `remote` destination the app gives, the outbound queue
(`queue.destination.QueueDestination`), known here only as a `Destination`:
the pipeline imports nothing of the queue. Without one a remote recipient
has no route (the recipient policy refuses it before it gets here). When
local mail goes to an LMTP server (`delivery.lmtp`), the queue is both
destinations, and takes all of a message's recipients at once: one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..mail import Recipient
from ..storage import MaildirStore
from ..storage.maildir import Delivery
from .message import Message


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


class NoRoute(Exception):
    """A recipient no destination takes (a remote one, while there is no queue)."""


@dataclass
class Router:
    local: Destination
    remote: Destination | None = None  # the outbound queue

    def route(
        self, recipients: tuple[Recipient, ...]
    ) -> list[tuple[Destination, tuple[Recipient, ...]]]:
        """[(destination, its recipients)], in delivery order: local mailboxes first."""
        if self.local is self.remote:  # LMTP: the queue takes them all
            return [(self.local, recipients)] if recipients else []
        local = tuple(r for r in recipients if r.box is not None)
        remote = tuple(r for r in recipients if r.box is None)
        routes: list[tuple[Destination, tuple[Recipient, ...]]] = (
            [(self.local, local)] if local else []
        )
        if remote:
            if self.remote is None:
                raise NoRoute(f"no route to <{remote[0].mailbox.address}>: no outbound queue")
            routes.append((self.remote, remote))
        return routes
