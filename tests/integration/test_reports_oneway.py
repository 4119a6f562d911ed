"""The one-way data path through the real server (`geosmtp -c`, smtplib):
a bounce built in the queue is DKIM-signed with the reporting domain's key,
and a `Return-Path:` written by a client or a filter never survives (a
Maildir copy has exactly one, the envelope's; the relay sends none).

The next hop is a scripted sink on 127.0.0.2 (smtp_sink.py), found through a
private dnsmasq (dns_server.py), as in test_relay.py.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import smtplib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from geosmtp.mailauth.dkim_sign import public_key_record
from tests.conftest import listeners, users, wait_until
from tests.integration.dns_server import dns_server, remote_mx
from tests.integration.smtp_sink import Script, Sink, free_port_on

dkim = pytest.importorskip("dkim", reason="dkimpy is not installed")

PASSWORD = "oneway-test-pw"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # fast; dkimpy's minimum


@pytest.fixture
def relaying(make_server, tmp_path):
    """geosmtp (hostname mx.test.example) relaying remote.test to a sink."""

    def start(script: Script, **config):  # type: ignore[no-untyped-def]
        port = free_port_on("127.0.0.2")
        sink = stack.enter_context(Sink(script, address="127.0.0.2", port=port))
        dns = stack.enter_context(dns_server(remote_mx("127.0.0.2"), tmp_path / "dns"))
        base = {
            "listeners": listeners("submission"),
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
            "relay": {"mx_port": port, "retry_schedule": [0.5]},
            "dns": dns.config(),
        }
        return make_server({**base, **config}), sink

    with contextlib.ExitStack() as stack:
        yield start


def submit(server, rcpts: list[str], message: bytes) -> None:  # type: ignore[no-untyped-def]
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@test.example", rcpts, message) == {}


def key_file(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "test.example.s1.key"
    path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def test_a_bounce_to_a_local_sender_is_dkim_signed_with_the_hostnames_domain(relaying, tmp_path):
    """hostname mx.test.example, a key for test.example: the bounce (From:
    MAILER-DAEMON@mx.test.example) carries a signature that dkimpy verifies
    against the key's record, on the report as it would be sent on."""
    script = Script(rcpt_replies={"bob@remote.test": "550 5.1.1 <bob@remote.test>: no such user"})
    dkim_config = {
        "domains": {"test.example": {"selector": "s1", "key_file": str(key_file(tmp_path))}}
    }
    server, _sink = relaying(script, dkim=dkim_config)
    submit(server, ["bob@remote.test"], b"From: alice@test.example\r\nSubject: out\r\n\r\nhi\r\n")
    (bounce,) = wait_until(lambda: server.messages("alice"), what="the bounce")
    raw = bounce.read_bytes()
    assert raw.startswith(b"Return-Path: <>\nDKIM-Signature: v=1; a=rsa-sha256;")
    assert b"d=test.example; s=s1;" in raw
    asked = []

    def dns(name: bytes, timeout: int = 5) -> str:
        asked.append(name)
        return public_key_record(KEY)

    wire = raw.split(b"\n", 1)[1].replace(b"\n", b"\r\n")  # no Return-Path, CRLF
    assert dkim.verify(wire, dnsfunc=dns)
    assert asked == [b"s1._domainkey.test.example."]
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert b"Action: failed" in raw


MESSAGE_WITH_RETURN_PATHS = (
    b"Return-Path: <evil@x.example>\r\n"
    b"From: alice@test.example\r\n"
    b"return-path :\r\n <folded@x.example>\r\n"
    b"Subject: own return paths\r\n"
    b"\r\n"
    b"Return-Path: <in-the-body@x.example> stays: it is text\r\n"
)


def test_a_clients_return_path_is_removed_locally_and_never_relayed(relaying):
    server, sink = relaying(Script())
    submit(server, ["bob@remote.test", "bob@test.example"], MESSAGE_WITH_RETURN_PATHS)
    (tx,) = wait_until(lambda: sink.completed, what="the sink to receive the message")
    head, _, body = tx.data.partition(b"\r\n\r\n")
    assert b"return-path" not in head.lower()  # ours skipped, the client's removed
    assert b"Subject: own return paths" in head and b"From: alice@test.example" in head
    assert body == b"Return-Path: <in-the-body@x.example> stays: it is text\r\n"
    (local,) = server.messages("bob")
    head, _, body = local.read_bytes().partition(b"\n\n")
    assert head.startswith(b"Return-Path: <alice@test.example>\n")
    assert head.lower().count(b"return-path") == 1  # exactly one: the envelope's
    assert b"folded@x.example" not in head and b"evil@x.example" not in head
    assert body == b"Return-Path: <in-the-body@x.example> stays: it is text\n"


def test_a_return_path_a_filter_writes_is_removed(relaying, tmp_path):
    """A filter's rewrite that adds a `Return-Path:` of its own: the local
    copy keeps only the server's."""
    filter_ = tmp_path / "add-return-path"
    filter_.write_text("#!/bin/sh\nprintf 'Return-Path: <filter@x.example>\\n'\nexec cat\n")
    filter_.chmod(0o755)
    server, _sink = relaying(
        Script(), filters=[{"name": "rp", "command": [str(filter_)], "mail": "all"}]
    )
    submit(server, ["bob@test.example"], b"From: alice@test.example\r\nSubject: f\r\n\r\nhi\r\n")
    (local,) = server.messages("bob")
    head, _, _ = local.read_bytes().partition(b"\n\n")
    assert head.startswith(b"Return-Path: <alice@test.example>\n")
    assert head.lower().count(b"return-path") == 1
    assert b"Subject: f" in head and b"filter@x.example" not in head
