"""Who may receive mail here: local domains, mailbox names, known users, relay.

Pure: the shell builds a `RecipientPolicy` from the configuration and hands it
to each session. The decisions "is this a local mailbox, and which one" and
"may this client relay" live here and nowhere else.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from . import replies as R
from .parser import Mailbox

# A mailbox name becomes a directory name, so only a conservative set is allowed:
# lower-case letters and digits (any script once NFKC-normalised and case-folded),
# and . _ + - inside the name; no leading dot, no "..", at most 64 octets.
_SAFE_NAME_RE = re.compile(r"[^\W_](?:[\w.+-]*[^\W_])?")
MAX_MAILBOX_NAME = 64
# Letters (category Lo) that render as nothing: a name made of them looks empty.
# The other default-ignorable code points are not word characters (Cf, Mn).
_INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")  # Hangul fillers


def safe_mailbox_name(local_part: str) -> str | None:
    """The directory name for `local_part`, or None when it cannot be one safely."""
    name = unicodedata.normalize("NFKC", local_part).casefold()
    # surrogatepass: a lone surrogate (from surrogateescape) must give None, not raise
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_MAILBOX_NAME:
        return None
    if ".." in name or not _SAFE_NAME_RE.fullmatch(name):
        return None
    if any(unicodedata.category(c)[0] in "CZ" or c in _INVISIBLE_LETTERS for c in name):
        return None
    return name


def canonical_domain(domain: str) -> str:
    """Lower-case, and internationalised names in their ASCII (A-label) form,
    so `exämple.org` and `xn--exmple-cua.org` are the same domain."""
    domain = domain.lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


@dataclass(frozen=True, slots=True)
class Recipient:
    mailbox: Mailbox  # as the client wrote it
    box: str  # the local mailbox it is delivered to


@dataclass(frozen=True)
class RecipientPolicy:
    local_domains: frozenset[str]
    #: Known mailbox names; with `accept_unknown` the others are created on delivery.
    users: frozenset[str] = frozenset()
    accept_unknown: bool = True
    postmaster: str = "postmaster"

    def __post_init__(self) -> None:
        # Compared in canonical form: a domain configured as `exämple.org` (or in
        # upper case) must match mail for `xn--exmple-cua.org` and vice versa.
        domains = frozenset(canonical_domain(d) for d in self.local_domains)
        object.__setattr__(self, "local_domains", domains)

    def is_local_domain(self, domain: str) -> bool:
        return canonical_domain(domain) in self.local_domains

    def resolve(self, mailbox: Mailbox, may_relay: bool = False) -> Recipient | R.Reply:
        """The local recipient for `mailbox`, or the reply refusing it.

        The relay decision: a domain that is not local is refused with 550 5.7.1
        unless `may_relay` (an authenticated client, or one from a trusted
        network). Until the outbound queue exists, relayable mail gets 451 4.3.2
        rather than being accepted and dropped.
        """
        if not mailbox.domain:  # RCPT TO:<postmaster> (§4.5.1)
            return Recipient(mailbox, self.postmaster)
        if not self.is_local_domain(mailbox.domain):
            return R.RELAY_UNAVAILABLE if may_relay else R.RELAY_DENIED
        name = safe_mailbox_name(mailbox.local_part)
        if name is None:
            return R.BAD_MAILBOX_NAME
        if name == "postmaster":  # must always be accepted (§4.5.1)
            return Recipient(mailbox, self.postmaster)
        if name not in self.users and not self.accept_unknown:
            return R.UNKNOWN_USER
        return Recipient(mailbox, name)

    def is_known_user(self, name: str) -> bool:
        return name in self.users or name == "postmaster"
