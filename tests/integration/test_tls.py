"""TLS against the real server: STARTTLS (RFC 3207), implicit TLS (RFC 8314), certificates."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from tests.conftest import HOSTNAME, free_port, listeners, users, wait_until
from tests.integration.wire import Wire

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def tls_server(make_module_server, certs):
    """mx + submission + submissions listeners, a trustme certificate, alice with a password."""
    return make_module_server(
        {
            "listeners": listeners("mx", "submission", "submissions"),
            "tls": {**certs.tls_config, "handshake_timeout": 0.5},
            "users": users(alice=PASSWORD, bob=None),
        }
    )


def ehlo_keywords(client: smtplib.SMTP) -> list[str]:
    code, text = client.ehlo("client.example")
    assert code == 250
    return [line.split()[0].upper() for line in text.decode().splitlines()[1:]]


def starttls_wire(wire: Wire, context: ssl.SSLContext) -> Wire:
    """Send STARTTLS, check 220, and return a Wire over the TLS socket."""
    code, text = wire.cmd("STARTTLS")
    assert code == 220, text
    assert wire.buf == b""
    tls = context.wrap_socket(wire.sock, server_hostname="127.0.0.1")
    return Wire(tls)


# ---------------------------------------------------------------- STARTTLS


def test_starttls_then_ehlo_offers_auth_and_no_starttls(tls_server, certs):
    with smtplib.SMTP("127.0.0.1", tls_server.ports["mx"], timeout=10) as client:
        before = ehlo_keywords(client)
        assert "STARTTLS" in before
        assert "AUTH" not in before  # no passwords in the clear
        code, _ = client.starttls(context=certs.client_context())
        assert code == 220
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        peer = client.sock.getpeercert()
        assert ("DNS", HOSTNAME) in peer["subjectAltName"]
        code, text = client.ehlo("client.example")
        lines = text.decode().splitlines()
        assert "AUTH PLAIN LOGIN" in lines
        assert "STARTTLS" not in lines
        # A second STARTTLS inside TLS is out of sequence.
        assert client.docmd("STARTTLS")[0] == 503


def test_mail_over_starttls_says_esmtps_in_received(tls_server, certs):
    with smtplib.SMTP("127.0.0.1", tls_server.ports["mx"], timeout=10) as client:
        client.starttls(context=certs.client_context())
        client.sendmail(
            "carol@remote.example", ["tlsrcpt@test.example"], b"Subject: s\r\n\r\nx\r\n"
        )
    (path,) = tls_server.messages("tlsrcpt")
    text = path.read_text()
    assert " with ESMTPS id " in text
    line = wait_until(
        lambda: [li for li in tls_server.access_log().splitlines() if "tlsrcpt" in li],
        what="access log line",
    )
    assert "tls=yes" in line[0]


def test_state_before_starttls_is_forgotten(tls_server, certs):
    """RFC 3207 §4.2: after the handshake the client must EHLO again; MAIL from before is gone."""
    with Wire.connect("127.0.0.1", tls_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        tls = starttls_wire(wire, certs.client_context())
        assert tls.cmd("MAIL FROM:<carol@remote.example>")[0] == 503  # no EHLO yet
        tls.expect("EHLO client.example", 250)
        tls.expect("MAIL FROM:<carol@remote.example>", 250)
        tls.expect("QUIT", 221)


def test_command_injected_behind_starttls_is_not_run(tls_server, certs):
    """CVE-2011-0411: plaintext pipelined after STARTTLS must not run inside TLS."""
    with Wire.connect("127.0.0.1", tls_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        wire.send(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
        code, text = wire.reply()
        assert code == 220, text
        assert wire.buf == b""  # nothing answered the injected MAIL in the clear either
        tls = Wire(certs.client_context().wrap_socket(wire.sock, server_hostname="127.0.0.1"))
        tls.expect("EHLO client.example", 250)
        code, text = tls.cmd("RCPT TO:<injected@test.example>")
        assert code == 503, text
        assert tls.cmd("DATA")[0] == 503
        tls.expect("QUIT", 221)
    assert tls_server.messages("injected") == []


def test_transaction_injected_behind_starttls_delivers_nothing(tls_server, certs):
    with Wire.connect("127.0.0.1", tls_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        wire.send(
            b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<injected2@test.example>\r\n"
            b"DATA\r\nSubject: injected\r\n\r\nevil\r\n.\r\n"
        )
        assert wire.reply()[0] == 220
        tls = Wire(certs.client_context().wrap_socket(wire.sock, server_hostname="127.0.0.1"))
        # Had the injected commands run, their replies would come first.
        assert "AUTH PLAIN LOGIN" in tls.expect("EHLO client.example", 250)
        tls.expect("RSET", 250)
        tls.expect("QUIT", 221)
    assert tls_server.messages("injected2") == []


def test_starttls_with_an_argument_is_501(tls_server):
    with Wire.connect("127.0.0.1", tls_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        code, text = wire.cmd("STARTTLS foo")
        assert code == 501 and text.startswith("5.5.4"), text
        # Still in the clear and usable: a plain STARTTLS is offered.
        wire.expect("NOOP", 250)


def test_starttls_inside_a_transaction_is_503(tls_server):
    with Wire.connect("127.0.0.1", tls_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        wire.expect("MAIL FROM:<carol@remote.example>", 250)
        assert wire.cmd("STARTTLS")[0] == 503


def test_starttls_handshake_timeout_closes(tls_server):
    """The client never sends a ClientHello: the server gives up after tls.handshake_timeout."""
    with Wire.connect("127.0.0.1", tls_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd("STARTTLS")[0] == 220
        started = time.monotonic()
        assert wire.is_closed(timeout=8)
        # Well before the 300 s command timeout: the handshake timeout did it.
        assert time.monotonic() - started < 8


def test_implicit_tls_handshake_timeout_closes(tls_server):
    with Wire.connect("127.0.0.1", tls_server.ports["submissions"], greet=False) as wire:
        assert wire.is_closed(timeout=8)
        assert wire.buf == b""  # no greeting in the clear


def test_garbage_instead_of_handshake_closes(tls_server):
    with Wire.connect("127.0.0.1", tls_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd("STARTTLS")[0] == 220
        wire.send(b"EHLO not-a-client-hello\r\n")
        assert wire.is_closed(timeout=8)
    # The server is still there for the next client.
    with smtplib.SMTP("127.0.0.1", tls_server.ports["mx"], timeout=10) as client:
        assert client.noop()[0] == 250


def test_untrusted_client_certificate_check_fails_but_server_survives(tls_server):
    """A client that does not trust the certificate aborts; nothing breaks server-side."""
    with smtplib.SMTP("127.0.0.1", tls_server.ports["mx"], timeout=10) as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=ssl.create_default_context())
    with smtplib.SMTP("127.0.0.1", tls_server.ports["mx"], timeout=10) as client:
        assert client.noop()[0] == 250


# ------------------------------------------------------------ implicit TLS


def test_submissions_implicit_tls_auth_and_delivery(tls_server, certs):
    port = tls_server.ports["submissions"]
    with smtplib.SMTP_SSL("127.0.0.1", port, context=certs.client_context(), timeout=10) as client:
        keywords = ehlo_keywords(client)
        assert "AUTH" in keywords
        assert "STARTTLS" not in keywords
        assert client.docmd("STARTTLS")[0] == 503  # TLS is already on
        assert client.login("alice", PASSWORD)[0] == 235
        client.sendmail("alice@test.example", ["implicit@test.example"], b"Subject: i\r\n\r\ni\r\n")
    (path,) = tls_server.messages("implicit")
    received = path.read_text().split("\n\n", 1)[0]
    assert " with ESMTPSA id " in received
    line = wait_until(
        lambda: [li for li in tls_server.access_log().splitlines() if "implicit@" in li],
        what="access log line",
    )
    assert "user=alice" in line[0] and "tls=yes" in line[0]


def test_submissions_greeting_only_after_handshake(tls_server, certs):
    port = tls_server.ports["submissions"]
    with smtplib.SMTP_SSL("127.0.0.1", port, context=certs.client_context(), timeout=10) as client:
        # smtplib read the greeting through TLS; a plain client would have read nothing.
        assert client.noop()[0] == 250


# ------------------------------------------------------------- TLS setups


def test_starttls_without_certificate_is_454(shared_server):
    server = shared_server  # the default config: no certificate
    with Wire.connect(server.host, server.port) as wire:
        text = wire.expect("EHLO client.example", 250)
        assert "STARTTLS" not in text.splitlines()
        code, text = wire.cmd("STARTTLS")
        assert code == 454 and text.startswith("4.7.0"), text
        wire.expect("NOOP", 250)


def test_min_version_13_refuses_a_tls12_only_client(make_server, certs):
    server = make_server(
        {
            "listeners": listeners("mx", "submissions"),
            "tls": {**certs.tls_config, "min_version": "1.3"},
        }
    )
    old = certs.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        client.ehlo()
        with pytest.raises((ssl.SSLError, OSError)):
            client.starttls(context=old)
    with pytest.raises((ssl.SSLError, OSError)):
        smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=old, timeout=10)
    # A TLS 1.3 client is fine.
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        client.starttls(context=certs.client_context())
        assert client.sock.version() == "TLSv1.3"


def test_default_min_version_accepts_tls12(tls_server, certs):
    with smtplib.SMTP("127.0.0.1", tls_server.ports["mx"], timeout=10) as client:
        client.starttls(context=certs.client_context(maximum_version=ssl.TLSVersion.TLSv1_2))
        assert client.sock.version() == "TLSv1.2"
        assert client.noop()[0] == 250


def test_self_signed_works_without_cert_files(make_server):
    server = make_server(
        {"listeners": listeners("mx", "submissions"), "tls": {"self_signed": True}}
    )
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        assert "STARTTLS" in ehlo_keywords(client)
        assert client.starttls(context=insecure)[0] == 220
        der = client.sock.getpeercert(binary_form=True)
        client.sendmail("carol@remote.example", ["alice@test.example"], b"\r\nself-signed\r\n")
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    assert cert.subject.rfc4514_string() == f"CN={HOSTNAME}"
    assert cert.subject == cert.issuer
    assert len(server.messages("alice")) == 1
    port = server.ports["submissions"]
    with smtplib.SMTP_SSL("127.0.0.1", port, context=insecure, timeout=10) as client:
        assert client.noop()[0] == 250
    # Verifying clients do not trust it.
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=ssl.create_default_context())


# ---------------------------------------------------- unusable certificates


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geosmtp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def _bad_tls_files(tmp_path, certs):
    import trustme
    from cryptography.hazmat.primitives import serialization

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("other.example").private_key_pem.write_to_path(str(other_key))
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cert, good_key = str(certs.cert), str(certs.key)
    return {
        "missing-cert": ({"cert": str(tmp_path / "nope.pem"), "key": good_key}, "tls.cert"),
        "missing-key": ({"cert": cert, "key": str(tmp_path / "nope.pem")}, "tls.key"),
        "garbage-cert": ({"cert": str(garbage), "key": good_key}, "tls.cert"),
        "garbage-key": ({"cert": cert, "key": str(garbage)}, "tls.key"),
        "wrong-key": ({"cert": cert, "key": str(other_key)}, "tls.key"),
        "encrypted-key": ({"cert": cert, "key": str(encrypted)}, "tls.key"),
        "cert-without-key": ({"cert": cert}, "tls.key"),
        "key-without-cert": ({"key": good_key}, "tls.cert"),
    }


CASES = [
    "missing-cert",
    "missing-key",
    "garbage-cert",
    "garbage-key",
    "wrong-key",
    "encrypted-key",
    "cert-without-key",
    "key-without-cert",
]


@pytest.mark.parametrize("case", CASES)
def test_unusable_certificate_exits_2_naming_the_key(tmp_path, certs, case):
    import yaml

    tls, key = _bad_tls_files(tmp_path, certs)[case]
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listeners": [{"address": "127.0.0.1", "port": free_port()}],
                "tls": tls,
                "log": {"dir": "logs"},
            }
        )
    )
    for extra in (["--check-config"], []):
        result = run_cli("-c", str(config), *extra, cwd=tmp_path)
        assert result.returncode == 2, (extra, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"geosmtp: {key}: "), lines[0]
        assert "secret" not in result.stderr
    # Nothing was started: no logs, no mail_dir.
    assert not (tmp_path / "logs").exists()
    assert not (tmp_path / "mail_dir").exists()


def test_submissions_without_tls_is_a_config_error(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"listeners:\n  - {{address: 127.0.0.1, port: {free_port()}, role: submissions}}\n"
    )
    result = run_cli("-c", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("geosmtp: listeners[0].role: submissions needs tls.cert")


# ------------------------------------------------- closing a TLS session


def test_timeout_and_stop_answer_421_inside_tls(make_server, certs):
    """The 421 of a timeout or a stop must go out through TLS, not in the clear."""
    server = make_server(
        {
            "listeners": listeners("mx", "submissions"),
            "tls": certs.tls_config,
            "timeouts": {"command": 0.5, "shutdown_grace": 0},
        }
    )
    with Wire.connect("127.0.0.1", server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        tls = starttls_wire(wire, certs.client_context())
        tls.expect("EHLO client.example", 250)
        code, text = tls.reply(timeout=10)  # idle: the command timeout
        assert (code, text[:5]) == (421, "4.4.2"), text
    ctx = certs.client_context()
    with Wire.connect("127.0.0.1", server.ports["mx"]) as plain_wire:
        plain_wire.expect("EHLO client.example", 250)
        starttls = starttls_wire(plain_wire, ctx)
        raw = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", server.ports["submissions"])),
            server_hostname="127.0.0.1",
        )
        with Wire(raw) as implicit:
            assert implicit.reply()[0] == 220
            server.process.terminate()
            for wire in (starttls, implicit):
                code, text = wire.reply(timeout=10)
                assert (code, text[:5]) == (421, "4.3.2"), text
    assert server.process.wait(timeout=20) == 0


# ------------------------------------------- old TLS versions, plaintext clients

OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def every_tls_server(make_module_server, certs):
    """Every listener that speaks TLS: STARTTLS, STLS, and both implicit-TLS roles."""
    return make_module_server(
        {
            "listeners": listeners("mx", "submissions", "pop3", "pop3s"),
            "tls": certs.tls_config,
            "users": users(alice=PASSWORD),
        }
    )


def s_client(port: int, version: str, starttls: str | None, tmp_path) -> str:
    """What `openssl s_client` says after trying a handshake at exactly `version`.

    The client is allowed everything OpenSSL can still do (an empty config file,
    security level 0), so a refusal comes from the server, not from the client.
    """
    empty = tmp_path / "openssl.cnf"
    empty.write_text("")
    args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", f"-{version}"]
    args += ["-cipher", "DEFAULT:@SECLEVEL=0"]
    if starttls:
        args += ["-starttls", starttls]
    done = subprocess.run(
        args,
        input=b"",
        capture_output=True,
        timeout=30,
        env={"OPENSSL_CONF": str(empty), "PATH": "/usr/bin:/bin"},
    )
    return (done.stdout + done.stderr).decode(errors="replace")


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
@pytest.mark.parametrize(
    ("role", "starttls"),
    [("mx", "smtp"), ("submissions", None), ("pop3", "pop3"), ("pop3s", None)],
)
def test_tls_10_and_11_are_refused_by_the_server(every_tls_server, tmp_path, role, starttls):
    port = every_tls_server.ports[role]
    for version in ("tls1", "tls1_1"):
        said = s_client(port, version, starttls, tmp_path)
        # Alert 70 is protocol_version, sent by the server on reading the hello.
        assert "alert protocol version" in said, said
        assert "Cipher is (NONE)" in said, said
    # The same client, allowed TLS 1.2, gets through: the refusals were the version's.
    said = s_client(port, "tls1_2", starttls, tmp_path)
    assert "New, TLSv1.2, Cipher is" in said, said


@pytest.mark.parametrize(
    ("role", "line"),
    [("submissions", b"EHLO plain.example\r\n"), ("pop3s", b"USER alice\r\n")],
)
def test_plaintext_client_on_an_implicit_tls_port_is_closed_cleanly(every_tls_server, role, line):
    """No greeting in the clear and an orderly end of stream, not a reset; the server goes on."""
    port = every_tls_server.ports[role]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(line)
        assert sock.recv(4096) == b""  # a reset would raise ConnectionResetError
    with smtplib.SMTP("127.0.0.1", every_tls_server.ports["mx"], timeout=10) as client:
        assert client.noop()[0] == 250
    assert "Traceback" not in every_tls_server.server_log()
