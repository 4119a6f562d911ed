"""SPF (RFC 7208) with pyspf, every DNS question through our resolver.

pyspf evaluates the record (mechanisms, macros, the limits of §4.6.4: ten
lookups, two void lookups) and is checked against the RFC's test suite. It
asks DNS through one module-level function, `spf.DNSLookup`, with no way to
pass a resolver per query; so that function is replaced, once, by one that
asks the resolver set for the running check (a context variable: each
greenlet has its own) and falls back to pyspf's own for anyone else in the
process. Under the server, dnspython's sockets are gevent's (the CLI patches
the standard library first), so a check waits on the network without holding
up other sessions, as the relay's MX lookups do.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable
from typing import Any

import spf as pyspf
from loguru import logger

from ..dns import DNSTemporaryError, Resolver
from ..mail import Envelope
from .results import SPFResult

#: The start pyspf gives an error's explanation.
_PYSPF_PREFIX_RE = re.compile(r"SPF (?:Temporary|Permanent) Error: ")
#: RFC 7208 §4.6.4: at least 20 seconds for the whole evaluation.
QUERY_TIME = 20.0

_lookup: contextvars.ContextVar[Callable[[str, str], list] | None] = contextvars.ContextVar(
    "geosmtp_spf_lookup", default=None
)
_pyspf_lookup = pyspf.DNSLookup


def _dns_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list:
    lookup = _lookup.get()
    if lookup is None:  # pyspf used elsewhere in the process: its own resolver
        return _pyspf_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype)


def _answers(resolver: Resolver) -> Callable[[str, str], list]:
    """pyspf's DNSLookup contract, on `resolver`: [((name, type), value), ...]."""

    def lookup(name: str, qtype: str) -> list:
        if qtype == "SPF":  # type 99 is obsolete (RFC 7208 §3.1): never asked
            return []
        try:
            records = resolver.lookup(name, qtype)
        except DNSTemporaryError as exc:
            raise pyspf.TempError(exc.message) from None  # it says "DNS lookup of ..."
        out: list = []
        for r in records:
            if qtype in ("A", "AAAA"):
                value: Any = r.address
            elif qtype == "MX":
                value = (r.preference, r.exchange)
            elif qtype == "PTR":
                value = r.target.to_text(True)
            elif qtype == "TXT":
                value = list(r.strings)
            else:
                continue
            out.append(((name, qtype), value))
        return out

    return lookup


def check_spf(resolver: Resolver, envelope: Envelope, client_ip: str, receiver: str) -> SPFResult:
    """The SPF result for the MAIL FROM identity, or the HELO identity when the
    reverse-path is <> (RFC 7208 §2.4). A DNS failure is `temperror`; so is
    anything unexpected inside pyspf (logged), never a pass."""
    if envelope.sender is not None:
        identity, subject, domain = "mailfrom", envelope.sender.address, envelope.sender.domain
        sender = envelope.sender.address
    else:
        identity, subject, domain = "helo", envelope.helo, envelope.helo.lower()
        sender = ""
    if pyspf.DNSLookup is not _dns_lookup:
        pyspf.DNSLookup = _dns_lookup
    token = _lookup.set(_answers(resolver))
    try:
        query = pyspf.query(
            i=client_ip, s=sender, h=envelope.helo, receiver=receiver, querytime=QUERY_TIME
        )
        result, _, explanation = query.check()
    except Exception as exc:
        logger.exception("SPF check of {} from [{}] failed", subject, client_ip)
        return SPFResult("temperror", identity, subject, domain, f"SPF check failed: {exc}")
    finally:
        _lookup.reset(token)
    # pyspf's "SPF Temporary Error: " and the like repeat what `spf=` says
    reason = _PYSPF_PREFIX_RE.sub("", explanation) if result != "pass" else ""
    if result == "fail":
        reason = f"{client_ip} is not allowed to send for {domain}"
    return SPFResult(result, identity, subject, domain, reason)
