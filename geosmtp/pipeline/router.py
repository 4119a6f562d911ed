"""The router: each recipient to the one destination that takes it.

Local recipients (a mailbox here) go to the Maildir destination. The outbound
queue (remote recipients) and LMTP (a mailbox server such as Dovecot) are the
destinations still to come; until then a remote recipient has no route, and
the recipient policy refuses it before it gets here.
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

    def route(self, recipients: tuple[Recipient, ...]) -> list[tuple[Destination, tuple]]:
        """[(destination, its recipients)], in delivery order."""
        local = tuple(r for r in recipients if r.box is not None)
        if len(local) != len(recipients):
            remote = next(r for r in recipients if r.box is None)
            raise NoRoute(f"no route to <{remote.mailbox.address}>: no outbound queue")
        return [(self.local, local)] if local else []
