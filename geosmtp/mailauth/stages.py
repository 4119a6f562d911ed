"""The two pipeline stages: sender checks on incoming mail, DKIM signing of outgoing.

Both are `pipeline.Stage`s: `process(message)` answers `Accept`, `Replace`
(a new spool file, the header added), `TempFail` or `Reject`. They wait on
the DNS in the session's greenlet (dnspython's sockets are gevent's: the CLI
patches the standard library first). The file and CPU work (reading the
spool, hashing the body, dkimpy, RSA, writing the new spool file) of a
message of `INLINE_LIMIT` octets or more goes to the hub's threadpool, so
other sessions go on meanwhile; for a smaller one it is done in the greenlet,
as the session writes the spool: a few page-cache reads and writes and well
under a millisecond of CPU, less than a trip to the threadpool costs when the
hub is busy (the thread waits for the GIL at every system call, up to the
5 ms switch interval each time: measured, a third of the throughput).

Order in the pipeline: the inbound checks first, before any filter can change
what the sender signed; signing last, so the signature covers the message as
it leaves.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
from loguru import logger

from ..config import AuthChecks, CheckPolicy, DKIMSigning
from ..dns import DNSTemporaryError, Resolver
from ..mail.address import canonical_domain
from ..pipeline.message import Message
from ..pipeline.stages import Accept, Reject, Replace, StageResult, TempFail, printable
from ..storage import Spool, SpoolFile, StorageError
from ..storage.spool import read_return_path
from . import dkim_verify, dmarc
from .canon import BodyHasher, LineBlocks
from .dkim_sign import Signer, SigningKey, load_key
from .headers import authserv_id, crlf, field_groups, from_domains, header_lines
from .headers import parse_header_section as parse_fields
from .results import DKIMResult, DMARCResult, SPFResult, authentication_results
from .spf_check import check_spf

#: The most of a header section read; a larger one is refused (552 5.3.4): it
#: could hide a field from the checks. Postfix's header_size_limit is 100 KiB.
HEADER_LIMIT = 1024 * 1024
_BLOCK = 64 * 1024
#: Messages of this size or more have their file and CPU work done in the threadpool.
INLINE_LIMIT = 256 * 1024
#: The first empty line: two line ends in a row, each a CRLF, a CR or an LF.
_HEADER_END_RE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(\r\n|\r(?!\n)|\n)")

T = TypeVar("T")
Offload = Callable[..., Any]


@dataclass
class Head:
    """A stored message's header section, read whole, and where its body starts."""

    return_path: bytes  # our own first line (`Return-Path:`), or b""
    section: bytes  # the fields after it, as stored, with the last line's end
    separator: bytes  # the empty line ("" when the message has no body)
    body_offset: int  # in the file


_LINE_END_RE = re.compile(rb"\r\n|\r(?!\n)|\n")


def _split_head(buf: bytes, final: bool) -> tuple[bytes, bytes, int] | None:
    """(section, the empty line, where the body starts) once `buf` holds the
    empty line; None while more is needed (also when `buf` ends in a CR that
    may be the first half of a CRLF)."""
    first = _LINE_END_RE.match(buf)
    if first is not None:  # an empty first line: no header fields
        found = (b"", first.group(0), first.end())
    else:
        match = _HEADER_END_RE.search(buf)
        if match is None:
            return None
        found = (buf[: match.start(1)], match.group(1), match.end())
    if not final and found[2] == len(buf) and buf.endswith(b"\r"):
        return None
    return found


def read_head(path: str, limit: int = HEADER_LIMIT) -> Head | None:
    """The header section of the file at `path`; None when it is over `limit`.
    Blocking file work."""
    with open(path, "rb") as f:
        return_path = read_return_path(f)
        buf = b""
        while True:
            block = f.read(_BLOCK)
            buf += block
            found = _split_head(buf, final=not block)
            if found is None and not block:  # no empty line: the message is all header
                found = (buf, b"", len(buf))
            if found is not None:
                break
            if len(return_path) + len(buf) > limit:
                return None
    section, separator, offset = found
    if len(return_path) + len(section) > limit:
        return None
    return Head(return_path, section, separator, len(return_path) + offset)


