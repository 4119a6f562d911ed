"""Listener roles (mx, submission, submissions), the relay decision, and real clients
(swaks, curl, msmtp) on the submission listeners."""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import subprocess

import pytest

from tests.conftest import DOMAINS, HOSTNAME, listeners, users, wait_until
from tests.integration.wire import Wire

ALICE_PW = "alice-role-pw"
BOB_PW = "bob-role-pw"


@pytest.fixture(scope="module")
def roles_server(make_module_server, certs):
    return make_module_server(
        {
            "listeners": listeners("mx", "submission", "submissions"),
            "tls": certs.tls_config,
            "users": users(alice=ALICE_PW, bob=BOB_PW),
            # 127.0.0.2 may relay; 127.0.0.1 (the other tests) may not.
            "trusted_networks": ["127.0.0.2/32"],
        }
    )


def submission_client(server, certs, login: str | None = "alice") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10)
    client.ehlo("client.example")
    client.starttls(context=certs.client_context())
    client.ehlo("client.example")
    if login is not None:
        password = {"alice": ALICE_PW, "bob": BOB_PW}[login]
        assert client.login(login, password)[0] == 235
    return client


def access_lines(server, needle: str) -> list[str]:
    return wait_until(
        lambda: [li for li in server.access_log().splitlines() if needle in li],
        what=f"access log line with {needle}",
    )


# ------------------------------------------------------------ submission


def test_submission_wants_auth_before_mail(roles_server, certs):
    with submission_client(roles_server, certs, login=None) as client:
        code, text = client.mail("alice@test.example")
        assert (code, text[:5]) == (530, b"5.7.0"), text
        assert client.docmd("RCPT TO:<alice@test.example>")[0] == 503
    line = access_lines(roles_server, "result=530")[-1]
    assert "stage=MAIL" in line


def test_submission_in_the_clear_wants_auth_too(roles_server):
    with Wire.connect("127.0.0.1", roles_server.ports["submission"]) as wire:
        wire.expect("EHLO client.example", 250)
        code, text = wire.cmd("MAIL FROM:<alice@test.example>")
        assert code == 530 and text.startswith("5.7.0"), text


def test_submission_after_auth_delivers_locally(roles_server, certs):
    with submission_client(roles_server, certs) as client:
        refused = client.sendmail(
            "alice@test.example", ["sub-local@test.example"], b"Subject: s\r\n\r\nlocal\r\n"
        )
        assert refused == {}
    (path,) = roles_server.messages("sub-local")
    assert " with ESMTPSA id " in path.read_text()
    assert "user=alice" in access_lines(roles_server, "<sub-local@test.example>")[-1]


def test_submission_to_an_external_domain_is_queued(roles_server, certs):
    with submission_client(roles_server, certs) as client:
        assert client.mail("alice@test.example")[0] == 250
        assert client.rcpt("someone@remote.example")[0] == 250
        # A local recipient in the same transaction is delivered at once.
        assert client.rcpt("sub-mixed@test.example")[0] == 250
        code, text = client.data(b"Subject: mixed\r\n\r\nx\r\n")
        assert code == 250, text
    assert len(roles_server.messages("sub-mixed")) == 1
    assert roles_server.messages("someone") == []
    queue_id = text.decode().rsplit(" ", 1)[1]
    record = roles_server.mail_dir / ".queue" / "records" / f"{queue_id}.json"
    assert b'"address": "someone@remote.example"' in record.read_bytes()


def test_submission_without_sender_must_match_lets_alice_send_as_bob(roles_server, certs):
    with submission_client(roles_server, certs) as client:
        assert client.mail("bob@test.example")[0] == 250


# ---------------------------------------------------------------------- mx


def test_mx_takes_local_mail_without_auth(roles_server):
    with smtplib.SMTP("127.0.0.1", roles_server.ports["mx"], timeout=10) as client:
        assert (
            client.sendmail("carol@remote.example", ["mx-local@test.example"], b"\r\nx\r\n") == {}
        )
    (path,) = roles_server.messages("mx-local")
    assert " with ESMTP id " in path.read_text()


def test_mx_refuses_to_relay_for_strangers(roles_server):
    with Wire.connect("127.0.0.1", roles_server.ports["mx"]) as wire:
        wire.expect("EHLO client.example", 250)
        wire.expect("MAIL FROM:<carol@remote.example>", 250)
        for address in ("victim@remote.example", "victim@test.example.evil", '"x@test.example"'):
            code, text = wire.cmd(f"RCPT TO:<{address}>")
            assert code in (550, 501) and text[:1] == "5", (address, code, text)
        code, text = wire.cmd("RCPT TO:<victim@remote.example>")
        assert code == 550 and text.startswith("5.7.1"), text
    # The transaction's one line, written when the session ends, names each refusal.
    (line,) = access_lines(roles_server, "refused=<victim@remote.example>:550")
    assert "result=aborted" in line and "reason=lost" in line  # closed without QUIT


