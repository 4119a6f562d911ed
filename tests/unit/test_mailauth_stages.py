"""The sender-check and DKIM-signing stages on real spool files, with a fake DNS.

The file work runs inline here (`offload` calls the function); under the
server it runs in the hub's threadpool. Through the real server:
tests/integration/test_sender_auth.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import dkim
import pytest

from geosmtp.config import AuthChecks, CheckPolicy, DKIMSigning
from geosmtp.mail import Envelope, Mailbox, Recipient
from geosmtp.mailauth import stages
from geosmtp.mailauth.dkim_sign import Signer, SigningKey
from geosmtp.mailauth.headers import crlf
from geosmtp.mailauth.stages import DKIMSign, SenderChecks, read_head
from geosmtp.pipeline import Accept, Message, Reject, Replace, TempFail
from geosmtp.relay.mx import DNSTemporaryError
from geosmtp.storage import Spool
from geosmtp.storage.spool import UniqueNames
from tests.unit.test_mailauth import KEY, KEY_PEM, KEY_RECORD, FakeResolver, txt

HOST = "mx.test.example"
LOCAL = Recipient(Mailbox("bob", "test.example"), "bob")
REMOTE = Recipient(Mailbox("carol", "remote.example"), None)

ZONE = {
    ("example.org", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 -all"),
    ("_dmarc.example.org", "TXT"): txt("v=DMARC1; p=reject"),
    ("sel._domainkey.example.org", "TXT"): [type("R", (), {"strings": (KEY_RECORD,)})()],
    ("quarantine.example", "TXT"): txt("v=spf1 -all"),
    ("_dmarc.quarantine.example", "TXT"): txt("v=DMARC1; p=quarantine"),
}

BODY = b"Hello  there \t\n\nsecond line\n"
HEAD = (
    b"From: Alice <alice@example.org>\nTo: bob@test.example\nSubject: hi\n"
    b"Message-ID: <1@example.org>\n"
)


def inline(fn, *args):  # type: ignore[no-untyped-def]
    return fn(*args)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / ".spool", UniqueNames("host"))


def spooled(spool: Spool, data: bytes, *, sender="alice@example.org", rcpts=(LOCAL,), **how):  # type: ignore[no-untyped-def]
    """A Message as the SMTP shell hands it over: our trace lines first, LF line ends."""
    f = spool.open()
    f.write(b"Return-Path: <" + sender.encode() + b">\nReceived: from c ([192.0.2.1])\n\tby x\n")
    f.write(data)
    env = Envelope(
        "client.example",
        True,
        Mailbox(*sender.split("@")) if sender else None,
        recipients=tuple(rcpts),
        auth_user=how.pop("auth_user", None),
    )
    return Message(env, f, "Q1", len(data), how.pop("client", "192.0.2.1"), how.pop("role", "mx"))


def checks(spool, resolver=None, trusted=lambda ip: False, **policies):  # type: ignore[no-untyped-def]
    settings = AuthChecks(enabled=True, **{k: CheckPolicy(**v) for k, v in policies.items()})
    return SenderChecks(settings, HOST, resolver or FakeResolver(ZONE), spool, trusted, inline)


def signed_by_dkimpy(head: bytes, body: bytes = BODY) -> bytes:
    field = dkim.sign(crlf(head + b"\n" + body), b"sel", b"example.org", KEY_PEM,
                      canonicalize=(b"relaxed", b"relaxed"))  # fmt: skip
    return field.replace(b"\r\n", b"\n") + head + b"\n" + body


def run(stage, message: Message) -> tuple[object, bytes]:  # type: ignore[no-untyped-def]
    result = stage.process(message)
    if isinstance(result, Replace):
        data = Path(result.spool.path).read_bytes()
        result.spool.remove()
        return result, data
    return result, b""


def test_results_go_in_one_field_under_the_return_path(spool):
    message = spooled(spool, signed_by_dkimpy(HEAD))
    result, data = run(checks(spool), message)
    original = Path(message.spool.path).read_bytes()  # flushed by the stage, left to the pipeline
    assert isinstance(result, Replace)
    first, second, rest = data.split(b"\n", 2)
    assert first == b"Return-Path: <alice@example.org>"
    assert second == b"Authentication-Results: mx.test.example;"
    field, _, after = rest.partition(b"\nReceived: ")
    assert b"spf=pass smtp.mailfrom=alice@example.org;" in field
    assert b"dkim=pass header.d=example.org header.s=sel header.a=rsa-sha256" in field
    assert b"dmarc=pass (p=reject dis=none) header.from=example.org" in field
    # Everything else is the message as it was, byte for byte.
    assert b"Received: " + after == original.split(b"\n", 1)[1]


AR_OURS = [
    b"Authentication-Results: mx.test.example; dkim=pass header.d=example.org\n",
    b"authentication-results :MX.TEST.EXAMPLE.;\n\tdmarc=pass\n",
    b'Authentication-Results: (x) "mx.test.example" 1; spf=pass\n',
]
AR_OTHERS = [
    b"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=a@b\n",
    b"Authentication-Results: mx.test.example.evil; dkim=pass\n",
    b"X-Authentication-Results: mx.test.example; dkim=pass\n",
]


def test_fields_claiming_our_authserv_id_are_removed_and_others_kept(spool):
    hidden = b"X-Note: a\rAuthentication-Results: mx.test.example; dmarc=pass\n"
    message = spooled(spool, b"".join(AR_OURS) + hidden + b"".join(AR_OTHERS) + HEAD + b"\n" + BODY)
    result, data = run(checks(spool), message)
    assert isinstance(result, Replace)
    assert data.count(b"mx.test.example;") == 1 + 1  # ours, and the X- field
    for field in AR_OURS:
        assert field not in data
    for field in AR_OTHERS:
        assert field in data
    assert b"X-Note: a\r" in data and b"dmarc=pass\n" not in data.split(b"\n\n")[0][-200:]
    assert data.endswith(b"\n\n" + BODY)


def test_who_is_not_checked(spool):
    stage = checks(spool, trusted=lambda ip: ip == "10.0.0.1")
    for how in ({"auth_user": "alice"}, {"client": "10.0.0.1"}, {"role": "submission"}):
        message = spooled(spool, HEAD + b"\n" + BODY, **how)
        assert stage.process(message) == Accept()
        message.spool.remove()


def test_failures_are_recorded_by_default(spool):
    message = spooled(spool, HEAD + b"\n" + BODY, rcpts=(LOCAL,), client="203.0.113.5")
    result, data = run(checks(spool), message)
    assert isinstance(result, Replace)
    assert b"spf=fail (203.0.113.5 is not allowed to send for example.org)" in data
    assert b"dkim=none (no signatures)" in data
    assert b"dmarc=fail (p=reject dis=reject) header.from=example.org" in data


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        # The reason (the log's) names every failure and what its policy said.
        ({"spf": {"on_fail": "reject"}}, Reject("spf=fail (reject), dmarc=fail (record)",
            550, "5.7.23", "SPF: 203.0.113.5 is not allowed to send mail from example.org")),
        ({"spf": {"on_fail": "tempfail"}}, TempFail("spf=fail (tempfail), dmarc=fail (record)",
            451, "4.7.23",
            "SPF: 203.0.113.5 is not allowed to send mail from example.org; try again later")),
        ({"dmarc": {"on_fail": "reject"}}, Reject("dmarc=fail (reject), spf=fail (record)",
            550, "5.7.1", "Unauthenticated mail from example.org refused by its DMARC policy")),
        # A refusal beats a deferral, whichever check asked for it; both are named.
        ({"spf": {"on_fail": "tempfail"}, "dmarc": {"on_fail": "reject"}},
            Reject("dmarc=fail (reject), spf=fail (tempfail)", 550, "5.7.1",
                   "Unauthenticated mail from example.org refused by its DMARC policy")),
        ({"dkim": {"on_fail": "reject"}}, None),  # no signature is no DKIM failure
    ],
)  # fmt: skip
def test_policies_refuse_failures(spool, policies, expected):
    message = spooled(spool, HEAD + b"\n" + BODY, client="203.0.113.5")
    result, _ = run(checks(spool, **policies), message)
    if expected is None:
        assert isinstance(result, Replace)
    else:
        assert result == expected
    assert sorted(p.name for p in spool.root.iterdir()) == [Path(message.spool.path).name]


def test_dkim_fail_and_dmarc_quarantine(spool):
    tampered = signed_by_dkimpy(HEAD).replace(b"second line", b"2nd line")
    stage = checks(spool, dkim={"on_fail": "reject"}, dmarc={"on_fail": "reject"})
    result, _ = run(stage, spooled(spool, tampered, client="192.0.2.1"))
    # SPF passes, so DMARC does (aligned): only DKIM failed.
    assert result == Reject("dkim=fail (reject)", 550, "5.7.20", "No passing DKIM signature found")
    # p=quarantine is recorded: only p=reject can be refused.
    head = HEAD.replace(b"example.org>", b"quarantine.example>")
    message = spooled(spool, head + b"\n" + BODY, sender="x@quarantine.example")
    result, data = run(stage, message)
    assert isinstance(result, Replace)
    assert b"dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.example" in data


def test_dns_failures_are_temperror_and_deferred_on_request(spool):
    down = FakeResolver({k: DNSTemporaryError("timed out", "4.4.3") for k in ZONE})
    message = spooled(spool, signed_by_dkimpy(HEAD))
    result, data = run(checks(spool, down), message)
    assert isinstance(result, Replace)
    for check in (b"spf=temperror", b"dkim=temperror", b"dmarc=temperror"):
        assert check in data
    stage = checks(spool, down, dkim={"on_temperror": "tempfail"})
    result, _ = run(stage, spooled(spool, signed_by_dkimpy(HEAD)))
    assert result == TempFail(
        "dkim=temperror (tempfail), spf=temperror (record), dmarc=temperror (record)",
        451,
        "4.4.3",
        "DKIM check of example.org failed for now; try again later",
    )


@pytest.mark.parametrize(
    ("data", "client", "policies", "found"),
    [
        (signed_by_dkimpy(HEAD), "192.0.2.1", {}, {"spf": "pass", "dkim": "pass", "dmarc": "pass"}),
        (HEAD + b"\n" + BODY, "203.0.113.5", {}, {"spf": "fail", "dkim": "none", "dmarc": "fail"}),
        # refused: the results are there for the access log all the same
        (HEAD + b"\n" + BODY, "203.0.113.5", {"dmarc": {"on_fail": "reject"}},
         {"spf": "fail", "dkim": "none", "dmarc": "fail"}),
        (signed_by_dkimpy(HEAD) + b"appended\n", "203.0.113.5", {"dkim": {"enabled": False}},
         {"spf": "fail", "dmarc": "fail"}),
    ],
)  # fmt: skip
def test_each_checks_result_is_left_on_the_message_for_the_access_log(
    spool, data, client, policies, found
):
    message = spooled(spool, data, client=client)
    run(checks(spool, **policies), message)
    assert message.auth_results == found


def test_one_dkim_result_per_signature_and_none_for_unchecked_mail(spool):
    foreign = signed_by_dkimpy(HEAD).replace(b"d=example.org", b"d=example.net", 1)
    field = foreign.split(b"From:", 1)[0]  # its DKIM-Signature: no key at example.net
    message = spooled(spool, field + signed_by_dkimpy(HEAD))
    run(checks(spool), message)
    assert message.auth_results["dkim"] == "permerror,pass"
    unchecked = spooled(spool, HEAD + b"\n" + BODY, auth_user="alice")
    checks(spool).process(unchecked)
    assert unchecked.auth_results == {}


def test_the_metrics_count_the_stages_refusals_under_their_own_names():
    assert (SenderChecks.group, DKIMSign.group) == ("sender-checks", "dkim-sign")


def test_a_resolver_that_crashes_gives_temperror_not_a_crash(spool):
    class Broken(FakeResolver):
        def lookup(self, name, rdtype):  # type: ignore[no-untyped-def]
            raise RuntimeError("bug")

    result, data = run(checks(spool, Broken({})), spooled(spool, signed_by_dkimpy(HEAD)))
    assert isinstance(result, Replace)
    for check in (b"spf=temperror", b"dkim=temperror", b"dmarc=temperror"):
        assert check in data


def test_a_huge_header_section_is_refused(spool, monkeypatch):
    monkeypatch.setattr(stages, "HEADER_LIMIT", 4096)
    monkeypatch.setattr(stages.read_head, "__defaults__", (4096,))
    many = b"".join(b"X-Filler-%d: %s\n" % (i, b"x" * 60) for i in range(200))
    result, _ = run(checks(spool), spooled(spool, many + HEAD + b"\n" + BODY))
    assert result == Reject("header section too large", 552, "5.3.4", "Header section too large")


@pytest.mark.parametrize(
    ("data", "section", "separator", "body"),
    [
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n", b"\n", b"body\n"),
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", b"\r\n", b"body\r\n"),
        (b"A: 1\nB: 2\n", b"A: 1\nB: 2\n", b"", b""),  # all header
        (b"\nbody\n", b"", b"\n", b"body\n"),  # no header fields
        (b"A: 1\r\rbody", b"A: 1\r", b"\r", b"body"),
    ],
)
def test_read_head(tmp_path, data, section, separator, body):
    path = tmp_path / "m"
    path.write_bytes(b"Return-Path: <a@b>\n" + data)
    head = read_head(str(path))
    assert (head.return_path, head.section, head.separator) == (
        b"Return-Path: <a@b>\n",
        section,
        separator,
    )
    assert path.read_bytes()[head.body_offset :] == body


def test_read_head_across_blocks(tmp_path):
    path = tmp_path / "m"
    filler = b"X: " + b"y" * (stages._BLOCK - 6) + b"\r"  # the CR ends the first block
    path.write_bytes(filler + b"\n\r\nbody")
    head = read_head(str(path))
    assert head.section == filler + b"\n" and head.separator == b"\r\n"
    assert path.read_bytes()[head.body_offset :] == b"body"


# ------------------------------------------------------------ signing


def signer() -> Signer:
    return Signer({"example.org": SigningKey("example.org", "sel", KEY)})


def signing(spool, trusted=lambda ip: False) -> DKIMSign:  # type: ignore[no-untyped-def]
    return DKIMSign(signer(), spool, trusted, inline, clock=lambda: 1_700_000_000)


def test_mail_from_a_user_for_a_remote_recipient_is_signed(spool):
    message = spooled(spool, HEAD + b"\n" + BODY, rcpts=(LOCAL, REMOTE), auth_user="alice")
    result, data = run(signing(spool), message)
    assert isinstance(result, Replace)
    assert data.startswith(b"Return-Path: <alice@example.org>\nDKIM-Signature: v=1; a=rsa-sha256;")
    assert b"d=example.org; s=sel;\n\tt=1700000000;" in data
    wire = crlf(data.split(b"\n", 1)[1])  # as the relay sends it: no Return-Path, CRLF
    assert dkim.verify(wire, dnsfunc=lambda name, timeout=5: KEY_RECORD)
    # ...and our own inbound check agrees.
    _, checked = run(checks(spool), spooled(spool, data.split(b"\n", 1)[1]))
    assert b"dkim=pass header.d=example.org" in checked


def test_a_trusted_network_is_signed_too(spool):
    message = spooled(spool, HEAD + b"\n" + BODY, rcpts=(REMOTE,), client="10.1.1.1")
    result, _ = run(signing(spool, trusted=lambda ip: ip.startswith("10.")), message)
    assert isinstance(result, Replace)


@pytest.mark.parametrize(
    ("data", "how"),
    [
        (HEAD + b"\n" + BODY, {"rcpts": (LOCAL,), "auth_user": "alice"}),  # local only
        (HEAD + b"\n" + BODY, {"rcpts": (REMOTE,)}),  # not authenticated or trusted
        (HEAD.replace(b"example.org>", b"other.example>") + b"\n" + BODY,
         {"rcpts": (REMOTE,), "auth_user": "alice"}),  # no key for the From domain
        (b"From: a@example.org, b@other.example\n\n" + BODY,
         {"rcpts": (REMOTE,), "auth_user": "alice"}),  # two From domains
    ],
)  # fmt: skip
def test_what_is_not_signed(spool, data, how):
    message = spooled(spool, data, **how)
    assert signing(spool).process(message) == Accept()
    assert [p.name for p in spool.root.iterdir()] == [Path(message.spool.path).name]


def test_build_signer_reads_the_configured_keys(tmp_path):
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(KEY_PEM)
    from geosmtp.config import DKIMDomain

    assert stages.build_signer(DKIMSigning()) is None
    built = stages.build_signer(
        DKIMSigning(domains={"Bücher.Example": DKIMDomain("s1", key_file)}, headers=["from"])
    )
    key = built.key_for("xn--bcher-kva.example")
    assert (key.domain, key.selector, built.headers) == ("xn--bcher-kva.example", "s1", [b"from"])


BODIES = [
    BODY,
    bytes(range(256)) * 1000 + b"\n",  # over one block, every octet value
    b"crlf\r\nlines\r\n\r\nand a stray CR\r\r\n" * 5000,  # CRLFs across blocks
    b"",
]


@pytest.mark.parametrize("body", BODIES, ids=["short", "octets", "crlf", "empty"])
@pytest.mark.parametrize("stage", ["checks", "signing"])
def test_a_rewritten_message_counts_every_octet(spool, stage, body):
    """The new spool file's size and vsize (the Maildir name's S= and W=) count the
    body copied from the old one, not only the header section written before it."""
    if stage == "checks":
        result = checks(spool).process(spooled(spool, HEAD + b"\n" + body))
    else:
        message = spooled(spool, HEAD + b"\n" + body, rcpts=(REMOTE,), auth_user="alice")
        result = signing(spool).process(message)
    assert isinstance(result, Replace)
    data = Path(result.spool.path).read_bytes()
    result.spool.remove()
    assert data.endswith(HEAD + b"\n" + body)
    lone = len(re.findall(rb"(?<!\r)\n", data))
    assert (result.spool.size, result.spool.vsize) == (len(data), len(data) + lone)


def test_a_large_message_is_worked_on_in_the_threadpool(spool, monkeypatch):
    monkeypatch.setattr(stages, "INLINE_LIMIT", 100)
    offloaded = []

    def offload(fn, *args):  # type: ignore[no-untyped-def]
        offloaded.append(fn.__name__)
        return fn(*args)

    stage = SenderChecks(AuthChecks(enabled=True), HOST, FakeResolver(ZONE), spool,
                         lambda ip: False, offload)  # fmt: skip
    result, _ = run(stage, spooled(spool, signed_by_dkimpy(HEAD)))
    assert isinstance(result, Replace)
    assert offloaded == ["read_head", "hash_bodies", "verify", "write_spool"]
    offloaded.clear()
    signer_stage = DKIMSign(signer(), spool, lambda ip: False, offload)
    message = spooled(spool, HEAD + b"\n" + BODY, rcpts=(REMOTE,), auth_user="alice")
    assert isinstance(run(signer_stage, message)[0], Replace)
    assert offloaded == ["_sign"]