def write_spool(
    spool: Spool, path: str, head: Head, added: bytes, keep: Callable[[bytes | None, list], bool]
) -> SpoolFile:
    """A new spool file: the Return-Path line, `added`, the header fields that
    `keep(name, lines)` keeps (as stored), the empty line, the body copied as
    it is. Every byte goes through the spool file's `write()`, so its sizes
    (the Maildir name's `S=` and `W=`) count the body too. Blocking file work.
    StorageError on a disk error."""
    new = spool.open()
    try:
        new.write(head.return_path + added)
        for name, lines in field_groups(header_lines(head.section)):
            if keep(name, lines):
                new.write(b"".join(lines))
        new.write(head.separator)
        new.append_file(path, head.body_offset)
        new.flush()
    except OSError as exc:
        new.remove()
        raise StorageError.wrap(exc) from exc
    except BaseException:
        new.remove()
        raise
    return new


def hash_bodies(path: str, offset: int, wanted: set) -> dict:
    """The body hashes `wanted` ({(relaxed, hash, l=)}), one pass over the body."""
    hashers = {k: BodyHasher(k[0], k[1], k[2]) for k in wanted}
    lines = LineBlocks()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(_BLOCK):
            text = lines.feed(block)
            for h in hashers.values():
                h.update(text)
    text = lines.end()
    for h in hashers.values():
        h.update(text)
    return {k: h.digest() for k, h in hashers.items()}


def _inline(fn: Callable[..., T], *args: object) -> T:
    return fn(*args)


def _runner(message: Message, offload: Offload) -> Offload:
    """Where a message's file and CPU work runs: the threadpool from
    `INLINE_LIMIT` octets, else the greenlet (the module's docstring says why)."""
    return offload if message.size >= INLINE_LIMIT else _inline


def _from_own_users(message: Message, trusted: Callable[[str], bool]) -> bool:
    """Mail from an authenticated client or a trusted network: not checked, signed."""
    return message.envelope.auth_user is not None or trusted(message.client)


def _unreadable(queue_id: str, exc: Exception) -> TempFail:
    logger.error("{}: cannot read or write the spooled message: {}", queue_id, exc)
    return TempFail(f"spool: {exc}")


# ------------------------------------------------------------ inbound checks


