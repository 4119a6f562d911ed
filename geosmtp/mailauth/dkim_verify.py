"""DKIM verification (RFC 6376 §6) of every signature, with dkimpy.

Done in three steps, so that the DNS waits happen in the session's greenlet
and the CPU work where the stage runs it (the threadpool for a large message:
`stages.INLINE_LIMIT`), and so that no message is held in memory:

1. `signatures(fields, max_signatures)`: the `DKIM-Signature:` fields, parsed
   enough to know which key each needs (`s=`, `d=`) and which body hash
   (`c=`, `a=`, `l=`).
2. The key of each, looked up by the stage through our resolver,
   concurrently (`stages.SenderChecks._key`; `key_record` joins the TXT
   record's strings).
3. `verify(section, sigs, keys, body_hashes)`: dkimpy checks each signature's
   tags, key record and header hash against the header section alone; the
   body hashes were computed while the body streamed from the spool
   (`canon.BodyHasher`), and compared here. dkimpy is given the headers only:
   holding a 25 MB body whole, several copies of it, is what it would cost.

dkimpy is told the key it needs through its `dnsfunc` hook (the key fetched
in step 2). Signatures beyond `max_signatures` are not evaluated (RFC 6376
§6.1 lets a verifier limit them; each costs a DNS question).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from loguru import logger

from .headers import CRLF, HeaderField
from .results import DKIMResult

#: A selector or a domain we would ask DNS about: dot-separated LDH labels.
_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?")
_HASHES = {"rsa-sha256": "sha256", "ed25519-sha256": "sha256", "rsa-sha1": "sha1"}


class KeyTemporaryError(Exception):
    """The key could not be fetched for now (DNS timeout, SERVFAIL)."""


@dataclass
class Signature:
    """One `DKIM-Signature:` field, as far as the key lookup and the body hash need it.

    `error` is set when the field is unusable before any lookup (unparseable
    tags, a missing `d=`/`s=`, an unknown canonicalization): its result is
    `permerror` without a DNS question.
    """

    index: int  # among the message's DKIM-Signature fields, top first (dkimpy's idx)
    field: HeaderField
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    signature: str = ""  # b=, white space removed
    relaxed_body: bool = False
    limit: int | None = None  # l=
    error: str | None = None

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def body_key(self) -> tuple[bool, str, int | None]:
        """Which body hash this signature needs (canonicalization, hash, l=)."""
        return (self.relaxed_body, _HASHES.get(self.algorithm, "sha256"), self.limit)

    def result(self, result: str, reason: str = "") -> DKIMResult:
        return DKIMResult(
            result, self.domain, self.selector, self.algorithm, self.signature, reason
        )


def _text(value: bytes) -> str:
    return re.sub(rb"\s+", b"", value).decode("ascii", "replace")


def signatures(fields: list[HeaderField], max_signatures: int) -> list[Signature]:
    """The first `max_signatures` DKIM-Signature fields, top first."""
    out: list[Signature] = []
    for f in fields:
        if f.lname != b"dkim-signature":
            continue
        sig = Signature(len(out), f)
        out.append(sig)
        try:
            tags = parse_tag_value(f.value)
        except (InvalidTagValueList, ValueError) as exc:
            sig.error = f"unparseable signature: {exc}"
        else:
            sig.domain = _text(tags.get(b"d", b"")).lower()
            sig.selector = _text(tags.get(b"s", b"")).lower()
            sig.algorithm = _text(tags.get(b"a", b"")).lower()
            sig.signature = _text(tags.get(b"b", b""))
            sig.error = _problem(sig, tags)
        if len(out) >= max_signatures:
            break
    return out


def _problem(sig: Signature, tags: dict[bytes, bytes]) -> str | None:
    """Why the signature cannot be verified at all (before DNS), or None."""
    if not sig.domain or not sig.selector:
        return "no d= or s= tag"
    if not _NAME_RE.fullmatch(sig.domain) or not _NAME_RE.fullmatch(sig.selector):
        return "d= or s= is not a domain name"
    if sig.algorithm == "rsa-sha1":
        return "rsa-sha1 signatures are not accepted (RFC 8301)"
    if sig.algorithm not in _HASHES:
        return f"unknown algorithm a={sig.algorithm}"
    canon = _text(tags.get(b"c", b"simple/simple")).lower().split("/")
    if len(canon) > 2 or any(c not in ("simple", "relaxed") for c in canon):
        return "unknown canonicalization"
    sig.relaxed_body = len(canon) == 2 and canon[1] == "relaxed"
    if b"l" in tags:
        length = _text(tags[b"l"])
        if not length.isdigit() or len(length) > 76:
            return "l= is not a number"
        sig.limit = int(length)
    return None


def key_record(strings: list[list[bytes]]) -> bytes | None:
    """The key record out of the TXT records at a selector's name: the strings
    of the first record joined (RFC 6376 §3.6.2.2), or None when there is none."""
    return b"".join(strings[0]) if strings else None


def verify(
    section: bytes,
    sigs: list[Signature],
    keys: dict[str, bytes | KeyTemporaryError | None],
    body_hashes: dict[tuple[bool, str, int | None], bytes],
) -> list[DKIMResult]:
    """Each signature's result. `section` is the header section with CRLF line
    ends; `keys` has, by key name, the key record, None (no record), or the
    temporary error that kept it from us. CPU work: run it in the threadpool."""
    try:
        checker = dkim.DKIM(section + CRLF, minkey=1024)
    except dkim.DKIMException as exc:
        return [s.result("permerror", s.error or f"header section: {exc}") for s in sigs]
    return [_verify_one(checker, s, keys, body_hashes) for s in sigs]


def _verify_one(
    checker: dkim.DKIM,
    sig: Signature,
    keys: dict[str, bytes | KeyTemporaryError | None],
    body_hashes: dict[tuple[bool, str, int | None], bytes],
) -> DKIMResult:
    if sig.error is not None:
        return sig.result("permerror", sig.error)
    key = keys.get(sig.key_name)
    if isinstance(key, KeyTemporaryError):
        text = str(key)  # "DNS lookup of <key name> TXT timed out ..." names the key already
        return sig.result(
            "temperror", text if sig.key_name in text else f"key {sig.key_name}: {text}"
        )
    if key is None:
        return sig.result("permerror", f"no key at {sig.key_name}")
    try:
        tags, include_headers, fields = checker.verify_headerprep(sig.index)
        dkim.evaluate_pk(sig.key_name.encode(), key)  # a bad or revoked key: permerror
        try:
            wanted = base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]), validate=True)
        except binascii.Error:
            return sig.result("permerror", "bh= is not base64")
        if body_hashes[sig.body_key] != wanted:
            return sig.result("fail", "body hash did not verify")
        # The body is verified; dkimpy checks the rest (an ARC seal's path: no bh=).
        del tags[b"bh"]
        ok = checker.verify_sig(
            tags, include_headers, fields[sig.index], lambda name, timeout=5: key
        )
    except dkim.DKIMException as exc:
        return sig.result("permerror", str(exc))
    except Exception as exc:  # dkimpy tripped on a hostile field: no pass, and a trace
        logger.exception("DKIM verification of a signature by {} failed", sig.domain)
        return sig.result("permerror", f"cannot verify: {exc}")
    return sig.result("pass") if ok else sig.result("fail", "signature did not verify")
