"""SMTP AUTH (RFC 4954) against the real server: PLAIN and LOGIN, TLS first, throttling, secrets."""

from __future__ import annotations

import base64
import smtplib
import socket
import time

import pytest
import yaml

from tests.conftest import free_port, listeners, password_hash, run_cli, users, wait_until
from tests.integration.wire import Wire

PASSWORD = "Tr0ub4dor&3 alice"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(login: str, password: str) -> str:
    return b64(f"\0{login}\0{password}")


def connect_from(source: str, port: int) -> Wire:
    """A Wire from another loopback address (127.0.0.2 ...), greeting read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    wire = Wire(sock)
    assert wire.reply()[0] == 220
    return wire


def starttls(client: smtplib.SMTP, certs) -> None:
    client.ehlo("client.example")
    assert client.starttls(context=certs.client_context())[0] == 220
    client.ehlo("client.example")


def access_line(server, needle: str) -> str:
    lines = wait_until(
        lambda: [li for li in server.access_log().splitlines() if needle in li],
        what=f"access log line with {needle}",
    )
    return lines[-1]


@pytest.fixture(scope="module")
def auth_server(make_module_server, certs):
    """TLS, alice with a password, bob without; failures never throttle here."""
    return make_module_server(
        {
            "listeners": listeners("mx", "submission"),
            "tls": certs.tls_config,
            "users": users(alice=PASSWORD, bob=None),
            "auth": {"max_failures": 1000, "failure_delay": 0},
        }
    )


# ----------------------------------------------------------- logging in


@pytest.mark.parametrize("initial_response", [True, False], ids=["initial", "challenge"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_login_and_send(auth_server, certs, mechanism, initial_response):
    box = f"auth-{mechanism.lower()}-{int(initial_response)}"
    with smtplib.SMTP("127.0.0.1", auth_server.ports["submission"], timeout=10) as client:
        starttls(client, certs)
        client.user, client.password = "alice", PASSWORD
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, text = client.auth(mechanism, method, initial_response_ok=initial_response)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        client.sendmail("alice@test.example", [f"{box}@test.example"], b"Subject: a\r\n\r\nhi\r\n")
    (path,) = auth_server.messages(box)
    assert " with ESMTPSA id " in path.read_text()
    line = access_line(auth_server, f"<{box}@test.example>")
    assert " user=alice " in f" {line} " and "result=250" in line


def test_login_with_the_full_address(auth_server, certs):
    with smtplib.SMTP("127.0.0.1", auth_server.ports["submission"], timeout=10) as client:
        starttls(client, certs)
        assert client.login("alice@test.example", PASSWORD)[0] == 235


@pytest.mark.parametrize(
    ("login", "password"),
    [
        ("alice", "wrong password"),
        ("alice", PASSWORD.upper()),
        ("nobody", PASSWORD),
        ("bob", PASSWORD),  # bob has no password: he cannot log in at all
        ("alice@remote.example", PASSWORD),  # not a local domain
    ],
    ids=["wrong", "case", "unknown-user", "no-password", "foreign-domain"],
)
def test_bad_credentials_are_535(auth_server, certs, login, password):
    with smtplib.SMTP("127.0.0.1", auth_server.ports["submission"], timeout=10) as client:
        starttls(client, certs)
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(login, password)
        assert info.value.smtp_code == 535
        assert info.value.smtp_error.startswith(b"5.7.8")
        # Not logged in: the submission listener still wants AUTH.
        assert client.mail("alice@test.example")[0] == 530


def test_auth_protocol_errors(auth_server, certs):
    with Wire.connect("127.0.0.1", auth_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        code, _ = wire.cmd("STARTTLS")
        assert code == 220
        tls = Wire(certs.client_context().wrap_socket(wire.sock, server_hostname="127.0.0.1"))
        tls.expect("EHLO client.example", 250)
        assert tls.cmd("AUTH CRAM-MD5")[0] == 504
        assert tls.cmd("AUTH")[0] == 501
        assert tls.cmd("AUTH PLAIN not*base64")[0] == 501
        assert tls.cmd("AUTH PLAIN")[0] == 334
        assert tls.cmd("*")[0] == 501  # cancelled
        assert tls.cmd("AUTH LOGIN")[0] == 334
        assert tls.cmd(b64("alice"))[0] == 334
        assert tls.cmd(b64(PASSWORD))[0] == 235
        assert tls.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 503  # already
        tls.expect("QUIT", 221)


def test_auth_inside_a_transaction_is_503(auth_server, certs):
    with smtplib.SMTP("127.0.0.1", auth_server.ports["mx"], timeout=10) as client:
        starttls(client, certs)
        assert client.mail("carol@remote.example")[0] == 250
        assert client.docmd("AUTH", f"PLAIN {plain('alice', PASSWORD)}")[0] == 503


def test_auth_before_tls_is_538(auth_server):
    """Passwords are not taken in the clear unless auth.allow_plaintext."""
    for role in ("mx", "submission"):
        with Wire.connect("127.0.0.1", auth_server.ports[role]) as wire:
            text = wire.expect("EHLO client.example", 250)
            assert not [line for line in text.splitlines() if line.startswith("AUTH")]
            code, text = wire.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
            assert code == 538 and text.startswith("5.7.11"), text
            code, text = wire.cmd("AUTH LOGIN")
            assert code == 538, text
    assert auth_server.messages("alice") == []


def test_allow_plaintext_offers_auth_without_tls(make_server):
    server = make_server(
        {"users": users(alice=PASSWORD, bob=None), "auth": {"allow_plaintext": True}}
    )
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("auth")
        assert "PLAIN" in client.esmtp_features["auth"].split()
        assert client.login("alice", PASSWORD)[0] == 235
        client.sendmail("alice@test.example", ["bob@test.example"], b"\r\nplain\r\n")
    (path,) = server.messages("bob")
    assert " with ESMTPA id " in path.read_text()


def test_a_login_in_the_clear_is_forgotten_after_starttls(make_server, certs):
    """RFC 3207 §4.2: what the client said before TLS is discarded, AUTH included."""
    server = make_server(
        {
            "listeners": listeners("submission"),
            "tls": certs.tls_config,
            "users": users(alice=PASSWORD, bob=None),
            "auth": {"allow_plaintext": True},
        }
    )
    with Wire.connect("127.0.0.1", server.port) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
        assert wire.cmd("STARTTLS")[0] == 220
        tls = Wire(certs.client_context().wrap_socket(wire.sock, server_hostname="127.0.0.1"))
        text = tls.expect("EHLO client.example", 250)
        assert "AUTH PLAIN LOGIN" in text.splitlines()  # offered again: not logged in
        assert tls.cmd("MAIL FROM:<alice@test.example>")[0] == 530


def test_no_passwords_means_no_auth(make_server, certs):
    server = make_server({"tls": certs.tls_config})  # alice and bob have no password
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        starttls(client, certs)
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", f"PLAIN {plain('alice', 'x')}")[0] == 503


# ------------------------------------------------------------ throttling


@pytest.fixture(scope="module")
def throttled(make_module_server):
    return make_module_server(
        {
            "users": users(alice=PASSWORD, bob=None),
            "auth": {"allow_plaintext": True, "max_failures": 3, "failure_delay": 0.05},
        }
    )


def test_repeated_failures_end_in_421_and_the_address_is_blocked(throttled):
    started = time.monotonic()
    with connect_from("127.0.0.2", throttled.port) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd(f"AUTH PLAIN {plain('alice', 'bad1')}")[0] == 535
        assert wire.cmd(f"AUTH PLAIN {plain('alice', 'bad2')}")[0] == 535
        assert wire.cmd(f"AUTH PLAIN {plain('alice', 'bad3')}")[0] == 535
        code, text = wire.reply()
        assert code == 421 and text.startswith("4.7.0"), text
        assert wire.is_closed()
    # Each failure's reply was held back longer: 0.05 + 0.1 + 0.2 s at least.
    assert time.monotonic() - started >= 0.35
    # The next connection from that address gets no password check, even with
    # the right password: 421 at once, no 535 first.
    with connect_from("127.0.0.2", throttled.port) as wire:
        wire.expect("EHLO client.example", 250)
        code, text = wire.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
        assert code == 421 and text.startswith("4.7.0"), text
        assert wire.is_closed()
    # Another address is not affected.
    with connect_from("127.0.0.3", throttled.port) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
    throttled.logged("authentication failed")


def test_a_good_login_before_the_limit_resets_the_count(throttled):
    with connect_from("127.0.0.4", throttled.port) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd(f"AUTH PLAIN {plain('alice', 'bad1')}")[0] == 535
        assert wire.cmd(f"AUTH PLAIN {plain('alice', 'bad2')}")[0] == 535
        assert wire.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
    with connect_from("127.0.0.4", throttled.port) as wire:
        wire.expect("EHLO client.example", 250)
        # Two more failures are allowed again before the third disconnects.
        assert wire.cmd(f"AUTH PLAIN {plain('alice', 'bad3')}")[0] == 535
        assert wire.cmd(f"AUTH PLAIN {plain('alice', 'bad4')}")[0] == 535
        wire.expect("NOOP", 250)
        assert wire.cmd(f"AUTH LOGIN {b64('alice')}")[0] == 334
        assert wire.cmd(b64("bad5"))[0] == 535
        assert wire.reply()[0] == 421
        assert wire.is_closed()


# Three failures allowed, a short delay: what the parallel-login tests need.
PARALLEL = {
    "listeners": listeners("mx"),
    "users": users(alice="pw"),
    "auth": {"allow_plaintext": True, "max_failures": 3, "failure_delay": 0.05},
}


def parallel_auth(server, password: str, count: int, after: str = "") -> list[list[int]]:  # type: ignore[no-untyped-def]
    """`count` connections send AUTH PLAIN (and `after`) before any reply is read;
    each one's reply codes up to a 235, a 250 (the command after) or a 421."""
    wires = [Wire.connect("127.0.0.1", server.port) for _ in range(count)]
    try:
        for wire in wires:
            wire.expect("EHLO client.example", 250)
        for wire in wires:  # all in flight before any reply is read
            wire.send(f"AUTH PLAIN {plain('alice', password)}\r\n{after}".encode())
        seen = []
        for wire in wires:
            codes = [wire.reply()[0]]
            while codes[-1] not in (235, 250, 421):
                codes.append(wire.reply()[0])
            if codes[-1] == 421:
                assert wire.is_closed(), codes
            seen.append(codes)
        return seen
    finally:
        for wire in wires:
            wire.close()


