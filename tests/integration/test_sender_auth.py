"""SPF, DKIM and DMARC on incoming mail and DKIM signing of outgoing mail, end to end.

A private dnsmasq serves the SPF, DKIM and DMARC records of *.test domains;
geosmtp runs through its CLI (`geosmtp -c`), mail comes from 127.0.0.1 to its
`mx` listener with smtplib. DKIM signatures come from dkimpy (the library, in
this process) for the inbound check, and geosmtp's own signatures go out
through the relay to a sink, where dkimpy's `dkimverify` program, another
process, checks them against the record `geosmtp dkim keygen` printed.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys

import pytest

pytest.importorskip("dkim", reason="dkimpy is not installed")
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from geosmtp.mailauth.dkim_sign import public_key_record
from tests.conftest import HOSTNAME, listeners, run_cli, users, wait_until
from tests.integration.adminapi import admin_of, delta, with_admin
from tests.integration.dns_server import (
    Zone,
    dns_server,
    servfail_nameserver,
    silent_nameserver,
    txt_record,
)
from tests.integration.smtp_sink import Script, Sink, free_port_on

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
PASSWORD = "sender-auth-pw"


@pytest.fixture(scope="module")
def keygen(tmp_path_factory):
    """`geosmtp dkim keygen test.example s1`: the key file and the record it printed."""
    root = tmp_path_factory.mktemp("keys")
    result = run_cli("dkim", "keygen", "test.example", "s1", "--dir", str(root), cwd=root)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    match = re.fullmatch(r"s1\._domainkey\.test\.example\. IN TXT \( (.*) \)", line)
    assert match, line
    strings = re.findall(r'"([^"]*)"', match.group(1))
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)  # a 2048-bit key
    key_file = root / "test.example.s1.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "key_file: " + str(key_file) in result.stderr
    return key_file, "".join(strings)


@pytest.fixture(scope="module")
def dns(keygen, tmp_path_factory):
    _, record = keygen
    zone = Zone(
        txt={
            "pass.test": ["v=spf1 ip4:127.0.0.1 -all"],
            "_dmarc.pass.test": ["v=DMARC1; p=reject"],
            "helo.pass.test": ["v=spf1 ip4:127.0.0.0/8 -all"],
            "fail.test": ["v=spf1 ip4:192.0.2.1 -all"],
            "_dmarc.fail.test": ["v=DMARC1; p=reject"],
            "nodmarc.test": ["v=spf1 -all"],
            "signed.test": ["v=spf1 -all"],  # SPF fails: DMARC passes only by DKIM
            "_dmarc.signed.test": ["v=DMARC1; p=reject"],
            "sel._domainkey.signed.test": [txt_record(public_key_record(KEY))],
            "s1._domainkey.test.example": [txt_record(record)],
        },
        mx={"remote.test": [(10, "mx.remote.test")]},
        hosts={"mx.remote.test": ["127.0.0.2"]},
        local=("test", "test.example"),
    )
    with dns_server(zone, tmp_path_factory.mktemp("dns")) as server:
        yield server


def checking(dns, **auth_checks) -> dict:  # type: ignore[no-untyped-def]
    return {
        "auth_checks": {"enabled": True, **auth_checks},
        "dns": {"nameservers": [dns.nameserver], "timeout": 2},
    }


@pytest.fixture(scope="module")
def recording(make_module_server, dns):
    """The checks with their default policy: record only."""
    return make_module_server(checking(dns))


@pytest.fixture(scope="module")
def strict(make_module_server, dns):
    return make_module_server(
        with_admin(
            checking(
                dns,
                spf={"on_fail": "tempfail"},
                dkim={"on_fail": "reject"},
                dmarc={"on_fail": "reject"},
            )
        )
    )


def message(
    sender: str, subject: str = "hi", body: bytes = b"Hello,\r\n\r\nbody  text\r\n"
) -> bytes:
    return (
        f"From: Sender <{sender}>\r\nTo: bob@test.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@x.test>\r\n\r\n".encode()
        + body
    )


def dkimpy_signed(data: bytes, domain: bytes = b"signed.test", selector: bytes = b"sel") -> bytes:
    return dkim.sign(data, selector, domain, KEY_PEM, canonicalize=(b"relaxed", b"relaxed")) + data


def send(server, sender: str, data: bytes, helo: str = "client.pass.test") -> None:  # type: ignore[no-untyped-def]
    with smtplib.SMTP(server.host, server.port, local_hostname=helo, timeout=30) as client:
        client.sendmail(sender, ["bob@test.example"], data)


def stored(server, subject: str) -> bytes:  # type: ignore[no-untyped-def]
    """The one message in bob's mailbox with this subject."""

    def find() -> list[bytes]:
        found = [p.read_bytes() for p in server.messages("bob")]
        return [m for m in found if f"Subject: {subject}\n".encode() in m]

    (data,) = wait_until(find, what=f"the message {subject!r}")
    return data


