"""The outbound relay's modes and permanent failures, end to end through the CLI:
a smarthost with STARTTLS and AUTH, Postfix as the receiving MX, loop
detection, SMTPUTF8 towards a server without it, and delay warnings.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import smtplib
import ssl
from pathlib import Path

import pytest

from tests.conftest import listeners, users, wait_until
from tests.integration.dns_server import dns_server, remote_mx
from tests.integration.postfix import POSTFIX_HOST, private_postfix
from tests.integration.smtp_sink import Script, Sink, free_port_on

PASSWORD = "modes-test-pw"
BODY = b"hi there\r\n.leading dot\r\nend\r\n"
MESSAGE = (
    b"From: alice@test.example\r\nTo: bob@remote.test\r\nSubject: modes\r\n"
    b"Message-ID: <modes@test.example>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n\r\n" + BODY
)


def base_config(**relay) -> dict:  # type: ignore[no-untyped-def]
    return {
        "listeners": listeners("submission"),
        "users": users(alice=PASSWORD),
        "auth": {"allow_plaintext": True},
        "relay": {"retry_schedule": [0.5], **relay},
    }


@pytest.fixture
def mx_setup(make_server, tmp_path):
    """geosmtp relaying remote.test to its MX `mx_address` (a private dnsmasq)."""

    def start(mx_address: str, port: int, **relay):  # type: ignore[no-untyped-def]
        dns = stack.enter_context(dns_server(remote_mx(mx_address), tmp_path / "dns"))
        config = base_config(mx_port=port, **relay)
        config["dns"] = dns.config()
        return make_server(config)

    with contextlib.ExitStack() as stack:
        yield start


def submit(server, rcpts: list[str], message: bytes = MESSAGE, **options) -> None:  # type: ignore[no-untyped-def]
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@test.example", rcpts, message, **options) == {}


def queued(server) -> list[Path]:  # type: ignore[no-untyped-def]
    return sorted((server.mail_dir / ".queue" / "records").glob("*.json"))


def report_blocks(path: Path, kind: str = "delivery-status") -> list:
    """The per-message and per-recipient blocks of an RFC 3464 report (`kind`
    "global-delivery-status": its RFC 6533 form, for UTF-8 mail)."""
    report = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == kind
    status = list(report.iter_parts())[1]
    assert status.get_content_type() == f"message/{kind}"
    if kind == "delivery-status":
        return status.get_payload()
    # The email package reads message/global-delivery-status as one message:
    # the per-message block its header section, the recipients' blocks its body.
    (first,) = status.get_payload()
    rest = first.get_payload().replace("\r\n", "\n").strip("\n")
    return [first] + [
        email.message_from_string(block + "\n", policy=email.policy.default)
        for block in rest.split("\n\n")
    ]


# ---------------------------------------------------------------- smarthost


def server_tls(certs) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.cert), str(certs.key))
    return context


@pytest.mark.parametrize("secret", ["password", "password_file"])
def test_smarthost_with_starttls_and_auth(make_server, tmp_path, certs, secret):
    script = Script(tls=server_tls(certs), users={"relayuser": "s3cret pw"})
    with Sink(script, address="127.0.0.1") as sink:
        auth: dict = {"user": "relayuser"}
        if secret == "password":
            auth["password"] = "s3cret pw"
        else:
            (tmp_path / "smarthost.pw").write_text("s3cret pw\n")
            auth["password_file"] = str(tmp_path / "smarthost.pw")
        server = make_server(
            base_config(
                smarthost=f"127.0.0.1:{sink.port}",
                smarthost_tls="starttls",
                smarthost_auth=auth,
                smarthost_ca_file=str(certs.ca_file),
            )
        )
        submit(server, ["bob@remote.test", "carol@elsewhere.test"])
        # Two domains, one smarthost: a transaction per domain.
        wait_until(lambda: len(sink.completed) == 2, what="the smarthost to get both")
        wait_until(lambda: not queued(server), what="the queue to empty")
    by_rcpt = {tuple(t.rcpts): t for t in sink.completed}
    assert set(by_rcpt) == {("bob@remote.test",), ("carol@elsewhere.test",)}
    for tx in sink.completed:
        assert tx.tls  # STARTTLS before the mail, the certificate checked (CA file)
        assert tx.auth == "relayuser"
        assert tx.sender == "alice@test.example"
        assert tx.data.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
        head = tx.data.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"Received: from ") and b"Subject: modes\r\n" in head
        assert not tx.bad_line_ends
    # The AUTH exchange never came before TLS.
    commands = [c.split(b" ")[0].strip().upper() for c in sink.commands]
    assert commands.index(b"STARTTLS") < commands.index(b"AUTH")
    assert "s3cret" not in server.server_log() + server.access_log()


def test_smarthost_certificate_not_trusted_is_not_sent_to(make_server, certs):
    """Without the test CA the certificate fails the check: no AUTH, no mail, retried."""
    script = Script(tls=server_tls(certs), users={"relayuser": "s3cret pw"})
    with Sink(script, address="127.0.0.1") as sink:
        server = make_server(
            base_config(
                smarthost=f"127.0.0.1:{sink.port}",
                smarthost_tls="starttls",
                smarthost_auth={"user": "relayuser", "password": "s3cret pw"},
                retry_schedule=[3600],
            )
        )
        submit(server, ["bob@remote.test"])
        log = wait_until(
            lambda: "outcome=deferred" in server.access_log() and server.access_log(),
            what="the attempt to fail",
        )
        assert sink.transactions == [] and not any(c.startswith(b"AUTH") for c in sink.commands)
    assert "status=4.7.5" in log and "CERTIFICATE_VERIFY_FAILED" in log
    assert len(queued(server)) == 1  # still queued


def test_smarthost_ca_file_missing_is_a_config_error(tmp_path):
    from tests.conftest import run_cli, write_config

    path = write_config(
        tmp_path,
        {
            "relay": {
                "smarthost": "127.0.0.1:2525",
                "smarthost_ca_file": str(tmp_path / "no-such-ca.pem"),
            }
        },
    )
    result = run_cli("-c", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert "smarthost_ca_file" in result.stderr


# ------------------------------------------------------- Postfix as the MX


@pytest.fixture
def postfix():
    """A private Postfix on 127.0.0.3 delivering remote.test into a Maildir per
    user (tests/integration/postfix.py): yields its root and port."""
    with private_postfix() as server:
        yield server.root, server.port


def test_postfix_as_the_receiving_mx(mx_setup, postfix):
    root, port = postfix
    server = mx_setup(POSTFIX_HOST, port)
    submit(server, ["bob@remote.test", "carol@remote.test"])

    def delivered() -> list[Path]:
        return sorted((root / "mail_dir").glob("*/new/*"))

    paths = wait_until(lambda: len(delivered()) == 2 and delivered(), timeout=30, what="postfix")
    wait_until(lambda: not queued(server), what="the queue to empty")
    assert sorted(p.parent.parent.name for p in paths) == ["bob", "carol"]
    for path in paths:
        stored = path.read_bytes()  # Postfix's Maildir: LF line ends
        expected_body = BODY.replace(b"\r\n", b"\n")
        head, _, body = stored.partition(b"\n\n")
        assert body == expected_body  # byte-exact, the dot-stuffed line undone
        lines = head.split(b"\n")
        # Postfix adds its Return-Path, Delivered-To and Received; ours follows,
        # then the submitted header section as it was.
        assert lines[0] == b"Return-Path: <alice@test.example>"
        submitted = MESSAGE.split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n")
        assert head.endswith(b"\n" + submitted)
        assert b"by mx.remote.test (Postfix)" in head
        assert b"by mx.test.example" in head  # geosmtp's own trace line
    log = wait_until(
        lambda: "outcome=sent" in server.access_log() and server.access_log(),
        what="the delivery logged",
    )
    assert "relay=mx.remote.test[127.0.0.3]" in log


# ---------------------------------------------- permanent failures, warnings


@pytest.fixture
def sink_mx(mx_setup):
    """A scripted sink as remote.test's MX on 127.0.0.2, and geosmtp relaying to it."""
    sinks: list[Sink] = []

    def start(script: Script, **relay):  # type: ignore[no-untyped-def]
        port = free_port_on("127.0.0.2")
        sink = Sink(script, address="127.0.0.2", port=port)
        sinks.append(sink)
        return mx_setup("127.0.0.2", port, **relay), sink

    yield start
    for sink in sinks:
        sink.close()


