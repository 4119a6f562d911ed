"""Every stored message's name tells its true sizes, whatever stages rewrote it,
and geosmtp and a private Dovecot serve it alike.

For each combination of pipeline stages (none, a filter program, a Python
stage, the sender checks, DKIM signing, all of them), mail goes into geosmtp
over SMTP through its CLI, then, for every file in the Maildir:

- the name's `S=` is the file's size and `W=` its size with every LF that is
  not after a CR counted as CRLF (RFC 1939 §11, Dovecot's rule);
- geosmtp's POP3 `LIST` equals the octets `RETR` sends, and what it sends is
  what the client sent (a CR before a line end included);
- a private Dovecot (Debian's `dovecot-pop3d`) reading the same Maildir gives
  the same UIDL (`pop3_uidl_format = %f`), the same LIST and the same bytes,
  and logs no broken size.
"""

from __future__ import annotations

import poplib
import re
import smtplib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import listeners, users
from tests.integration.dns_server import Zone, dns_server
from tests.integration.dovecot import running_dovecot
from tests.integration.smtp_sink import free_port_on
from tests.integration.test_filters import EXAMPLES

PASSWORD = "sizes-pw"
COMBINATIONS = ["none", "program", "python", "checks", "signing", "all"]
NAME_RE = re.compile(r"(?P<key>[^:]+,S=(?P<size>[0-9]+),W=(?P<vsize>[0-9]+))(?::2,[A-Za-z]*)?")

#: Messages as sent (CRLF line ends, not dot-stuffed yet): a stray CR before a
#: line end in the header and the body, lines starting with a dot, a body over
#: the 64 KiB blocks the stages copy in, LF-only lines, no body at all.
HEAD = b"From: {sender}\r\nTo: {rcpt}\r\nSubject: sizes {n}\r\nMessage-ID: <{n}.{box}@x.test>\r\n"
BODIES = [
    b"\r\nhello\r\n.a dot line\r\nstray CR\r\r\nlast\r\n",
    b"\r\n"
    + b"".join(b"line %05d of a long body, some text to fill it up\r\n" % i for i in range(2000)),
    b"\r\nbare\nlf\nlines\r\n",
    b"X-Stray: cr\r\r\n",  # all header, no body
]


def messages(box: str, sender: str, rcpt: str) -> list[bytes]:
    head = HEAD.replace(b"{sender}", sender.encode()).replace(b"{rcpt}", rcpt.encode())
    head = head.replace(b"{box}", box.encode())
    return [head.replace(b"{n}", str(n).encode()) + body for n, body in enumerate(BODIES)]


def crlf_rule(data: bytes) -> bytes:
    """A stored message as a POP3 server sends it: a LF alone becomes CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    zone = Zone(
        txt={"pass.test": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        mx={"remote.test": [(10, "mx.remote.test")]},
        hosts={"mx.remote.test": ["127.0.0.2"]},
        local=("test",),
    )
    with dns_server(zone, tmp_path_factory.mktemp("dns")) as server:
        yield server


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path_factory.mktemp("dkim") / "test.example.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def config(combination: str, dns, key_file, mail_dir: str) -> dict:  # type: ignore[no-untyped-def]
    every = combination == "all"
    overrides: dict = {
        "listeners": listeners("mx", "submission", "pop3"),
        "users": users(**{combination: PASSWORD}),
        "auth": {"allow_plaintext": True},
        "mail_dir": mail_dir,
        "dns": {"nameservers": [dns.nameserver], "timeout": 2},
        # The signed copy for carol@remote.test waits in the queue: nothing listens.
        "relay": {"mx_port": free_port_on("127.0.0.2"), "retry_schedule": [600]},
    }
    filters = []
    if combination == "program" or every:
        filters.append({"name": "cat", "command": ["cat"]})
    if combination == "python" or every:
        filters.append({"name": "tag", "call": "mystages:tag_subject"})
    if filters:
        overrides["filters"] = filters
    if combination == "checks" or every:
        overrides["auth_checks"] = {"enabled": True}
    if combination == "signing" or every:
        overrides["dkim"] = {
            "domains": {"test.example": {"selector": "s1", "key_file": str(key_file)}}
        }
    return overrides


def send_all(server, box: str) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Inbound mail (checked) and mail from the user (signed); what was sent, in order."""
    sent = []
    rcpt = f"{box}@test.example"
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], "client.pass.test", timeout=30) as c:
        for data in messages(box, "a@pass.test", rcpt):
            c.sendmail("a@pass.test", [rcpt], data)
            sent.append(data)
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.login(box, PASSWORD)
        for data in messages(box + "-out", rcpt, "carol@remote.test"):
            c.sendmail(rcpt, [rcpt, "carol@remote.test"], data)
            sent.append(data)
    return sent


def pop3_view(host: str, port: int, user: str) -> list[tuple[str, int, bytes]]:
    """(UIDL, LIST size, RETR bytes) of every message, in order; nothing deleted."""
    client = poplib.POP3(host, port, timeout=30)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        uids = [line.split()[1].decode() for line in client.uidl()[1]]
        view = []
        for n, entry in enumerate(client.list()[1], start=1):
            size = int(entry.split()[1])
            _, lines, octets = client.retr(n)
            data = b"\r\n".join(lines) + b"\r\n"
            assert octets == len(data)  # poplib counts the octets it read, unstuffed
            view.append((uids[n - 1], size, data))
        return view
    finally:
        client.quit()


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_sizes_in_names_are_true_and_dovecot_agrees(
    combination, make_server, dns, key_file, monkeypatch
):
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    with running_dovecot({combination: PASSWORD}) as dovecot:
        server = make_server(config(combination, dns, key_file, str(dovecot.mail_dir)))
        sent = send_all(server, combination)
        box = dovecot.mail_dir / combination

        # Every name tells the file's true sizes.
        files = sorted((box / "new").iterdir())
        assert len(files) == len(sent)
        for path in files:
            data = path.read_bytes()
            match = NAME_RE.fullmatch(path.name)
            assert match, path.name
            assert int(match["size"]) == len(data), path.name
            assert int(match["vsize"]) == len(crlf_rule(data)), path.name

        # geosmtp's POP3: LIST is what RETR sends, and RETR is what was sent.
        ours = pop3_view("127.0.0.1", server.ports["pop3"], combination)
        assert len(ours) == len(sent)
        for (_, size, data), message in zip(ours, sent, strict=True):
            assert size == len(data)
            # What was sent, a CR before a line end too (a LF alone comes back as CRLF).
            assert data.replace(b"Subject: [EXTERNAL] ", b"Subject: ").endswith(crlf_rule(message))
        names = {NAME_RE.fullmatch(p.name)["key"] for p in (box / "cur").iterdir()}
        assert {uid for uid, _, _ in ours} == names  # the UIDL is the name without flags

        # Dovecot serves the same Maildir alike: UIDLs, sizes, bytes.
        dovecot.own_mail_dir()
        theirs = pop3_view(dovecot.host, dovecot.port, combination)
        assert sorted(theirs) == sorted(ours)
        log = dovecot.log()
        assert "Cached message size" not in log and "Corrupted" not in log, log[-2000:]
    signed = [
        data for _, _, data in ours if data.startswith(b"Return-Path: <" + combination.encode())
    ]
    if combination in ("signing", "all"):
        assert signed and all(b"\r\nDKIM-Signature: v=1;" in d for d in signed)
    if combination in ("checks", "all"):
        assert any(b"\r\nAuthentication-Results: " in d for _, _, d in ours)