def access_line(server, subject: str) -> str:  # type: ignore[no-untyped-def]
    """The access-log line of the message with this subject (its Message-ID)."""
    needle = f"msgid=<{subject}@x.test>"
    (line,) = wait_until(
        lambda: [li for li in server.access_log().splitlines() if needle in li],
        what=f"the access-log line of {subject!r}",
    )
    return line


def results(data: bytes) -> str:
    """The Authentication-Results field our server added (the second line), unfolded."""
    lines = data.split(b"\n")
    assert lines[0].startswith(b"Return-Path: ")
    assert lines[1] == f"Authentication-Results: {HOSTNAME};".encode()
    field = [lines[1]]
    for line in lines[2:]:
        if not line.startswith(b"\t"):
            break
        field.append(line)
    return " ".join(b" ".join(field).decode().split())


# ------------------------------------------------------------ recorded results


@pytest.mark.parametrize(
    ("sender", "helo", "expected"),
    [
        ("a@pass.test", "client.pass.test",
         ["spf=pass smtp.mailfrom=a@pass.test", "dkim=none",
          "dmarc=pass (p=reject dis=none) header.from=pass.test"]),
        ("a@fail.test", "client.pass.test",
         ["spf=fail (127.0.0.1 is not allowed to send for fail.test) smtp.mailfrom=a@fail.test",
          "dmarc=fail (p=reject dis=reject) header.from=fail.test"]),
        ("a@none.test", "client.pass.test",
         ["spf=none smtp.mailfrom=a@none.test", "dmarc=none header.from=none.test"]),
        ("", "helo.pass.test", ["spf=pass smtp.helo=helo.pass.test"]),
    ],
)  # fmt: skip
def test_spf_and_dmarc_are_recorded(recording, sender, helo, expected):
    subject = f"spf-{sender or 'null'}"
    send(recording, sender, message(sender or "daemon@pass.test", subject), helo=helo)
    found = results(stored(recording, subject))
    for part in expected:
        assert part in found


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (None, ["spf=fail", "dkim=pass header.d=signed.test header.s=sel header.a=rsa-sha256",
                "dmarc=pass (p=reject dis=none) header.from=signed.test"]),
        (lambda d: d.replace(b"body  text", b"body text!"),
         ["dkim=fail (body hash did not verify) header.d=signed.test",
          "dmarc=fail (p=reject dis=reject) header.from=signed.test"]),
        (lambda d: d.replace(b"s=sel;", b"s=gone;"),
         ["dkim=permerror (no key at gone._domainkey.signed.test) header.d=signed.test"]),
    ],
    ids=["pass", "fail", "permerror"],
)  # fmt: skip
def test_dkim_signatures_made_by_dkimpy_are_verified(recording, change, expected):
    subject = f"dkim-{id(change)}"
    data = dkimpy_signed(message("a@signed.test", subject))
    send(recording, "a@signed.test", change(data) if change else data)
    found = results(stored(recording, subject))
    for part in expected:
        assert part in found


def test_earlier_results_claiming_our_name_are_removed(recording):
    ours = [
        f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=pass.test",
        f"authentication-results :(forged) {HOSTNAME.upper()}.;\r\n\tdmarc=pass",
    ]
    theirs = "Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=a@pass.test"
    data = ("\r\n".join([*ours, theirs]) + "\r\n").encode() + message("a@fail.test", "forged")
    send(recording, "a@fail.test", data)
    stored_data = stored(recording, "forged")
    head = stored_data.split(b"\n\n")[0].decode()
    assert head.count("Authentication-Results:") == 2
    assert theirs in head
    assert "forged" not in head.split("Subject")[0] and "dmarc=pass" not in head
    assert "dmarc=fail" in results(stored_data)