def test_parallel_connections_share_the_failure_limit(make_server):
    """N connections from one address in flight at once get max_failures password checks.

    Each AUTH carries a pipelined NOOP: a connection still open after its 535
    answers 250; one closed answers 421 and nothing more.
    """
    server = make_server(PARALLEL)
    seen = parallel_auth(server, "wrong", 8, after="NOOP\r\n")
    assert sorted(seen) == [[421]] * 5 + [[535, 250]] * 2 + [[535, 421]], seen
    # Within the window even the right password gets no check: 421 at once.
    with Wire.connect("127.0.0.1", server.port) as wire:
        wire.expect("EHLO client.example", 250)
        code, text = wire.cmd(f"AUTH PLAIN {plain('alice', 'pw')}")
        assert code == 421 and text.startswith("4.7.0"), text
        assert wire.is_closed()


def test_parallel_logins_with_the_right_password_all_succeed(make_server):
    """A mail program (or an office behind one address) logs in on many connections
    at once: more than max_failures of them must not be taken for an attack."""
    server = make_server(PARALLEL)
    assert parallel_auth(server, "pw", 10) == [[235]] * 10


# ------------------------------------------------------------- secrets


def test_passwords_and_auth_arguments_never_reach_the_logs(auth_server, certs):
    secrets = {
        "good": PASSWORD,
        "bad-plain": "S3cret-Plain-Wrong",
        "bad-login": "S3cret-Login-Wrong",
    }
    with smtplib.SMTP("127.0.0.1", auth_server.ports["mx"], timeout=10) as client:
        starttls(client, certs)
        assert client.docmd("AUTH", f"PLAIN {plain('alice', secrets['bad-plain'])}")[0] == 535
        assert client.docmd("AUTH", f"LOGIN {b64('alice')}")[0] == 334
        assert client.docmd(b64(secrets["bad-login"]))[0] == 535
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd(b64("alice"))[0] == 334
        assert client.docmd(b64(secrets["good"]))[0] == 235
        client.sendmail("alice@test.example", ["secrets@test.example"], b"\r\nx\r\n")
    wait_until(lambda: "authentication failed" in auth_server.server_log(), what="log line")
    access_line(auth_server, "<secrets@test.example>")
    logs = "\n".join(
        [
            auth_server.server_log(),
            auth_server.access_log(),
            auth_server.stderr(),
            (auth_server.root / "stdout.txt").read_text(),
        ]
    )
    assert "authenticated as alice" in logs  # DEBUG logging is on, and AUTH is logged
    for secret in secrets.values():
        for form in (secret, b64(secret), plain("alice", secret), b64(f"alice\0{secret}")):
            assert form not in logs, form
    assert b64("alice") not in logs  # the login name's base64 (an AUTH argument) either