def test_mx_lets_an_authenticated_user_relay(roles_server, certs):
    with smtplib.SMTP("127.0.0.1", roles_server.ports["mx"], timeout=10) as client:
        client.starttls(context=certs.client_context())
        client.login("bob", BOB_PW)
        assert client.mail("bob@test.example")[0] == 250
        code, text = client.rcpt("friend@remote.example")
        assert (code, text[:5]) == (250, b"2.1.5"), text  # queued for relay


def test_trusted_network_is_by_address(roles_server):
    """127.0.0.2 is trusted: it may relay (250, queued); 127.0.0.1 may not (550)."""
    for source, expected in (("127.0.0.2", (250, "2.1.5")), ("127.0.0.1", (550, "5.7.1"))):
        sock = socket.create_connection(
            ("127.0.0.1", roles_server.ports["mx"]), timeout=10, source_address=(source, 0)
        )
        with Wire(sock) as wire:
            assert wire.reply()[0] == 220
            wire.expect("EHLO client.example", 250)
            wire.expect("MAIL FROM:<app@test.example>", 250)
            code, text = wire.cmd("RCPT TO:<out@remote.example>")
            assert (code, text[:5]) == expected, (source, code, text)


def test_the_postmaster_every_report_names_takes_mail_from_anyone(make_server):
    """A delivery report says to write to postmaster@<hostname>; the hostname is
    not one of `domains` (as in the bundled config), and a stranger on the mx
    listener is not refused (RFC 5321 §4.5.1): it reaches the postmaster's
    mailbox, as <postmaster> and postmaster@<domain> do. (The report is asked
    for from 127.0.0.2, trusted: a stranger's NOTIFY=SUCCESS gets none.)"""
    server = make_server({"postmaster": "admin", "trusted_networks": ["127.0.0.2/32"]})
    assert HOSTNAME not in DOMAINS
    with smtplib.SMTP(timeout=10, source_address=("127.0.0.2", 0)) as client:
        client.connect("127.0.0.1", server.port)
        client.sendmail(
            "alice@test.example",
            ["bob@test.example"],
            b"Subject: report me\r\n\r\nhi\r\n",
            rcpt_options=["NOTIFY=SUCCESS"],
        )
    (report,) = wait_until(lambda: server.messages("alice"), what="the delivery report")
    (named,) = re.findall(r"write to the postmaster at <([^>]+)>", report.read_text())
    assert named == f"postmaster@{HOSTNAME}"
    for address in (named, named.upper(), "postmaster", "postmaster@test.example"):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("carol@remote.example", [address], b"Subject: help\r\n\r\n?\r\n")
    wait_until(lambda: len(server.messages("admin")) == 4, what="four messages for admin")
    assert server.messages("postmaster") == []
    line = access_lines(server, f"to=<{named}>")[-1]
    assert "result=250" in line


def test_trusted_networks_loopback_range(make_server):
    server = make_server({"trusted_networks": ["127.0.0.0/8"]})
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.mail("app@test.example")[0] == 250
        code, text = client.rcpt("out@remote.example")
        assert (code, text[:5]) == (250, b"2.1.5"), text
        assert client.rcpt("alice@test.example")[0] == 250