def test_a_mail_loop_bounces_with_5_4_6_without_connecting(sink_mx):
    server, sink = sink_mx(Script())
    loop = b"".join(
        f"Received: from hop{i}.test by hop{i + 1}.test; 1 Dec 2026 12:00:00 +0000\r\n".encode()
        for i in range(51)
    )
    submit(server, ["bob@remote.test"], loop + MESSAGE)
    (path,) = wait_until(lambda: server.messages("alice"), what="the bounce")
    wait_until(lambda: not queued(server), what="the queue to give up")
    assert sink.connections == 0
    # An ASCII message with an ASCII diagnostic: the classic report type.
    blocks = report_blocks(path, "delivery-status")
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.4.6"


def test_fifty_received_headers_are_not_a_loop(sink_mx):
    """The limit is "more than `max_received`": 50 submitted plus geosmtp's own
    is 51, delivered when the limit is 51."""
    server, sink = sink_mx(Script(), max_received=51)
    loop = b"".join(f"Received: from hop{i}.test; x\r\n".encode() for i in range(50))
    submit(server, ["bob@remote.test"], loop + MESSAGE)
    wait_until(lambda: sink.completed, what="delivery")
    assert server.messages("alice") == []


def test_smtputf8_mail_to_a_server_without_it_bounces_with_5_6_7(sink_mx):
    script = Script(extensions=["8BITMIME", "SIZE 10000000", "ENHANCEDSTATUSCODES"])
    server, sink = sink_mx(script)
    rcpt = "bøb@remote.test"
    message = (
        "From: alice@test.example\r\nTo: bøb@remote.test\r\nSubject: ünïcode\r\n"
        "Message-ID: <utf8@test.example>\r\n\r\nhällo\r\n"
    ).encode()
    submit(server, [rcpt], message, mail_options=["SMTPUTF8"])
    (path,) = wait_until(lambda: server.messages("alice"), what="the bounce")
    wait_until(lambda: not queued(server), what="the queue to give up")
    assert sink.transactions == []  # no MAIL FROM was ever sent
    blocks = report_blocks(path, "global-delivery-status")  # UTF-8 mail: RFC 6533
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.6.7"
    # RFC 6533 §3: the UTF-8 address as it is, of type utf-8.
    assert "Final-Recipient: utf-8; bøb@remote.test\n".encode() in path.read_bytes()


def test_a_delay_warning_reports_delayed_and_keeps_the_message(sink_mx):
    script = Script(final_replies=["451 4.3.0 try again later"])
    server, sink = sink_mx(script, delay_warning=1, retry_schedule=[0.3])
    submit(server, ["bob@remote.test"])
    (path,) = wait_until(lambda: server.messages("alice"), timeout=15, what="the delay warning")
    blocks = report_blocks(path)
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Status"].startswith("4.")
    assert "451 4.3.0" in blocks[1]["Diagnostic-Code"]
    assert blocks[1]["Will-Retry-Until"]
    # Still queued, still tried, and warned once only.
    (record,) = queued(server)
    attempts = len(sink.transactions)
    wait_until(lambda: len(sink.transactions) >= attempts + 2, what="further attempts")
    assert len(queued(server)) == 1
    assert len(server.messages("alice")) == 1
    assert b'"delay_warned": true' in record.read_bytes()
