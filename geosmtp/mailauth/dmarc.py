"""DMARC (RFC 7489): the policy record, identifier alignment, the result.

Our own, on top of the SPF and DKIM results: the record grammar (§6.3-6.4),
policy discovery with the Organizational Domain fallback (§6.6.3), relaxed
and strict alignment (§3.1), and `pct=` sampling (§6.6.4). The libraries that
do DMARC either bring their own DNS (checkdmarc, a record auditor for domain
owners, not a message check) or verify only a message's first DKIM signature
and a public suffix list from 2019 (authheaders), so neither fits here.

The Organizational Domain (§3.2) comes from the Public Suffix List: the one
bundled with the `publicsuffixlist` package (updated with its releases), or
a file named in the config (Debian's `publicsuffix` package keeps one at
/usr/share/publicsuffix/public_suffix_list.dat, updated by apt).

Pure but for the DNS, which is a callable given in.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..dns import DNSTemporaryError
from .results import DKIMResult, DMARCResult, SPFResult

POLICIES = ("none", "quarantine", "reject")
#: What a policy becomes for a message that `pct=` leaves out (§6.3 "pct").
_SAMPLED_OUT = {"reject": "quarantine", "quarantine": "none", "none": "none"}


class RecordError(Exception):
    """A DMARC record that cannot be used (`permerror`)."""


@dataclass(frozen=True, slots=True)
class Record:
    policy: str  # p=
    subdomain_policy: str | None = None  # sp=
    adkim: str = "r"  # r (relaxed) or s (strict)
    aspf: str = "r"
    pct: int = 100


def is_dmarc_record(text: str) -> bool:
    """A TXT record that starts with the version tag `v=DMARC1` (§6.6.3 step 2)."""
    head = text.lstrip()
    if not head.startswith("v"):
        return False
    tag = head.partition(";")[0]
    name, eq, value = tag.partition("=")
    return bool(eq) and name.strip() == "v" and value.strip() == "DMARC1"


def parse_record(text: str) -> Record:
    """The tags that matter here (§6.3). Unknown tags are ignored (§6.3: "MUST
    be ignored"). A missing or invalid `p=` (or `sp=`) makes the record
    `p=none` when it names report addresses (`rua=`), else unusable (§6.6.3)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not name and not eq:
            continue  # an empty part: "p=none;" ends with one
        if not eq or not name:
            raise RecordError(f"not a tag=value list: {part.strip()!r}")
        tags.setdefault(name, value.strip())
    policy = tags.get("p", "").lower()
    sub = tags.get("sp", "").lower() or None
    if policy not in POLICIES or (sub is not None and sub not in POLICIES):
        if not tags.get("rua"):
            raise RecordError("no valid p= tag")
        policy, sub = "none", None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    return Record(
        policy,
        sub,
        adkim if adkim in ("r", "s") else "r",
        aspf if aspf in ("r", "s") else "r",
        pct,
    )


@functools.cache
def public_suffixes(path: Path | None = None) -> Callable[[str], str]:
    """The Organizational Domain function: `org("mail.example.co.uk") ==
    "example.co.uk"`. A name that is itself a public suffix (or has no
    registrable part) is its own. Loaded once per file (about 60 ms)."""
    from publicsuffixlist import PublicSuffixList

    if path is None:
        psl = PublicSuffixList()
    else:
        with open(path, "rb") as source:
            psl = PublicSuffixList(source)

    def org(domain: str) -> str:
        return psl.privatesuffix(domain) or domain

    return org


def aligned(identifier: str, author: str, mode: str, org: Callable[[str], str]) -> bool:
    """§3.1: strict, the same domain; relaxed, the same Organizational Domain."""
    identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if identifier == author:
        return True
    return mode == "r" and bool(identifier) and org(identifier) == org(author)


def discover(domain: str, org: Callable[[str], str], txt: Callable[[str], list[str]]) -> tuple:
    """(record, where it was found), or (None, None) when there is no policy.

    §6.6.3: `_dmarc.<From domain>`, then `_dmarc.<Organizational Domain>`; more
    than one DMARC record at a name ends the discovery with no policy.
    Raises `DNSTemporaryError` (temperror) and `RecordError` (permerror)."""
    for name in dict.fromkeys([domain, org(domain)]):
        records = [t for t in txt(f"_dmarc.{name}") if is_dmarc_record(t)]
        if len(records) > 1:
            return None, None
        if records:
            return parse_record(records[0]), name
    return None, None


#: What policy discovery found: (record, the name it was found at), (None,
#: None) for no policy, or the temperror/permerror result that stopped it.
Found = tuple[Record | None, str | None] | DMARCResult


def find_policy(domain: str, org: Callable[[str], str], txt: Callable[[str], list[str]]) -> Found:
    """`discover()` for the From `domain`, its failures as results: run it while
    the SPF and DKIM checks run (it needs only the DNS)."""
    try:
        return discover(domain, org, txt)
    except DNSTemporaryError as exc:
        return DMARCResult("temperror", domain, reason=exc.message)
    except RecordError as exc:
        return DMARCResult("permerror", domain, reason=f"DMARC record: {exc}")


def evaluate(
    domain: str,
    found: Found,
    spf: SPFResult | None,
    dkim: list[DKIMResult] | None,
    org: Callable[[str], str],
    rng: random.Random | None = None,
) -> DMARCResult:
    """The DMARC result for one RFC5322.From domain, with the policy `found` for it.

    `pass` when an SPF or a DKIM pass is aligned with it; otherwise `temperror`
    when an aligned check failed for now (it could pass later), else `fail`,
    with the policy that applies and what `pct=` makes of it.
    """
    if isinstance(found, DMARCResult):
        return found
    record, found_at = found
    if record is None:
        return DMARCResult("none", domain)
    policy = record.policy
    if found_at != domain and record.subdomain_policy is not None:
        policy = record.subdomain_policy
    candidates = [(r.result, r.domain, record.adkim) for r in dkim or ()]
    if spf is not None:
        candidates.append((spf.result, spf.domain, record.aspf))
    ours = [result for result, ident, mode in candidates if aligned(ident, domain, mode, org)]
    if "pass" in ours:
        return DMARCResult("pass", domain, policy, "none")
    if "temperror" in ours:
        return DMARCResult("temperror", domain, policy, reason="an aligned check failed for now")
    disposition = policy
    if record.pct < 100 and (rng or random).random() * 100 >= record.pct:
        disposition = _SAMPLED_OUT[policy]
    return DMARCResult("fail", domain, policy, disposition)
