"""What the checks found, and the one `Authentication-Results:` field (RFC 8601) that says it.

Pure. Result words are RFC 8601's (§2.7): SPF's own seven (RFC 7208 §2.6),
DKIM's `pass`/`fail`/`none`/`temperror`/`permerror`/`policy`, DMARC's
(RFC 7489 §11.2). Everything that came from the message or the DNS (a
selector, a reason) is made safe before it goes into the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..smtp.trace import header_safe

#: A comment is at most this long (a line at most 998 octets: RFC 5322 §2.1.1);
#: a DNS failure's reason, with the name asked and the nameserver's answer, fits.
MAX_COMMENT = 200

# RFC 8601 §2.2: a pvalue is a MIME token (RFC 2045 §5.1: no tspecials), or
# `[local-part]@domain`; UTF-8 as RFC 6532 allows. Anything else is quoted.
_UTF8 = "\u00a0-\u2027\u202a-\U0010ffff"
_PLAIN_RE = re.compile(
    rf"[A-Za-z0-9!#$%&'*+\-.^_`{{|}}~{_UTF8}]+"  # a token
    rf"|[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~.{_UTF8}]*@[A-Za-z0-9.\-{_UTF8}]+"  # [local-part]@domain
)


@dataclass(frozen=True, slots=True)
class SPFResult:
    """RFC 7208 §2.6: pass, fail, softfail, neutral, none, temperror, permerror."""

    result: str
    #: "mailfrom", or "helo" when the reverse-path was <> (RFC 7208 §2.4)
    identity: str
    #: what was checked: the MAIL FROM address, or the HELO name
    subject: str
    #: the domain whose policy it was (for DMARC's alignment)
    domain: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DKIMResult:
    """One signature's verdict (RFC 6376 §6.1; RFC 8601 §2.7.1)."""

    result: str
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    signature: str = ""  # b=, white space removed (the field shows its start: RFC 6008)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DMARCResult:
    """RFC 7489 §11.2: pass, fail, none, temperror, permerror; per From: domain."""

    result: str
    domain: str  # the RFC5322.From domain
    #: the policy that applies (`p=`, or `sp=` for a subdomain): none, quarantine, reject
    policy: str | None = None
    #: what the policy asks for this message after `pct=` sampling (RFC 7489 §6.6.4)
    disposition: str | None = None
    reason: str = ""


def pvalue(text: str) -> str:
    """`text` as an RFC 8601 property value: as it is, or a quoted string."""
    if _PLAIN_RE.fullmatch(text):
        return text
    # header_safe leaves no controls, line separators or backslashes
    return '"' + header_safe(text).replace('"', '\\"') + '"'


def comment(text: str) -> str:
    """` (text)`, made safe and short; or "".

    No backslashes or controls, and parentheses only in pairs: a comment may
    hold a comment (RFC 5322 §3.2.2), as a DNS failure's reason does, "timed
    out (nameservers: ...)". Any other parenthesis, and any pair inside that
    inner comment, becomes "?", so nothing can close the comment early. A
    long text is cut at a space, and the inner comment closed if it was cut.
    """
    text = " ".join(_paired(header_safe(text, keep_parentheses=True)).split())
    if not text:
        return ""
    if len(text) > MAX_COMMENT:
        end = MAX_COMMENT - 4  # room for "..." and a ")"
        cut = text.rfind(" ", MAX_COMMENT // 2, end)
        text = text[: cut if cut > 0 else end] + "..."
        text += ")" * (text.count("(") - text.count(")"))
    return f" ({text})"


def _paired(text: str) -> str:
    """`text` with "?" for each parenthesis that has no partner, and for each
    pair inside another pair: one comment nested in the comment at most."""
    chars = list(text)
    opened: list[int] = []
    for i, c in enumerate(chars):
        if c == "(":
            opened.append(i)
        elif c == ")":
            if not opened:
                chars[i] = "?"
                continue
            start = opened.pop()
            if opened:
                chars[start] = chars[i] = "?"
    for i in opened:
        chars[i] = "?"
    return "".join(chars)


def _b_prefix(results: list[DKIMResult], mine: DKIMResult) -> str:
    """The shortest start of `b=`, at least 8 characters, that tells this signature
    from the others (RFC 6008 §4)."""
    others = [r.signature for r in results if r is not mine and r.signature]
    length = 8
    while length < len(mine.signature) and any(
        o[:length] == mine.signature[:length] for o in others
    ):
        length += 8
    return mine.signature[:length]


def authentication_results(
    authserv_id: str,
    spf: SPFResult | None,
    dkim: list[DKIMResult] | None,
    dmarc: list[DMARCResult] | None,
) -> bytes:
    """The whole field, one result per line, LF line ends (the spool's).

    `None` for a check that did not run; `dkim=[]` is a message without
    signatures (`dkim=none`). No check at all: `none` (RFC 8601 §2.2).
    """
    parts: list[str] = []
    if spf is not None:
        ptype = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
        parts.append(f"spf={spf.result}{comment(spf.reason)} {ptype}={pvalue(spf.subject)}")
    if dkim is not None:
        if not dkim:
            parts.append("dkim=none (no signatures)")
        for r in dkim:
            props = ""
            if r.domain:
                props += f" header.d={pvalue(r.domain)}"
            if r.selector:
                props += f" header.s={pvalue(r.selector)}"
            if r.algorithm:
                props += f" header.a={pvalue(r.algorithm)}"
            if r.signature:
                props += f" header.b={pvalue(_b_prefix(dkim, r))}"
            parts.append(f"dkim={r.result}{comment(r.reason)}{props}")
    for d in dmarc or ():
        detail = d.reason
        if d.policy is not None:
            detail = f"p={d.policy} dis={d.disposition or 'none'}" + (
                f"; {detail}" if detail else ""
            )
        parts.append(f"dmarc={d.result}{comment(detail)} header.from={pvalue(d.domain)}")
    if not parts:
        parts = ["none"]
    return (
        f"Authentication-Results: {authserv_id};\n\t".encode()
        + ";\n\t".join(parts).encode("utf-8")
        + b"\n"
    )
