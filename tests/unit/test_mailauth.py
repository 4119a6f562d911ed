"""geosmtp.mailauth without a network: canonicalization, header parsing, the
Authentication-Results field, DMARC, DKIM signing and verification (checked
against dkimpy in-process), SPF through a resolver of our own.

Through a real server and a real DNS server: tests/integration/test_sender_auth.py.
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
from types import SimpleNamespace

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from geosmtp.mail import Envelope, Mailbox
from geosmtp.mailauth import dkim_verify, dmarc
from geosmtp.mailauth.canon import BodyHasher, LineBlocks
from geosmtp.mailauth.dkim_sign import Signer, SigningKey, load_key, public_key_record
from geosmtp.mailauth.headers import (
    authserv_id,
    crlf,
    from_domains,
    parse_header_section,
)
from geosmtp.mailauth.results import (
    MAX_COMMENT,
    DKIMResult,
    DMARCResult,
    SPFResult,
    authentication_results,
    comment,
    pvalue,
)
from geosmtp.mailauth.spf_check import check_spf
from geosmtp.relay.mx import DNSTemporaryError

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # fast; dkimpy's minimum
KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
KEY_RECORD = public_key_record(KEY).encode()


# ------------------------------------------------------------ canonicalization


def streamed_hash(stored: bytes, relaxed: bool, limit=None, rng=None) -> bytes:  # type: ignore[no-untyped-def]
    """The body hash of `stored`, fed in random pieces as the spool would be read."""
    rng = rng or random.Random(0)
    lines, hasher, i = LineBlocks(), BodyHasher(relaxed, limit=limit), 0
    while i < len(stored):
        n = rng.randrange(1, 8)
        hasher.update(lines.feed(stored[i : i + n]))
        i += n
    hasher.update(lines.end())
    return hasher.digest()


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("relaxed", [False, True])
def test_streamed_body_hash_is_dkimpys_for_any_cut(line_end, relaxed):
    rng = random.Random(7)
    canon = dkim.canonicalization.Relaxed if relaxed else dkim.canonicalization.Simple
    pieces = [b"a", b" ", b"\t", b"x  y", b"\r\n", b"\r\n", b"\r\n\r\n", b" \t\r\n"]
    for _ in range(800):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 25)))
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"  # a message's body always ends a line on the wire
        limit = rng.choice([None, None, 0, 5, 17])
        expected = canon.canonicalize_body(body)
        if limit is not None:
            expected = expected[:limit]
        stored = body.replace(b"\r\n", line_end)
        assert streamed_hash(stored, relaxed, limit, rng) == hashlib.sha256(expected).digest(), body


def test_empty_bodies_canonicalize_as_rfc6376_says():
    assert streamed_hash(b"", False) == hashlib.sha256(b"\r\n").digest()  # §3.4.3
    assert streamed_hash(b"\n\n\n", False) == hashlib.sha256(b"\r\n").digest()
    assert streamed_hash(b"", True) == hashlib.sha256(b"").digest()  # §3.4.4
    assert streamed_hash(b" \t\n\n", True) == hashlib.sha256(b"").digest()


def test_a_last_line_without_its_end_gets_one_as_the_relay_sends_it():
    assert streamed_hash(b"abc  ", True) == hashlib.sha256(b"abc\r\n").digest()
    assert streamed_hash(b"abc\r", False) == hashlib.sha256(b"abc\r\n").digest()


# ------------------------------------------------------------ header section


def test_fields_unfold_and_any_line_end_ends_a_line():
    section = (
        b"Return-Path: <a@b.example>\nFrom: x@y.example\n\tcont\r\n"
        b"X: a\rAuthentication-Results: me; dkim=pass\nFrom garbage\n more\nSubject : hi"
    )
    fields = parse_header_section(section)
    assert [f.name for f in fields] == [
        b"Return-Path",
        b"From",
        b"X",
        b"Authentication-Results",  # a bare CR hides no field
        b"Subject",
    ]
    assert fields[1].raw == b"From: x@y.example\r\n\tcont\r\n"
    assert fields[4].raw == b"Subject : hi\r\n" and fields[4].text() == "hi"


def test_from_domains_reads_every_address_of_every_from_field():
    fields = parse_header_section(
        crlf(
            b'From: "Doe, J. (CEO)" <j@Example.ORG>, other@mail.example.org\n'
            b"To: t@to.example\nFrom: second@b\xc3\xbccher.example\n"
        )
    )
    assert from_domains(fields) == ["example.org", "mail.example.org", "xn--bcher-kva.example"]
    assert from_domains(parse_header_section(b"From: undisclosed\r\n")) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b" mx.test.example; dkim=pass", "mx.test.example"),
        (b"MX.Test.Example.;spf=pass", "mx.test.example"),
        (b" (sneaky (nested) comment) mx.test.example 1; dmarc=pass", "mx.test.example"),
        (b' "mx.test.example"; dkim=pass', "mx.test.example"),
        (b"\r\n\tmx.test.example;\r\n\tdkim=pass", "mx.test.example"),
        (b" mx.test.example", "mx.test.example"),
        (b" other.example; spf=pass", "other.example"),
        (b" ; none", None),
    ],
)
def test_authserv_id_however_it_is_written(value, expected):
    (field,) = parse_header_section(b"Authentication-Results:" + value + b"\r\n")
    assert authserv_id(field) == expected


# ------------------------------------------------------------ Authentication-Results


def test_the_field_names_every_result_one_a_line():
    field = authentication_results(
        "mx.test.example",
        SPFResult("pass", "mailfrom", "alice@example.org", "example.org"),
        [
            DKIMResult("pass", "example.org", "sel", "rsa-sha256", "AbCdEfGh1234/+=="),
            DKIMResult("fail", "example.org", "sel", "rsa-sha256", "AbCdEfGhXXXX", "body hash"),
        ],
        [DMARCResult("pass", "example.org", "reject", "none")],
    )
    assert field == (
        b"Authentication-Results: mx.test.example;\n"
        b"\tspf=pass smtp.mailfrom=alice@example.org;\n"
        b"\tdkim=pass header.d=example.org header.s=sel header.a=rsa-sha256"
        b' header.b="AbCdEfGh1234/+==";\n'
        b"\tdkim=fail (body hash) header.d=example.org header.s=sel header.a=rsa-sha256"
        b" header.b=AbCdEfGhXXXX;\n"
        b"\tdmarc=pass (p=reject dis=none) header.from=example.org\n"
    )


def test_no_checks_and_no_signatures():
    assert authentication_results("h", None, None, None) == b"Authentication-Results: h;\n\tnone\n"
    assert b"dkim=none (no signatures)" in authentication_results("h", None, [], None)
    spf = SPFResult("none", "helo", "[127.0.0.1]", "")
    assert b'spf=none smtp.helo="[127.0.0.1]"' in authentication_results("h", spf, None, None)


def test_what_came_from_outside_cannot_break_out_of_the_field():
    assert pvalue('se"l;\r\n\tdkim=pass') == '"se\\"l;??\tdkim=pass"'.replace("\t", "?")
    assert comment("x)\r\nAuthentication-Results: evil; dkim=pass (") == (
        " (x???Authentication-Results: evil; dkim=pass ?)"
    )
    assert len(comment("a" * 500)) <= MAX_COMMENT + 3
    field = authentication_results(
        "h", None, [DKIMResult("permerror", "d.example", "s\r\nX: y", reason="a\nb")], None
    )
    assert field.count(b"\n") == 2 and b"\r" not in field


# What geosmtp.dns's Resolver says when the DNS fails (the nameservers' own
# words in the inner parentheses): tests/integration/test_mx_resolution.py.
TIMED_OUT = "DNS lookup of {} TXT timed out (nameservers: 127.0.0.1:5353)"
SERVFAIL = (
    "DNS lookup of {} TXT failed: no nameserver answered it"
    " (SERVFAIL or REFUSED: 127.0.0.1:5353 SERVFAIL)"
)


@pytest.mark.parametrize("words", [TIMED_OUT, SERVFAIL])
def test_a_dns_failure_is_worded_once_per_check_and_whole(words):
    # Was: spf=temperror (SPF Temporary Error: DNS DNS lookup ... ?SERVFAIL or REFUSED: ...)
    resolver = FakeResolver(
        {("example.org", "TXT"): DNSTemporaryError(words.format("example.org"), "4.4.3")}
    )
    spf = check_spf(resolver, envelope("a@example.org"), "192.0.2.1", "mx.test")
    assert (spf.result, spf.reason) == ("temperror", words.format("example.org"))
    key = "sel._domainkey.example.org"
    (dkim_result,) = our_verdicts(
        dkimpy_signed(MESSAGE), {key: dkim_verify.KeyTemporaryError(words.format(key))}
    )
    down = DNSTemporaryError(words.format("_dmarc.example.org"), "4.4.3")
    dmarc_result = dmarc.find_policy("example.org", ORG, TXT({"_dmarc.example.org": down}))
    field = authentication_results("mx.test", spf, [dkim_result], [dmarc_result]).decode()
    lines = field.split("\n")
    assert (
        lines[1] == f"\tspf=temperror ({words.format('example.org')}) smtp.mailfrom=a@example.org;"
    )
    assert lines[2].startswith(f"\tdkim=temperror ({words.format(key)}) header.d=")
    dmarc_comment = words.format("_dmarc.example.org")
    assert lines[3] == f"\tdmarc=temperror ({dmarc_comment}) header.from=example.org"


def test_a_key_lookup_that_failed_without_words_names_the_key():
    key = "sel._domainkey.example.org"
    failed = {key: dkim_verify.KeyTemporaryError("lookup failed")}
    assert results(our_verdicts(dkimpy_signed(MESSAGE), failed)) == [
        ("temperror", f"key {key}: lookup failed")
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("timed out (nameservers: 127.0.0.1:53)", " (timed out (nameservers: 127.0.0.1:53))"),
        ("a (b) and (c)", " (a (b) and (c))"),
        ("a (b (c) d) e", " (a (b ?c? d) e)"),  # one comment inside the comment at most
        ("x) (y", " (x? ?y)"),  # no partner
        ("(a\\b)", " ((a?b))"),
        (")(", " (??)"),
    ],
)
def test_a_comment_keeps_parentheses_that_pair_up(text, expected):
    assert comment(text) == expected


def test_a_long_comment_is_cut_at_a_space_and_stays_closed():
    text = (
        "DNS lookup of "
        + "x" * 100
        + " TXT failed: no nameserver (SERVFAIL or REFUSED: "
        + ("127.0.0.1:5353 SERVFAIL; " * 5)
    )
    cut = comment(text + ")")
    assert len(cut) <= MAX_COMMENT + 3 and cut.endswith(" SERVFAIL;...))")
    assert cut.count("(") == cut.count(")") == 2 and "?" not in cut


# ------------------------------------------------------------ DMARC

ORG = dmarc.public_suffixes()


def test_the_organizational_domain_comes_from_the_public_suffix_list():
    assert ORG("a.b.example.co.uk") == "example.co.uk"
    assert ORG("mail.example.org") == "example.org"
    assert ORG("co.uk") == "co.uk"  # a public suffix is its own


@pytest.mark.parametrize(
    ("text", "record"),
    [
        ("v=DMARC1; p=reject", dmarc.Record("reject")),
        ("v=DMARC1;p=Quarantine;sp=none;adkim=s;aspf=s;pct=30;",
         dmarc.Record("quarantine", "none", "s", "s", 30)),
        ("v=DMARC1; p=none; x=unknown; adkim=q; pct=300", dmarc.Record("none")),
        ("v=DMARC1; rua=mailto:r@example.org", dmarc.Record("none")),  # §6.6.3: p=none
        ("v=DMARC1; p=bogus; rua=mailto:r@example.org", dmarc.Record("none")),
    ],
)  # fmt: skip
def test_dmarc_records(text, record):
    assert dmarc.is_dmarc_record(text)
    assert dmarc.parse_record(text) == record


@pytest.mark.parametrize("text", ["v=DMARC1; p=bogus", "v=DMARC1; sp=reject", "v=DMARC1; junk"])
def test_unusable_dmarc_records(text):
    with pytest.raises(dmarc.RecordError):
        dmarc.parse_record(text)


@pytest.mark.parametrize("text", ["v=spf1 -all", "p=reject; v=DMARC1", "v=DMARC2; p=reject", ""])
def test_what_is_not_a_dmarc_record(text):
    assert not dmarc.is_dmarc_record(text)


class TXT:
    """A fake DNS: name -> TXT texts; a name mapped to an exception raises it."""

    def __init__(self, records: dict) -> None:
        self.records = records
        self.asked: list[str] = []

    def __call__(self, name: str) -> list[str]:
        self.asked.append(name)
        found = self.records.get(name, [])
        if isinstance(found, Exception):
            raise found
        return found


def evaluate(domain, txt, spf=None, dkim_results=(), rng=None):  # type: ignore[no-untyped-def]
    found = dmarc.find_policy(domain, ORG, txt)
    return dmarc.evaluate(domain, found, spf, list(dkim_results), ORG, rng)


def spf_result(result: str, domain: str) -> SPFResult:
    return SPFResult(result, "mailfrom", f"x@{domain}", domain)


def test_dmarc_pass_by_a_relaxed_dkim_or_spf_alignment():
    txt = TXT({"_dmarc.example.org": ["v=DMARC1; p=reject"]})
    signed = [DKIMResult("pass", "mail.example.org")]
    assert evaluate("example.org", txt, None, signed).result == "pass"
    assert evaluate("example.org", txt, spf_result("pass", "bounce.example.org")).result == "pass"
    failed = evaluate("example.org", txt, spf_result("pass", "other.example"))
    assert (failed.result, failed.policy, failed.disposition) == ("fail", "reject", "reject")
    # A failing signature of the right domain does not count.
    assert evaluate("example.org", txt, None, [DKIMResult("fail", "example.org")]).result == "fail"


def test_strict_alignment_wants_the_same_domain():
    txt = TXT({"_dmarc.example.org": ["v=DMARC1; p=reject; adkim=s; aspf=s"]})
    assert evaluate("example.org", txt, None, [DKIMResult("pass", "mail.example.org")]).result == (
        "fail"
    )
    assert evaluate("example.org", txt, spf_result("pass", "example.org")).result == "pass"


def test_a_subdomain_falls_back_to_the_organizational_domain_and_its_sp():
    txt = TXT({"_dmarc.example.org": ["v=DMARC1; p=none; sp=reject"]})
    result = evaluate("news.example.org", txt, spf_result("fail", "news.example.org"))
    assert (result.result, result.policy) == ("fail", "reject")
    assert txt.asked == ["_dmarc.news.example.org", "_dmarc.example.org"]
    # Found at the From domain itself: p applies.
    assert evaluate("example.org", txt).policy == "none"


def test_no_record_several_records_or_other_txt_is_no_policy():
    assert evaluate("example.org", TXT({})).result == "none"
    assert evaluate("example.org", TXT({"_dmarc.example.org": ["v=spf1 -all"]})).result == "none"
    two = TXT({"_dmarc.example.org": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert evaluate("example.org", two).result == "none"
    assert two.asked == ["_dmarc.example.org"]  # §6.6.3: discovery ends there


def test_dns_failures_are_temperror_never_a_pass_or_fail():
    down = DNSTemporaryError("timed out", "4.4.3")
    assert evaluate("example.org", TXT({"_dmarc.example.org": down})).result == "temperror"
    txt = TXT({"_dmarc.example.org": ["v=DMARC1; p=reject"]})
    result = evaluate("example.org", txt, spf_result("temperror", "example.org"))
    assert result.result == "temperror"  # it could pass once the DNS answers
    broken = TXT({"_dmarc.example.org": ["v=DMARC1; p=bogus"]})
    assert evaluate("example.org", broken).result == "permerror"


def test_pct_samples_the_policy_down():
    txt = TXT({"_dmarc.example.org": ["v=DMARC1; p=reject; pct=50"]})
    rng = random.Random(3)
    dispositions = {
        evaluate("example.org", txt, spf_result("fail", "example.org"), rng=rng).disposition
        for _ in range(50)
    }
    assert dispositions == {"reject", "quarantine"}


# ------------------------------------------------------------ DKIM signing

MESSAGE = (
    b"Return-Path: <alice@example.org>\n"
    b"Received: from client ([127.0.0.1])\n\tby mx (geosmtp) with ESMTPSA id Q1; now\n"
    b"From: Alice <alice@example.org>\nTo: bob@example.net\n"
    b"Subject:   hello\n  folded  world \nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
    b"Message-ID: <1@example.org>\n\nBody  line \t\n\n\nsecond line\n\n\n"
)


def split(message: bytes) -> tuple[list, bytes]:
    head, _, body = message.partition(b"\n\n")
    return parse_header_section(crlf(head + b"\n")), body


def signed(message: bytes, canonicalization: str = "relaxed/relaxed") -> bytes:
    signer = Signer(
        {"example.org": SigningKey("example.org", "sel", KEY)}, canonicalization=canonicalization
    )
    fields, body = split(message)
    bh = streamed_hash(body, signer.relaxed_body)
    return (
        signer.signature_field(signer.keys["example.org"], fields, bh, int(time.time())) + message
    )


def dkimpy_verifies(message: bytes, record: bytes = KEY_RECORD) -> bool:
    return dkim.verify(crlf(message), dnsfunc=lambda name, timeout=5: record)


@pytest.mark.parametrize(
    "canonicalization", ["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"]
)
def test_our_signatures_verify_with_dkimpy(canonicalization):
    message = signed(MESSAGE, canonicalization)
    assert message.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=" + canonicalization.encode())
    assert all(len(line) <= 78 for line in message.split(b"\n"))
    assert dkimpy_verifies(message)
    assert not dkimpy_verifies(message.replace(b"second line", b"second lime"))
    assert not dkimpy_verifies(message.replace(b"hello", b"HELLO"))


def test_from_is_signed_once_more_than_there_are():
    message = signed(MESSAGE)
    assert b"h=from:from:subject:date:to:message-id;" in message
    # A second From: added above the signed one breaks the signature.
    assert not dkimpy_verifies(b"From: mallory@evil.example\n" + message)
    # Fields not signed may be added.
    assert dkimpy_verifies(b"X-Spam: no\n" + message)


def test_signing_keys_must_be_usable_rsa_keys(tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(KEY_PEM)
    assert load_key(path).key_size == 1024
    path.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="PEM"):
        load_key(path)
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="RSA"):
        load_key(path)
    with pytest.raises(OSError):
        load_key(tmp_path / "missing.pem")


# ------------------------------------------------------------ DKIM verification


def dkimpy_signed(message: bytes, selector=b"sel", domain=b"example.org", **options) -> bytes:  # type: ignore[no-untyped-def]
    options.setdefault("canonicalize", (b"relaxed", b"relaxed"))
    field = dkim.sign(crlf(message), selector, domain, KEY_PEM, **options)
    return field.replace(b"\r\n", b"\n") + message


def our_verdicts(message: bytes, keys: dict | None = None) -> list[DKIMResult]:
    """The verifier's three steps, as the stage runs them, on a stored message."""
    head, _, body = message.partition(b"\n\n")
    section = crlf(head + b"\n")
    sigs = dkim_verify.signatures(parse_header_section(section), 5)
    hashes = {}
    for key in {s.body_key for s in sigs if s.error is None}:
        lines, hasher = LineBlocks(), BodyHasher(*key)
        hasher.update(lines.feed(body))
        hasher.update(lines.end())
        hashes[key] = hasher.digest()
    keys = keys if keys is not None else {"sel._domainkey.example.org": KEY_RECORD}
    return dkim_verify.verify(section, sigs, keys, hashes)


