"""Real POP3 clients against the real server: curl, fetchmail, getmail6.

Each fetches mail that was sent into the same server over SMTP and must get
it byte-exact. A test whose client is not installed skips and says which
Debian package gives it (`.ci/run` installs them). The tests share one
server, each logging in as a user of its own (`user`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from geosmtp.storage.maildir import Maildir
from tests.conftest import listeners, users
from tests.integration.pop3_client import send_mail, stored_as_sent

PASSWORD = "client secret"
#: The server's users: one for each test (`user`).
POOL = [f"c{n}" for n in range(20)]
_unused = iter(POOL)


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {package})")
    return path


def message(n: int) -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@test.example\r\nSubject: client test {n}\r\n"
        f"Message-ID: <client{n}@example.org>\r\n\r\nbody of {n}\r\n"
        ".starts with a dot\r\n..two dots\r\n\r\nend\r\n"
    ).encode()


@pytest.fixture(scope="module")
def server(make_module_server, certs):
    return make_module_server(
        {
            "listeners": listeners("mx", "pop3", "pop3s"),
            "tls": certs.tls_config,
            "users": users(**dict.fromkeys(POOL, PASSWORD)),
            # curl and fetchmail log in on the plain listener too, on loopback.
            "auth": {"allow_plaintext": True},
        }
    )


@pytest.fixture
def user() -> str:
    """A user of the server that no other test logs in as or mails."""
    return next(_unused)


def maildrop_files(server, box: str) -> list[Path]:
    """The maildrop's files in the order POP3 numbers them (delivery order)."""
    maildir = Maildir(server.mail_dir / box)
    return [maildir.path / m.relpath for m in maildir.list()]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=60, **kwargs)


# -------------------------------------------------------------------- curl


@pytest.mark.parametrize("scheme", ["pop3", "pop3s", "pop3+stls"])
def test_curl_retrieves_a_message_byte_exact(server, certs, scheme, user):
    curl = need("curl", "curl")
    send_mail(server.ports["mx"], f"{user}@test.example", message(1))
    expected = stored_as_sent(maildrop_files(server, user)[0].read_bytes())
    port = server.ports["pop3s" if scheme == "pop3s" else "pop3"]
    url = f"{scheme.split('+')[0]}://127.0.0.1:{port}/1"
    argv = [curl, "-sS", "--max-time", "30", "-u", f"{user}:{PASSWORD}", url]
    argv += ["--cacert", str(certs.ca_file)]
    if scheme == "pop3+stls":
        argv.append("--ssl-reqd")  # STLS (RFC 2595) before the login
    result = run(argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert result.stdout.endswith(message(1))


def test_curl_lists_and_deletes(server, user):
    curl = need("curl", "curl")
    for n in range(2):
        send_mail(server.ports["mx"], f"{user}@test.example", message(n))
    sizes = [len(stored_as_sent(p.read_bytes())) for p in maildrop_files(server, user)]
    base = f"pop3://127.0.0.1:{server.ports['pop3']}/"
    listing = run([curl, "-sS", "-u", f"{user}:{PASSWORD}", base])
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split(b"\r\n")[:2] == [b"1 %d" % sizes[0], b"2 %d" % sizes[1]]
    # DELE through curl's custom request (no body is listed for it).
    deleted = run([curl, "-sS", "-u", f"{user}:{PASSWORD}", "-X", "DELE", "-I", base + "1"])
    assert deleted.returncode == 0, deleted.stderr
    assert len(maildrop_files(server, user)) == 1


# --------------------------------------------------------------- fetchmail


@pytest.mark.parametrize("tls", [False, True])
def test_fetchmail_fetches_and_deletes(server, certs, tmp_path, tls, user):
    fetchmail = need("fetchmail", "fetchmail")
    for n in range(3):
        send_mail(server.ports["mx"], f"{user}@test.example", message(n))
    expected = [p.read_bytes() for p in maildrop_files(server, user)]
    out = tmp_path / "fetched"
    out.mkdir()
    # The MDA writes each message it is given into a file of its own.
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "{out}/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    port = server.ports["pop3s" if tls else "pop3"]
    # fetchmail checks a certificate's CN, which trustme's leaf lacks: it is
    # pinned by its fingerprint instead (the MD5 form fetchmail prints).
    ssl = (
        f"ssl no sslcertck sslfingerprint '{md5_fingerprint(certs.cert)}'" if tls else "sslproto ''"
    )
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll 127.0.0.1 protocol pop3 port {port} timeout 30\n"
        f'  user "{user}" password "{PASSWORD}" is "{user}" here\n'
        f'  {ssl} norewrite nokeep fetchall mda "{mda}"\n'
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    result = run([fetchmail, "-f", str(rc), "--nodetach", "--nosyslog", "-v"], env=env)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    got = sorted(out.iterdir())
    assert len(got) == 3
    for path, original in zip(got, expected, strict=True):
        # fetchmail adds a Received: field of its own below the Return-Path;
        # without it the message is the stored one (fetchmail writes LF ends).
        assert without_fetchmails_received(path.read_bytes()) == original
    assert maildrop_files(server, user) == []  # fetched, then deleted (nokeep)


def md5_fingerprint(cert: Path) -> str:
    import hashlib
    import ssl

    pem = cert.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    digest = hashlib.md5(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def without_fetchmails_received(data: bytes) -> bytes:
    """`data` less the one Received: field (with its folded lines) naming fetchmail."""
    lines = data.split(b"\n")
    for start, line in enumerate(lines):
        if line.startswith(b"Received:"):
            end = start + 1
            while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
                end += 1
            if b"fetchmail" in b"\n".join(lines[start:end]):
                return b"\n".join(lines[:start] + lines[end:])
    raise AssertionError(f"no fetchmail Received: field in {data[:300]!r}")


# ----------------------------------------------------------------- getmail6


def test_getmail6_fetches_into_a_maildir_and_deletes(server, certs, tmp_path, user):
    getmail = need("getmail", "getmail6")
    for n in range(3):
        send_mail(server.ports["mx"], f"{user}@test.example", message(n))
    expected = sorted(p.read_bytes() for p in maildrop_files(server, user))
    # getmail will not deliver as root: then it delivers as nobody, into a
    # Maildir nobody can write (pytest's tmp_path is closed to other users).
    as_root = os.geteuid() == 0
    dest = (
        Path(tempfile.mkdtemp(prefix="getmail-")) / "Maildir" if as_root else tmp_path / "Maildir"
    )
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True)
    if as_root:
        for folder in (dest.parent, dest, *(dest / s for s in ("cur", "new", "tmp"))):
            folder.chmod(0o777)
    rc = tmp_path / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        "type = SimplePOP3SSLRetriever\n"
        "server = 127.0.0.1\n"
        f"port = {server.ports['pop3s']}\n"
        f"username = {user}\n"
        f"password = {PASSWORD}\n"
        f"ca_certs = {certs.ca_file}\n"
        "[destination]\n"
        "type = Maildir\n"
        f"path = {dest}/\n" + ("user = nobody\n" if as_root else "") + "[options]\n"
        "delete = true\n"
        "delivered_to = false\n"
        "received = false\n"
        "record_mailbox = false\n"
        "read_all = true\n"
    )
    result = run([getmail, "--getmaildir", str(tmp_path), "--rcfile", str(rc)])
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    try:
        got = sorted(p.read_bytes() for p in (dest / "new").iterdir())
    finally:
        if as_root:
            shutil.rmtree(dest.parent, ignore_errors=True)
    assert got == expected  # the Maildir files are the same bytes
    assert maildrop_files(server, user) == []