def test_a_public_trusted_network_is_refused(tmp_path):
    import sys

    path = tmp_path / "config.yaml"
    path.write_text("trusted_networks: [0.0.0.0/0]\n")
    result = subprocess.run(
        [sys.executable, "-m", "geosmtp", "-c", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "trusted_networks[0]" in result.stderr and "open relay" in result.stderr


# -------------------------------------------------------- sender_must_match


def test_sender_must_match(make_server, certs):
    server = make_server(
        {
            "listeners": listeners("submission"),
            "tls": certs.tls_config,
            "users": users(alice=ALICE_PW, bob=BOB_PW),
            "auth": {"sender_must_match": True},
        }
    )
    with submission_client(server, certs) as client:
        for sender in ("bob@test.example", "alice@remote.example", "alice.x@test.example"):
            code, text = client.mail(sender)
            assert (code, text[:5]) == (553, b"5.7.1"), (sender, text)
        for sender in ("alice@test.example", "Alice@TEST.example", "alice@localhost"):
            assert client.mail(sender)[0] == 250, sender
            client.rset()
        assert client.sendmail("alice@test.example", ["bob@test.example"], b"\r\nmine\r\n") == {}
    assert len(server.messages("bob")) == 1
    line = access_lines(server, "result=553")[0]
    assert "from=<bob@test.example>" in line and "user=alice" in line


# ------------------------------------------------------------ real clients


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def run(args: list[str], input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=60,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
    )


def swaks(server, role: str, *args: str, to: str) -> subprocess.CompletedProcess:
    return run(
        [
            need("swaks"),
            "--server",
            f"127.0.0.1:{server.ports[role]}",
            "--ehlo",
            "swaks.example",
            "--from",
            "alice@test.example",
            "--to",
            to,
            "--header",
            "Subject: from swaks",
            *args,
        ]
    )


AUTH = ["--auth", "PLAIN", "--auth-user", "alice", "--auth-password", ALICE_PW]


def test_swaks_starttls_auth_on_submission(roles_server):
    result = swaks(roles_server, "submission", "--tls", *AUTH, to="swaks587@test.example")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    (path,) = roles_server.messages("swaks587")
    text = path.read_text()
    assert "Subject: from swaks" in text and " with ESMTPSA id " in text


def test_swaks_auth_login_on_submission(roles_server):
    args = ["--tls", "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", ALICE_PW]
    result = swaks(roles_server, "submission", *args, to="swakslogin@test.example")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(roles_server.messages("swakslogin")) == 1


def test_swaks_without_tls_cannot_log_in(roles_server):
    result = swaks(roles_server, "submission", *AUTH, to="swaksclear@test.example")
    assert result.returncode != 0
    # AUTH is not even offered in the clear, so swaks gives up before sending a password.
    assert "did not advertise authentication" in result.stdout + result.stderr
    # Told to go on without it, the server wants AUTH.
    result = swaks(roles_server, "submission", "--auth-optional", *AUTH[1:], to="swaksclear@x.org")
    assert result.returncode != 0
    assert "530 5.7.0" in result.stdout
    assert roles_server.messages("swaksclear") == []


def test_swaks_without_auth_is_530(roles_server):
    result = swaks(roles_server, "submission", "--tls", to="swaksnoauth@test.example")
    assert result.returncode != 0
    assert "530 5.7.0" in result.stdout
    assert roles_server.messages("swaksnoauth") == []


def test_swaks_tls_on_connect_to_submissions(roles_server):
    result = swaks(
        roles_server, "submissions", "--tls-on-connect", *AUTH, to="swaks465@test.example"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = roles_server.messages("swaks465")
    assert " with ESMTPSA id " in path.read_text()


def test_curl_starttls_on_submission(roles_server, certs, tmp_path):
    curl = need("curl")
    message = tmp_path / "message.txt"
    message.write_bytes(b"Subject: from curl\r\n\r\nvia curl\r\n")
    common = [
        "--cacert",
        str(certs.ca_file),
        "--mail-from",
        "alice@test.example",
        "--mail-rcpt",
        "curl587@test.example",
        "-T",
        str(message),
        "-sS",
    ]
    port = roles_server.ports["submission"]
    url = f"smtp://127.0.0.1:{port}"
    result = run([curl, "--ssl-reqd", url, "--user", f"alice:{ALICE_PW}", *common])
    assert result.returncode == 0, result.stderr
    (path,) = roles_server.messages("curl587")
    assert path.read_bytes().endswith(b"Subject: from curl\n\nvia curl\n")
    # A wrong password: curl reports a login failure, nothing is delivered.
    result = run([curl, "--ssl-reqd", url, "--user", "alice:wrong", *common])
    assert result.returncode == 67, result.stderr  # CURLE_LOGIN_DENIED
    assert len(roles_server.messages("curl587")) == 1


def test_curl_implicit_tls_on_submissions(roles_server, certs, tmp_path):
    curl = need("curl")
    message = tmp_path / "message.txt"
    message.write_bytes(b"Subject: smtps\r\n\r\nimplicit\r\n")
    result = run(
        [
            curl,
            "-sS",
            f"smtps://127.0.0.1:{roles_server.ports['submissions']}",
            "--cacert",
            str(certs.ca_file),
            "--user",
            f"alice:{ALICE_PW}",
            "--mail-from",
            "alice@test.example",
            "--mail-rcpt",
            "curl465@test.example",
            "-T",
            str(message),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert len(roles_server.messages("curl465")) == 1


def test_msmtp_starttls_on_submission(roles_server, certs):
    msmtp = need("msmtp")
    result = run(
        [
            msmtp,
            "--host=127.0.0.1",
            f"--port={roles_server.ports['submission']}",
            "--tls=on",
            "--tls-starttls=on",
            f"--tls-trust-file={certs.ca_file}",
            "--auth=plain",
            "--user=alice",
            f"--passwordeval=echo {ALICE_PW}",
            "--from=alice@test.example",
            "msmtp587@test.example",
        ],
        input="Subject: from msmtp\n\nvia msmtp\n",
    )
    assert result.returncode == 0, result.stderr
    (path,) = roles_server.messages("msmtp587")
    assert path.read_text().endswith("Subject: from msmtp\n\nvia msmtp\n")