def results(verdicts: list[DKIMResult]) -> list[tuple[str, str]]:
    return [(v.result, v.reason) for v in verdicts]


def test_a_dkimpy_signature_passes_and_a_change_fails():
    message = dkimpy_signed(MESSAGE)
    (verdict,) = our_verdicts(message)
    assert (verdict.result, verdict.domain, verdict.selector) == ("pass", "example.org", "sel")
    assert verdict.signature.startswith(verdict.signature[:8]) and len(verdict.signature) > 100
    assert results(our_verdicts(message.replace(b"second line", b"2nd line"))) == [
        ("fail", "body hash did not verify")
    ]
    assert results(our_verdicts(message.replace(b"hello", b"HELLO"))) == [
        ("fail", "signature did not verify")
    ]


@pytest.mark.parametrize(
    "canonicalize",
    [(b"simple", b"simple"), (b"relaxed", b"simple"), (b"simple", b"relaxed")],
)
def test_every_canonicalization_verifies(canonicalize):
    (verdict,) = our_verdicts(dkimpy_signed(MESSAGE, canonicalize=canonicalize))
    assert verdict.result == "pass"


def test_l_lets_a_body_grow():
    message = dkimpy_signed(MESSAGE, length=True) + b"appended by a list\n"
    assert results(our_verdicts(message)) == [("pass", "")]