class SenderChecks:
    """SPF, DKIM and DMARC on mail arriving on the configured roles, written into
    one `Authentication-Results:` field at the top; earlier ones that claim our
    authserv-id are removed (RFC 8601 §5). Refuses when a check's policy says so.
    Mail from an authenticated client or a trusted network is not checked."""

    name = "sender-checks"
    group = "sender-checks"  # a refusal's metrics label, never a filter's

    def __init__(
        self,
        settings: AuthChecks,
        hostname: str,
        resolver: Resolver,
        spool: Spool,
        trusted: Callable[[str], bool],
        offload: Offload,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.hostname = hostname
        self.authserv_id = hostname.lower().rstrip(".")
        self.resolver = resolver
        self.spool = spool
        self.trusted = trusted
        self.offload = offload
        self.rng = rng
        self.org = dmarc.public_suffixes(settings.public_suffix_list)

    def applies(self, message: Message) -> bool:
        return message.role in self.settings.roles and not _from_own_users(message, self.trusted)

    def process(self, message: Message) -> StageResult:
        if not self.applies(message):
            return Accept()
        path = message.spool.path
        run = _runner(message, self.offload)
        try:
            message.spool.flush()
            head = run(read_head, path)
        except (OSError, StorageError) as exc:
            return _unreadable(message.queue_id, exc)
        if head is None:
            logger.warning(
                "{}: header section over {} octets, refused", message.queue_id, HEADER_LIMIT
            )
            return Reject("header section too large", 552, "5.3.4", "Header section too large")
        try:
            spf, dkim, dmarc_results = self._check(message, head, run)
        except (OSError, StorageError) as exc:
            return _unreadable(message.queue_id, exc)
        field = authentication_results(self.hostname, spf, dkim, dmarc_results)
        logger.debug("{}: {}", message.queue_id, " ".join(field.decode("utf-8", "replace").split()))
        message.auth_results.update(_summary(spf, dkim, dmarc_results))
        refusal = self._refusal(message, spf, dkim, dmarc_results)
        if refusal is not None:
            logger.info("{}: refused: {}", message.queue_id, refusal.reason)
            return refusal
        try:
            new = run(write_spool, self.spool, path, head, field, self._keep)
        except StorageError as exc:
            return _unreadable(message.queue_id, exc)
        return Replace(new)

    def _keep(self, name: bytes | None, lines: list) -> bool:
        """Every field but an Authentication-Results that claims to be ours."""
        if name is None or name.lower() != b"authentication-results":
            return True
        (f,) = parse_fields(b"".join(lines)) or (None,)
        return f is None or authserv_id(f) != self.authserv_id

    # ------------------------------------------------------------ checks

    def _check(
        self, message: Message, head: Head, run: Offload
    ) -> tuple[SPFResult | None, list[DKIMResult] | None, list[DMARCResult] | None]:
        settings = self.settings
        fields = parse_fields(head.section)
        sigs = (
            dkim_verify.signatures(fields, settings.max_signatures) if settings.dkim.enabled else []
        )
        authors = from_domains(fields) if settings.dmarc.enabled else []
        jobs: dict[str, gevent.Greenlet] = {}
        if settings.spf.enabled:
            jobs["spf"] = gevent.spawn(
                check_spf, self.resolver, message.envelope, message.client, self.hostname
            )
        for name in dict.fromkeys(s.key_name for s in sigs if s.error is None):
            jobs[f"key:{name}"] = gevent.spawn(self._key, name)
        for domain in authors:
            jobs[f"dmarc:{domain}"] = gevent.spawn(dmarc.find_policy, domain, self.org, self._txt)
        try:
            wanted = {s.body_key for s in sigs if s.error is None}
            # A large body is hashed in the threadpool while the DNS answers come in.
            hashes = (
                run(hash_bodies, message.spool.path, head.body_offset, wanted) if wanted else {}
            )
            gevent.joinall(list(jobs.values()))
        finally:
            gevent.killall([g for g in jobs.values() if not g.dead], block=False)
        for key, job in jobs.items():
            if not job.successful():  # a bug: never a pass, and the traceback logged
                logger.opt(exception=job.exception).error("{}: {} failed", message.queue_id, key)
        spf = self._value(jobs.get("spf"), None)
        if settings.spf.enabled and spf is None:
            env = message.envelope
            spf = SPFResult(
                "temperror",
                "mailfrom" if env.sender else "helo",
                env.sender_address or env.helo,
                "",
                "check failed",
            )
        dkim: list[DKIMResult] | None = None
        if settings.dkim.enabled:
            keys = {
                s.key_name: self._value(
                    jobs.get(f"key:{s.key_name}"), dkim_verify.KeyTemporaryError("lookup failed")
                )
                for s in sigs
                if s.error is None
            }
            section = crlf(head.section)
            dkim = run(dkim_verify.verify, section, sigs, keys, hashes) if sigs else []
        results: list[DMARCResult] | None = None
        if settings.dmarc.enabled:
            results = []
            for domain in authors:
                found = self._value(
                    jobs[f"dmarc:{domain}"], DMARCResult("temperror", domain, reason="check failed")
                )
                results.append(dmarc.evaluate(domain, found, spf, dkim, self.org, self.rng))
            if not authors:
                results.append(DMARCResult("permerror", "", reason="no From: domain"))
        return spf, dkim, results

    @staticmethod
    def _value(job: gevent.Greenlet[..., T] | None, failed: T) -> T:
        return job.get(block=False) if job is not None and job.successful() else failed

    def _txt(self, name: str) -> list[str]:
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in self.resolver.lookup(name, "TXT")
        ]

    def _key(self, name: str) -> bytes | dkim_verify.KeyTemporaryError | None:
        try:
            records = self.resolver.lookup(name, "TXT")
        except DNSTemporaryError as exc:
            return dkim_verify.KeyTemporaryError(exc.message)
        return dkim_verify.key_record([list(r.strings) for r in records])

    # ------------------------------------------------------------ policy

    def _refusal(
        self,
        message: Message,
        spf: SPFResult | None,
        dkim: list[DKIMResult] | None,
        dmarc_results: list[DMARCResult] | None,
    ) -> TempFail | Reject | None:
        """What the configured policies make of the results: a refusal beats a
        deferral (it is final either way), the first check's first. Its reason
        (the log's) names every failure a policy acts on, whatever its policy
        said, refusals first: `dmarc=fail (reject), spf=fail (tempfail)`."""
        s = self.settings
        # (the result, what its policy says, the refusal that makes)
        failed: list[tuple[str, str, TempFail | Reject | None]] = []
        if spf is not None:
            if spf.result == "fail":
                text = f"SPF: {message.client} is not allowed to send mail from {spf.domain}"
                failed.append(("spf=fail", s.spf.on_fail, _on(s.spf.on_fail, 550, "5.7.23", text)))
            elif spf.result == "temperror":
                failed.append(
                    ("spf=temperror", s.spf.on_temperror, _defer(s.spf, "spf", spf.domain))
                )
        if dkim and not any(r.result == "pass" for r in dkim):
            if any(r.result == "fail" for r in dkim):
                text = "No passing DKIM signature found"
                failed.append(
                    ("dkim=fail", s.dkim.on_fail, _on(s.dkim.on_fail, 550, "5.7.20", text))
                )
            elif any(r.result == "temperror" for r in dkim):
                defer = _defer(s.dkim, "dkim", dkim[0].domain)
                failed.append(("dkim=temperror", s.dkim.on_temperror, defer))
        for d in dmarc_results or ():
            if d.result == "fail" and d.disposition == "reject":
                text = f"Unauthenticated mail from {d.domain} refused by its DMARC policy"
                refusal = _on(s.dmarc.on_fail, 550, "5.7.1", text)
                failed.append(("dmarc=fail", s.dmarc.on_fail, refusal))
            elif d.result == "temperror":
                defer = _defer(s.dmarc, "dmarc", d.domain)
                failed.append(("dmarc=temperror", s.dmarc.on_temperror, defer))
        failed.sort(key=lambda f: _SEVERITY[type(f[2])])  # stable: in the checks' order
        decided = failed[0][2] if failed else None
        if decided is None:
            return None
        reason = ", ".join(f"{result} ({action})" for result, action, _ in failed)
        return dataclasses.replace(decided, reason=reason)


