"""The envelope: who sent a message and to whom, fixed once it is handed on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .address import Mailbox

_NO_PARAMS: Mapping[str, str | None] = MappingProxyType({})

#: The NOTIFY words (RFC 3461 §4.1) honoured only for a client that logged in
#: or is trusted: a success or delay notice goes to the reverse-path, which
#: anyone can forge, with the message's header section in it.
TRUSTED_NOTIFY = frozenset({"SUCCESS", "DELAY"})


@dataclass(frozen=True, slots=True)
class Recipient:
    mailbox: Mailbox  # as the client wrote it
    #: The local mailbox it is delivered to; None for a remote recipient.
    box: str | None
    #: RFC 3461 NOTIFY (NEVER, or some of SUCCESS, FAILURE, DELAY); None: not given
    notify: frozenset[str] | None = None
    #: RFC 3461 ORCPT as received ("rfc822;alice@example.org", xtext)
    orcpt: str | None = None

    @property
    def is_local(self) -> bool:
        return self.box is not None

    def without_trusted_notify(self) -> Recipient:
        """This recipient without NOTIFY=SUCCESS and DELAY: what it asks of a
        client that is neither logged in nor trusted. The rest of its NOTIFY is
        kept (FAILURE, NEVER); a NOTIFY of nothing but those becomes NEVER, so
        no report is sent at all, as the client asked for no failure report."""
        if self.notify is None or not self.notify & TRUSTED_NOTIFY:
            return self
        kept = self.notify - TRUSTED_NOTIFY
        return replace(self, notify=kept or frozenset({"NEVER"}))


@dataclass(frozen=True)
class Envelope:
    """An immutable envelope (RFC 5321 §2.3.1) and how it arrived.

    The SMTP core builds a new one at each accepted command; an event that
    carries one always carries the envelope as it was at that moment.
    """

    helo: str
    esmtp: bool
    sender: Mailbox | None = None  # None is the null reverse-path <>
    #: MAIL parameters (SIZE, BODY, SMTPUTF8, AUTH, and later DSN's RET/ENVID)
    mail_params: Mapping[str, str | None] = field(default_factory=lambda: _NO_PARAMS)
    recipients: tuple[Recipient, ...] = ()
    smtputf8: bool = False
    auth_user: str | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mail_params, MappingProxyType):
            object.__setattr__(self, "mail_params", MappingProxyType(dict(self.mail_params)))
        if not isinstance(self.recipients, tuple):
            object.__setattr__(self, "recipients", tuple(self.recipients))

    def with_recipient(self, recipient: Recipient) -> Envelope:
        """This envelope with one more recipient (what an accepted RCPT makes).

        The same as `dataclasses.replace(self, recipients=...)`, at a sixth of
        its cost: it runs once per recipient on the hot path.
        """
        new = object.__new__(Envelope)
        new.__dict__.update(self.__dict__)
        object.__setattr__(new, "recipients", (*self.recipients, recipient))
        return new

    def without_trusted_notify(self) -> Envelope:
        """This envelope with `Recipient.without_trusted_notify` applied to each
        recipient; the same object when no recipient asked for those reports."""
        recipients = tuple(r.without_trusted_notify() for r in self.recipients)
        if all(a is b for a, b in zip(recipients, self.recipients, strict=True)):
            return self
        return replace(self, recipients=recipients)

    @property
    def sender_address(self) -> str:
        return self.sender.address if self.sender else ""

    @property
    def local(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.box is not None)

    @property
    def remote(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.box is None)