def test_key_problems_are_permerror_and_dns_failures_temperror():
    message = dkimpy_signed(MESSAGE)
    assert results(our_verdicts(message, {})) == [
        ("permerror", "no key at sel._domainkey.example.org")
    ]
    down = {"sel._domainkey.example.org": dkim_verify.KeyTemporaryError("timed out")}
    assert our_verdicts(message, down)[0].result == "temperror"
    revoked = {"sel._domainkey.example.org": b"v=DKIM1; k=rsa; p="}
    assert our_verdicts(message, revoked)[0].result == "permerror"
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    wrong = {"sel._domainkey.example.org": public_key_record(other_key).encode()}
    assert results(our_verdicts(message, wrong)) == [("fail", "signature did not verify")]


def test_broken_and_refused_signatures_are_permerror():
    sha1 = dkimpy_signed(MESSAGE, signature_algorithm=b"rsa-sha1")
    assert our_verdicts(sha1)[0].result == "permerror"
    assert "RFC 8301" in our_verdicts(sha1)[0].reason
    garbage = b"DKIM-Signature: v=1; this is no tag list\n" + MESSAGE
    assert our_verdicts(garbage)[0].result == "permerror"
    no_domain = b"DKIM-Signature: v=1; a=rsa-sha256; s=sel; bh=AAAA; b=AAAA; h=from\n" + MESSAGE
    assert results(our_verdicts(no_domain)) == [("permerror", "no d= or s= tag")]