def test_the_access_log_has_each_checks_result(recording):
    send(recording, "a@signed.test", dkimpy_signed(message("a@signed.test", "logged")))
    assert "spf=fail" in results(stored(recording, "logged"))
    line = access_line(recording, "logged")
    assert " stages=sender-checks:replace spf=fail dkim=pass dmarc=pass result=250" in line


# ------------------------------------------------------------ policies


def test_policies_refuse_through_the_server(strict):
    # DMARC p=reject, honoured because the config says so: 550, nothing stored.
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(strict, "a@fail.test", message("a@fail.test", "dmarc-reject"))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1 Unauthenticated mail from fail.test")
    # A broken DKIM signature: 550 5.7.20.
    broken = dkimpy_signed(message("a@signed.test", "dkim-reject")).replace(b"Hello", b"Howdy")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(strict, "a@signed.test", broken)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        550,
        b"5.7.20 No passing DKIM signature found",
    )
    # SPF fail without a DMARC policy, on_fail tempfail: 451, the sender retries.
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        send(strict, "a@nodmarc.test", message("a@nodmarc.test", "spf-defer"))
    assert deferred.value.smtp_code == 451
    assert deferred.value.smtp_error.startswith(b"4.7.23 SPF: 127.0.0.1 is not allowed")
    # What passes is delivered.
    send(strict, "a@pass.test", message("a@pass.test", "strict-pass"))
    assert "dmarc=pass" in results(stored(strict, "strict-pass"))
    assert len(strict.messages("bob")) == 1
    assert strict.tmp_files() == []
    # Each refusal's log line names every failure and what its policy said.
    log = wait_until(lambda: "dkim=fail" in strict.server_log() and strict.server_log())
    assert "refused: dmarc=fail (reject), spf=fail (tempfail)\n" in log
    assert "refused: dkim=fail (reject), dmarc=fail (reject), spf=fail (tempfail)\n" in log
    assert "refused: spf=fail (tempfail)\n" in log
    # The access log has the results of refused mail too.
    line = access_line(strict, "dmarc-reject")
    assert " stages=sender-checks:reject spf=fail dkim=none dmarc=fail result=550" in line
    line = access_line(strict, "spf-defer")
    assert " stages=sender-checks:tempfail spf=fail dkim=none dmarc=none result=451" in line


def test_refusals_are_counted_as_the_sender_checks_not_a_filter(strict):
    api = admin_of(strict)
    before = api.quiet()
    for subject in ("counted-reject", "counted-defer"):
        sender = "a@fail.test" if subject == "counted-reject" else "a@nodmarc.test"
        with pytest.raises(smtplib.SMTPDataError):
            send(strict, sender, message(sender, subject))
    after = api.quiet()
    rejected = "geosmtp_messages_rejected_total"
    assert delta(before, after, rejected, stage="sender-checks") == 2
    assert delta(before, after, rejected, stage="filter") == 0
    assert delta(before, after, "geosmtp_stage_runs_total", stage="sender-checks") == 2
    help_line = next(
        li for li in api.exposition().splitlines() if li.startswith(f"# HELP {rejected}")
    )
    assert "sender-checks (SPF/DKIM/DMARC)" in help_line


@pytest.mark.parametrize(
    ("nameserver", "words"),
    [
        (silent_nameserver, "DNS lookup of {name} TXT timed out (nameservers: {ns})"),
        (servfail_nameserver, "DNS lookup of {name} TXT failed: no nameserver answered it"
                              " (SERVFAIL or REFUSED: {ns} SERVFAIL)"),
    ],
    ids=["timeout", "servfail"],
)  # fmt: skip
def test_a_dns_that_does_not_answer_is_temperror_in_so_many_words(make_server, nameserver, words):
    with nameserver() as ns:
        server = make_server(
            {"auth_checks": {"enabled": True}, "dns": {"nameservers": [ns], "timeout": 1}}
        )
        send(server, "a@signed.test", dkimpy_signed(message("a@signed.test", "dns-down")))
        found = results(stored(server, "dns-down"))
    # One comment a check, whole: the nameserver's words in parentheses of their own.
    spf = words.format(name="signed.test", ns=ns)
    key = words.format(name="sel._domainkey.signed.test", ns=ns)
    policy = words.format(name="_dmarc.signed.test", ns=ns)
    assert f"spf=temperror ({spf}) smtp.mailfrom=a@signed.test;" in found
    assert f"dkim=temperror ({key}) header.d=signed.test header.s=sel" in found
    assert f"dmarc=temperror ({policy}) header.from=signed.test" in found
    assert "?" not in found and "DNS DNS" not in found
    line = access_line(server, "dns-down")
    assert " spf=temperror dkim=temperror dmarc=temperror result=250" in line


