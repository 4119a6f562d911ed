"""Who may receive mail here: local domains, mailbox names, known users, relay.

Pure: the shell builds a `RecipientPolicy` from the configuration and hands it
to each session. The decisions "is this a local mailbox, and which one" and
"may this client relay" live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mail import Domains, Mailbox, Recipient, safe_mailbox_name
from ..protocol import Reply
from . import replies as R
from .parser import SyntaxProblem, parse_mailbox


@dataclass(frozen=True)
class RecipientPolicy:
    #: Compared IDNA-aware: `exämple.org` matches mail for `xn--exmple-cua.org`.
    local_domains: Domains
    #: Known mailbox names; with `accept_unknown` the others are created on delivery.
    users: frozenset[str] = frozenset()
    accept_unknown: bool = True
    postmaster: str = "postmaster"
    #: An outbound queue takes mail for other domains; without one, a client
    #: that may relay is told 451 4.3.2 rather than have its mail accepted.
    relay: bool = False
    #: The server's own name (the config's `hostname`). The delivery reports it
    #: writes tell people to write to `postmaster@<hostname>`, so that address
    #: is accepted even when the name is not one of `local_domains` (§4.5.1).
    hostname: str = ""
    #: `hostname` compared as every domain is, made once in `__post_init__`.
    _own_name: Domains = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.local_domains, Domains):
            object.__setattr__(self, "local_domains", Domains(self.local_domains))
        object.__setattr__(self, "_own_name", Domains([self.hostname] if self.hostname else []))

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.local_domains

    def resolve(self, mailbox: Mailbox, may_relay: bool = False) -> Recipient | Reply:
        """The local recipient for `mailbox`, or the reply refusing it.

        The relay decision: a domain that is not local is refused with 550 5.7.1
        unless `may_relay` (an authenticated client, or one from a trusted
        network). With an outbound queue (`relay`) a remote recipient is accepted
        with no mailbox (`box` None); without one it gets 451 4.3.2
        rather than being accepted and dropped.
        """
        if not mailbox.domain:  # RCPT TO:<postmaster> (§4.5.1)
            return Recipient(mailbox, self.postmaster)
        if not self.is_local_domain(mailbox.domain):
            if self._is_own_postmaster(mailbox):
                return Recipient(mailbox, self.postmaster)
            if not may_relay:
                return R.RELAY_DENIED
            return Recipient(mailbox, None) if self.relay else R.RELAY_UNAVAILABLE
        name = safe_mailbox_name(mailbox.local_part)
        if name is None:
            return R.BAD_MAILBOX_NAME
        if name == "postmaster":  # must always be accepted (§4.5.1)
            return Recipient(mailbox, self.postmaster)
        if name not in self.users and not self.accept_unknown:
            return R.UNKNOWN_USER
        return Recipient(mailbox, name)

    def _is_own_postmaster(self, mailbox: Mailbox) -> bool:
        """`postmaster@<hostname>`, in any case: the address our reports name."""
        at_own_name = mailbox.domain in self._own_name
        return at_own_name and safe_mailbox_name(mailbox.local_part) == "postmaster"

    def is_known_user(self, name: str) -> bool:
        return name in self.users or name == "postmaster"

    def sender_not_owned(self, sender: Mailbox, user: str) -> Reply | None:
        """The reply refusing `sender` to the logged-in `user` when it is not
        the user's own address (`sender_must_match`), else None."""
        own = self.is_local_domain(sender.domain) and safe_mailbox_name(sender.local_part) == user
        return None if own else R.SENDER_NOT_OWNED

    def verify(self, arg: bytes) -> Reply:
        """VRFY's answer for `arg`, a mailbox name or an address (RFC 5321
        §3.5.1): a known user's address, 252 where it cannot tell (another
        domain, or any name accepted), 550 for an unknown user."""
        text = arg.decode("utf-8", "replace").strip("<>")
        try:
            mailbox = parse_mailbox(text) if "@" in text else None
        except SyntaxProblem:
            return R.SYNTAX_VRFY
        if mailbox is not None and not self.is_local_domain(mailbox.domain):
            return R.VRFY_CANNOT
        name = safe_mailbox_name(mailbox.local_part if mailbox else text)
        if name is not None and self.is_known_user(name):
            domain = mailbox.domain if mailbox else min(self.local_domains, default="")
            return R.user_known(f"{name}@{domain}" if domain else name)
        if self.accept_unknown and name is not None:
            return R.VRFY_CANNOT
        return R.VRFY_UNKNOWN_USER