def test_every_signature_is_verified_up_to_the_limit():
    message = dkimpy_signed(dkimpy_signed(MESSAGE, selector=b"gone"))
    assert [(v.result, v.selector) for v in our_verdicts(message)] == [
        ("pass", "sel"),
        ("permerror", "gone"),
    ]
    many = MESSAGE
    for _ in range(7):
        many = dkimpy_signed(many)
    head = parse_header_section(crlf(many.partition(b"\n\n")[0] + b"\n"))
    assert len(dkim_verify.signatures(head, 5)) == 5


def test_our_own_signature_passes_our_own_check():
    assert results(our_verdicts(signed(MESSAGE))) == [("pass", "")]


# ------------------------------------------------------------ SPF


class FakeResolver:
    """`Resolver.lookup` over a dict: (name, type) -> records or an exception."""

    def __init__(self, records: dict) -> None:
        self.records = records
        self.asked: list[tuple[str, str]] = []

    def lookup(self, name: str, rdtype: str) -> list:
        self.asked.append((name, rdtype))
        found = self.records.get((name, rdtype), [])
        if isinstance(found, Exception):
            raise found
        return found


def txt(*texts: str) -> list:
    return [SimpleNamespace(strings=(t.encode(),)) for t in texts]


def envelope(sender: str | None, helo: str = "client.example") -> Envelope:
    mailbox = None if sender is None else Mailbox(*sender.split("@"))
    return Envelope(helo, True, mailbox)