def test_a_dns_failure_can_defer_the_message(make_server):
    server = make_server(
        {
            "auth_checks": {"enabled": True, "spf": {"on_temperror": "tempfail"}},
            "dns": {"timeout": 1},
        }
    )
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        send(server, "a@pass.test", message("a@pass.test", "deferred"))
    assert (deferred.value.smtp_code, deferred.value.smtp_error) == (
        451,
        b"4.4.3 SPF check of pass.test failed for now; try again later",
    )
    assert server.messages("bob") == [] and server.tmp_files() == []


# ------------------------------------------------------------ signing

# dkimpy's `dkimverify` program asks the system's resolver. This runs the
# program's own main() in another process, dnspython's default resolver
# pointed at the test's dnsmasq first.
DKIMVERIFY = """
import sys
import dns.resolver
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = [sys.argv[1]]
resolver.port = int(sys.argv[2])
dns.resolver.default_resolver = resolver
del sys.argv[1:]
from dkim.dkimverify import main
main()
"""


def dkimverify(dns, data: bytes) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-c", DKIMVERIFY, dns.address, str(dns.port)],
        input=data,
        capture_output=True,
        timeout=30,
    )


def test_outgoing_mail_is_signed_and_verifies_elsewhere(make_server, dns, keygen, recording):
    key_file, _ = keygen
    port = free_port_on("127.0.0.2")
    with Sink(Script(), address="127.0.0.2", port=port) as sink:
        server = make_server(
            {
                "listeners": listeners("submission"),
                "users": users(alice=PASSWORD),
                "auth": {"allow_plaintext": True},
                "relay": {"mx_port": port, "retry_schedule": [0.5]},
                "dns": {"nameservers": [dns.nameserver], "timeout": 2},
                "dkim": {
                    "domains": {"test.example": {"selector": "s1", "key_file": str(key_file)}}
                },
            }
        )
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
            client.login("alice", PASSWORD)
            signed = message("alice@test.example", "outgoing").replace(
                b"To: bob@test.example", b"To: carol@remote.test, bob@test.example"
            )
            client.sendmail("alice@test.example", ["carol@remote.test", "bob@test.example"], signed)
            unsigned = message("alice@other.test", "no-key")
            client.sendmail("alice@test.example", ["carol@remote.test"], unsigned)
        first, second = wait_until(
            lambda: (
                len(sink.completed) == 2
                and sorted(sink.completed, key=lambda t: b"no-key" in t.data)
            ),
            what="both messages at the sink",
        )
    assert first.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert b"d=test.example; s=s1;" in first.data
    verified = dkimverify(dns, first.data)
    assert (verified.returncode, verified.stdout) == (0, b"signature ok\n"), verified.stderr
    tampered = dkimverify(dns, first.data.replace(b"body  text", b"body  TEXT"))
    assert tampered.returncode == 1 and b"body hash mismatch" in tampered.stderr
    # The local copy carries the same signature; the message without a key none.
    local = stored(server, "outgoing")
    assert local.split(b"\n")[1].startswith(b"DKIM-Signature: ")
    assert b"DKIM-Signature" not in second.data
    # Our own inbound check agrees with dkimverify.
    send(recording, "alice@test.example", first.data)
    assert "dkim=pass header.d=test.example header.s=s1" in results(stored(recording, "outgoing"))


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["exa mple.org", "s1"], 2, "geosmtp dkim: exa mple.org: not a domain name"),
        (["example.org", "bad_selector"], 2, "geosmtp dkim: bad_selector: not a selector"),
        (["example.org", "s1", "--bits", "512"], 2, "geosmtp dkim: --bits: from 1024 to 4096"),
        (["example.org", "taken"], 1, "exists; not overwritten"),
    ],
)
def test_keygen_refuses_with_one_line(tmp_path, args, status, message):
    (tmp_path / "example.org.taken.key").write_text("an older key")
    result = run_cli("dkim", "keygen", *args, "--dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == status
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert (tmp_path / "example.org.taken.key").read_text() == "an older key"
