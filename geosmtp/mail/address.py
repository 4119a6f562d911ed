"""Addresses, domains and mailbox names: what every protocol and service shares.

Pure and standard-library only. The SMTP grammar that *parses* a path stays in
`geosmtp.smtp.parser`; what an address *is* once parsed, how two domains
compare and which local part may become a directory lives here, once.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# RFC 5321 §4.1.2 / RFC 5322 atext. With SMTPUTF8 (RFC 6531 §3.3) non-ASCII
# UTF-8 is also allowed, less the C1 controls and the Unicode line and paragraph
# separators: an address is copied as it is into Return-Path: and Received:,
# where those could start a line for some header parsers.
ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
UTF8 = "\u00a0-\u2027\u202a-\U0010ffff"
DOT_STRING_RE = re.compile(rf"[{ATEXT}]+(?:\.[{ATEXT}]+)*")
DOT_STRING_UTF8_RE = re.compile(rf"[{ATEXT}{UTF8}]+(?:\.[{ATEXT}{UTF8}]+)*")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """`local-part@domain`; the local part as sent (unquoted), the domain lower-cased."""

    local_part: str
    domain: str  # "" only for the special forward-path <postmaster> (RFC 5321 §4.5.1)
    #: The address as it is written back (quoted when it must be); made once.
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        local = self.local_part
        if self.domain and not DOT_STRING_UTF8_RE.fullmatch(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        object.__setattr__(self, "address", f"{local}@{self.domain}" if self.domain else local)

    def __str__(self) -> str:
        return self.address


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


class Domains:
    """A set of domains compared the one way every part of geosmtp compares them:
    case-insensitive and IDNA-aware (`canonical_domain`)."""

    __slots__ = ("_canonical",)

    def __init__(self, domains: Iterable[str] = ()) -> None:
        self._canonical = frozenset(canonical_domain(d) for d in domains)

    def __contains__(self, domain: object) -> bool:
        return isinstance(domain, str) and canonical_domain(domain) in self._canonical

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._canonical))

    def __len__(self) -> int:
        return len(self._canonical)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Domains) and other._canonical == self._canonical

    def __hash__(self) -> int:
        return hash(self._canonical)

    def __repr__(self) -> str:
        return f"Domains({sorted(self._canonical)!r})"


# A mailbox name becomes a directory name, so only a conservative set is allowed:
# lower-case letters and digits (any script once NFKC-normalised and case-folded),
# and . _ + - inside the name; no leading dot, no "..", at most 64 octets.
_SAFE_NAME_RE = re.compile(r"[^\W_](?:[\w.+-]*[^\W_])?")
MAX_MAILBOX_NAME = 64
# Letters (category Lo) that render as nothing: a name made of them looks empty.
# The other default-ignorable code points are not word characters (Cf, Mn).
_INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")  # Hangul fillers


def safe_mailbox_name(local_part: str) -> str | None:
    """The directory name for `local_part`, or None when it cannot be one safely.

    No name it returns starts with a dot, so `.spool` and the like can never be
    a mailbox.
    """
    name = unicodedata.normalize("NFKC", local_part).casefold()
    # surrogatepass: a lone surrogate (from surrogateescape) must give None, not raise
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_MAILBOX_NAME:
        return None
    if ".." in name or not _SAFE_NAME_RE.fullmatch(name):
        return None
    if any(unicodedata.category(c)[0] in "CZ" or c in _INVISIBLE_LETTERS for c in name):
        return None
    return name
