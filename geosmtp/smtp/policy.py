"""Who may receive mail here: local domains, mailbox names, known users.

Pure: the shell builds a `RecipientPolicy` from the configuration and hands it
to each session. The decision "is this a local mailbox, and which one" lives
here and nowhere else.
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


def safe_mailbox_name(local_part: str) -> str | None:
    """The directory name for `local_part`, or None when it cannot be one safely."""
    name = unicodedata.normalize("NFKC", local_part).casefold()
    # surrogatepass: a lone surrogate (from surrogateescape) must give None, not raise
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_MAILBOX_NAME:
        return None
    if ".." in name or not _SAFE_NAME_RE.fullmatch(name):
        return None
    if any(unicodedata.category(c)[0] in "CZ" for c in name):
        return None
    return name


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

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.local_domains

    def resolve(self, mailbox: Mailbox) -> Recipient | R.Reply:
        """The local recipient for `mailbox`, or the reply refusing it."""
        if not mailbox.domain:  # RCPT TO:<postmaster> (§4.5.1)
            return Recipient(mailbox, self.postmaster)
        if not self.is_local_domain(mailbox.domain):
            return R.RELAY_DENIED
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