def _summary(
    spf: SPFResult | None, dkim: list[DKIMResult] | None, dmarc_results: list[DMARCResult] | None
) -> dict[str, str]:
    """Each check's result words, for the access log: a check that did not run
    is left out; DKIM has one per signature (`none` without any)."""
    found = {}
    if spf is not None:
        found["spf"] = spf.result
    if dkim is not None:
        found["dkim"] = ",".join(r.result for r in dkim) or "none"
    if dmarc_results is not None:
        found["dmarc"] = ",".join(d.result for d in dmarc_results) or "none"
    return found


def _reply_text(text: str) -> str:
    """A reply's text with what came from the client (a domain, a HELO name) made
    printable US-ASCII, and short (RFC 5321 §4.5.3.1.5: a reply line is 512 octets)."""
    return printable(text)[:300]


#: Which refusal decides: a final one, then a deferral, then none (`record`).
_SEVERITY = {Reject: 0, TempFail: 1, type(None): 2}


def _on(action: str, code: int, status: str, text: str) -> TempFail | Reject | None:
    """The refusal a failure's `on_fail` asks for (its reason is given later)."""
    text = _reply_text(text)
    if action == "reject":
        return Reject("", code, status, text)
    if action == "tempfail":
        return TempFail("", 451, "4" + status[1:], text + "; try again later")
    return None