SPF_ZONE = {
    ("example.org", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 include:inc.example.org -all"),
    ("inc.example.org", "TXT"): txt("v=spf1 a:mail.example.org ~all"),
    ("mail.example.org", "A"): [SimpleNamespace(address="198.51.100.7")],
    ("client.example", "TXT"): txt("v=spf1 ip6:2001:db8::/32 -all"),
}


@pytest.mark.parametrize(
    ("ip", "sender", "result"),
    [
        ("192.0.2.9", "a@example.org", "pass"),
        ("198.51.100.7", "a@example.org", "pass"),  # include: -> a:
        ("::ffff:198.51.100.7", "a@example.org", "pass"),
        ("203.0.113.1", "a@example.org", "fail"),
        ("203.0.113.1", "a@nothing.example", "none"),
        ("2001:db8::1", None, "pass"),  # <>: the HELO identity
        ("203.0.113.1", None, "fail"),
    ],
)
def test_spf_through_our_resolver(ip, sender, result):
    resolver = FakeResolver(SPF_ZONE)
    verdict = check_spf(resolver, envelope(sender), ip, "mx.test")
    assert verdict.result == result
    assert verdict.identity == ("mailfrom" if sender else "helo")
    assert verdict.domain == (sender.split("@")[1] if sender else "client.example")
    assert resolver.asked[0] == (verdict.domain, "TXT")


def test_spf_dns_failures_are_temperror():
    down = DNSTemporaryError("timed out", "4.4.3")
    resolver = FakeResolver({**SPF_ZONE, ("inc.example.org", "TXT"): down})
    verdict = check_spf(resolver, envelope("a@example.org"), "203.0.113.1", "mx.test")
    assert verdict.result == "temperror" and "timed out" in verdict.reason


def test_pyspf_keeps_its_own_dns_outside_our_checks(monkeypatch):
    import spf

    check_spf(FakeResolver(SPF_ZONE), envelope("a@example.org"), "192.0.2.1", "mx.test")
    seen = []
    monkeypatch.setattr(
        "geosmtp.mailauth.spf_check._pyspf_lookup", lambda *a: seen.append(a[:2]) or []
    )
    assert spf.check2("192.0.2.1", "a@example.org", "h.example")[0] == "none"
    assert seen == [("example.org", "TXT")]


def test_body_hash_key_names_what_a_signature_needs():
    message = dkimpy_signed(MESSAGE, canonicalize=(b"simple", b"relaxed"), length=True)
    head = parse_header_section(crlf(message.partition(b"\n\n")[0] + b"\n"))
    (sig,) = dkim_verify.signatures(head, 5)
    body = MESSAGE.partition(b"\n\n")[2]
    canonical = dkim.canonicalization.Relaxed.canonicalize_body(crlf(body))
    assert sig.body_key == (True, "sha256", len(canonical))
    assert base64.b64encode(hashlib.sha256(canonical).digest()) in message.replace(b"\n\t", b"")


# ------------------------------------------------------------ Ed25519 (RFC 8463)


def test_an_ed25519_signature_is_verified():
    """docs/authentication.md says Ed25519 signatures are verified: dkimpy does
    it with PyNaCl, a dependency of geosmtp's (its password checks)."""
    private = ed25519.Ed25519PrivateKey.generate()
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    field = dkim.sign(
        crlf(MESSAGE),
        b"sel",
        b"example.org",
        base64.b64encode(seed),
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=b"ed25519-sha256",
    )
    message = field.replace(b"\r\n", b"\n") + MESSAGE
    keys = {"sel._domainkey.example.org": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)}
    assert results(our_verdicts(message, keys)) == [("pass", "")]
    assert results(our_verdicts(message.replace(b"hello", b"HELLO"), keys)) == [
        ("fail", "signature did not verify")
    ]