# ------------------------------------------------------- geosmtp passwd


def test_passwd_prints_a_hash_the_server_accepts(tmp_path, make_server):
    secret = "from stdin: ünïcode & spaces"
    result = run_cli("passwd", cwd=tmp_path, stdin=secret + "\n")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("$argon2id$")
    assert secret not in result.stdout + result.stderr
    server = make_server(
        {"users": {"carol": {"password": line}}, "auth": {"allow_plaintext": True}}
    )
    # smtplib encodes AUTH as ASCII; the raw client sends the UTF-8 password.
    with Wire.connect(server.host, server.port) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd(f"AUTH PLAIN {plain('carol', secret[:-1])}")[0] == 535
        assert wire.cmd(f"AUTH PLAIN {plain('carol', secret)}")[0] == 235


def test_passwd_refuses_an_empty_password(tmp_path):
    result = run_cli("passwd", cwd=tmp_path, stdin="\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "empty password" in result.stderr


def _write(tmp_path, data: dict, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.mark.parametrize(
    "password",
    ["hunter2", "$argon2id$v=19$m=65536,t=3,p=4"],
    ids=["plain-text", "cut-short-hash"],
)
def test_a_password_that_is_not_a_hash_is_refused(tmp_path, password):
    path = _write(
        tmp_path,
        {
            "listeners": [{"address": "127.0.0.1", "port": free_port()}],
            "users": {"alice": {"password": password}},
            "log": {"dir": "logs"},
        },
    )
    for extra in (["--check-config"], []):
        result = run_cli("-c", str(path), *extra, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("geosmtp: users.alice.password: "), line
        assert password not in line  # the error does not echo the password
    assert not (tmp_path / "logs").exists()


def test_users_file(tmp_path, make_server):
    users_file = _write(
        tmp_path, {"users": {"dave": {"password": password_hash(PASSWORD)}}}, "users.yaml"
    )
    server = make_server(
        {
            "users": {"alice": {}},
            "auth": {"users_file": str(users_file), "allow_plaintext": True},
            "unknown_recipients": "reject",
        }
    )
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.login("dave", PASSWORD)[0] == 235
        # dave is a known user for delivery too; unknown ones are refused.
        assert client.sendmail("dave@test.example", ["dave@test.example"], b"\r\nme\r\n") == {}
        assert client.mail("dave@test.example")[0] == 250
        assert client.rcpt("stranger@test.example")[0] == 550
    assert len(server.messages("dave")) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"users": {"dave": {"password": "plain"}}}, "users.dave.password: expected a password"),
        ({"people": {}}, "auth.users_file: "),
        (None, "auth.users_file: cannot read"),
    ],
    ids=["plain-password", "wrong-shape", "missing"],
)
def test_bad_users_file_exits_2(tmp_path, content, message):
    if content is not None:
        _write(tmp_path, content, "users.yaml")
    path = _write(tmp_path, {"auth": {"users_file": "users.yaml"}})
    result = run_cli("-c", str(path), "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert message in line, line
    assert "plain'" not in line