def _defer(policy: CheckPolicy, check: str, domain: str) -> TempFail | None:
    """The deferral a temperror's `on_temperror` asks for, or None (`record`)."""
    if policy.on_temperror != "tempfail":
        return None
    text = f"{check.upper()} check of {domain or 'the sender'} failed for now; try again later"
    return TempFail("", 451, "4.4.3", _reply_text(text))


# ------------------------------------------------------------ signing


def build_signer(settings: DKIMSigning) -> Signer | None:
    """The signer for `dkim:`, its keys read; None when no domain is configured.
    OSError or ValueError when a key cannot be used (the config check says which)."""
    if not settings.domains:
        return None
    keys = {}
    for domain, entry in settings.domains.items():
        name = canonical_domain(domain)
        assert entry.selector is not None and entry.key_file is not None  # config._check
        keys[name] = SigningKey(name, entry.selector, load_key(entry.key_file))
    return Signer(keys, settings.headers, settings.canonicalization)


class DKIMSign:
    """Signs mail from authenticated clients and trusted networks that has a
    remote recipient, with the key of its From: domain, before it is routed.
    A message for local and remote recipients is one message in the pipeline:
    the local copy carries the signature too, which does no harm."""

    name = "dkim-sign"
    group = "dkim-sign"

    def __init__(
        self,
        signer: Signer,
        spool: Spool,
        trusted: Callable[[str], bool],
        offload: Offload,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signer = signer
        self.spool = spool
        self.trusted = trusted
        self.offload = offload
        self.clock = clock

    def applies(self, message: Message) -> bool:
        return _from_own_users(message, self.trusted) and bool(message.envelope.remote)

    def process(self, message: Message) -> StageResult:
        if not self.applies(message):
            return Accept()
        try:
            message.spool.flush()
            run = _runner(message, self.offload)
            new = run(self._sign, message)
        except (OSError, StorageError) as exc:
            return _unreadable(message.queue_id, exc)
        return Accept() if new is None else Replace(new)

    def _sign(self, message: Message) -> SpoolFile | None:
        """Read, hash, sign, write (blocking); None when not signed."""
        path = message.spool.path
        head = read_head(path)
        if head is None:
            logger.warning("{}: header section too large to sign", message.queue_id)
            return None
        fields = parse_fields(head.section)
        domains = from_domains(fields)
        key = self.signer.key_for(domains[0]) if len(domains) == 1 else None
        if key is None:
            logger.debug("{}: not signed (From: domains {})", message.queue_id, domains or "none")
            return None
        new = _signed_copy(self.signer, self.spool, path, head, fields, key, int(self.clock()))
        logger.debug("{}: signed for {} (s={})", message.queue_id, key.domain, key.selector)
        return new


def sign_file(
    signer: Signer, spool: Spool, path: str, domains: Sequence[str], now: int
) -> SpoolFile | None:
    """The message at `path` (as the spool keeps it) signed with the key of the
    first of `domains` that has one: a new spool file, `path` left as it is;
    None when none of them has a key, or the header section is too large.
    What the server signs as its own sender (delivery reports, `queue.reports`);
    `DKIMSign` signs clients' mail by their From: domain. Blocking file work;
    StorageError or OSError when a file cannot be read or written."""
    key = next((k for d in domains if (k := signer.key_for(canonical_domain(d)))), None)
    if key is None:
        return None
    head = read_head(path)
    if head is None:
        return None
    return _signed_copy(signer, spool, path, head, parse_fields(head.section), key, now)


def _signed_copy(
    signer: Signer,
    spool: Spool,
    path: str,
    head: Head,
    fields: list,
    key: SigningKey,
    now: int,
) -> SpoolFile:
    """A new spool file: the message at `path` with `key`'s signature on top."""
    (body_hash,) = hash_bodies(
        path, head.body_offset, {(signer.relaxed_body, "sha256", None)}
    ).values()
    field = signer.signature_field(key, fields, body_hash, now)
    return write_spool(spool, path, head, field, lambda name, lines: True)
