"""Dot-stuffing, SMTP smuggling, limits, path traversal, vanishing clients, relay."""

from __future__ import annotations

import os
import smtplib
import socket
import struct
from pathlib import Path

import pytest

from tests.conftest import stored_since, wait_until
from tests.integration.wire import Wire


@pytest.fixture
def server(shared_server):
    """The run's shared server: each test sends to mailboxes of its own (the
    ones that need a server to themselves take `make_server`)."""
    return shared_server


def _body_of(raw: bytes) -> bytes:
    return raw.split(b"\n\n", 1)[1]


def _start_data(w: Wire, rcpt: str) -> None:
    w.expect("EHLO client.example", 250)
    w.expect("MAIL FROM:<carol@remote.example>", 250)
    w.expect(f"RCPT TO:<{rcpt}>", 250)
    w.expect("DATA", 354)


def _all_files(root: Path) -> set[Path]:
    return {Path(d) / f for d, _dirs, files in os.walk(root) for f in files} | {
        Path(d) / sub for d, dirs, _files in os.walk(root) for sub in dirs
    }


def test_dot_stuffing_round_trip(server, box):
    body = b".leading dot\r\n..two dots\r\nmiddle . dot\r\n.\tdot tab\r\nend\r\n"
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail(
            "carol@remote.example", [f"{box}@test.example"], b"Subject: dots\r\n\r\n" + body
        )
    (path,) = server.messages(box)
    assert _body_of(path.read_bytes()) == body.replace(b"\r\n", b"\n")


def test_dot_unstuffing_on_the_wire(server, box):
    with Wire.connect(server.host, server.port) as w:
        _start_data(w, f"{box}@test.example")
        w.expect(b"..\r\n...\r\n..x\r\nx.\r\n.", 250)
    (path,) = server.messages(box)
    assert path.read_bytes().endswith(b"\n.\n..\n.x\nx.\n")


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"],
    ids=["LF.LF", "CRLF.LF", "LF.CRLF", "CR.CRLF"],
)
def test_smuggled_message_is_not_split_off(server, fake_end, box):
    before = server.all_messages()
    smuggled = (
        b"MAIL FROM:<mallory@evil.example>\r\n"
        b"RCPT TO:<" + f"{box}2".encode() + b"@test.example>\r\n"
        b"DATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled body\r\n"
    )
    with Wire.connect(server.host, server.port) as w:
        _start_data(w, f"{box}@test.example")
        w.send(b"Subject: real\r\n\r\nreal body" + fake_end + smuggled)
        code, text = w.cmd(b"\r\n.")
        assert code == 250, text
        w.expect("QUIT", 221)
    assert server.messages(f"{box}2") == []
    (path,) = stored_since(server, before)
    assert path.parent.parent.name == box
    raw = path.read_bytes()
    assert b"MAIL FROM:<mallory@evil.example>" in raw  # kept as text of the one message
    assert b"smuggled body" in raw


def test_over_long_command_line_then_session_continues(server, box):
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        code, text = w.cmd(b"NOOP " + b"x" * 2000)
        assert code == 500, text
        # Just over the limit of 512 octets including CRLF.
        code, text = w.cmd(b"NOOP " + b"y" * 506)
        assert code == 500, text
        # Exactly at the limit is accepted.
        w.expect(b"NOOP " + b"z" * 505, 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"\r\nstill works\r\n.", 250)
    assert len(server.messages(box)) == 1


def test_over_long_text_line_rejects_the_message(server, box):
    before = server.all_messages()
    with Wire.connect(server.host, server.port) as w:
        _start_data(w, f"{box}@test.example")
        w.send(b"Subject: long\r\n\r\n" + b"a" * 5000 + b"\r\nafter\r\n")
        code, text = w.cmd(".")
        assert 500 <= code < 600, text
        w.expect("NOOP", 250)  # the session goes on
        w.expect("QUIT", 221)
    assert stored_since(server, before) == []
    wait_until(lambda: server.tmp_files() == [], what="spool removed")


def test_oversize_message_552_and_session_continues(make_server):
    server = make_server({"limits": {"max_message_size": 1000}})
    with Wire.connect(server.host, server.port) as w:
        _start_data(w, "alice@test.example")
        for _ in range(20):
            w.send(b"x" * 70 + b"\r\n")
        code, text = w.cmd(".")
        assert code == 552, text
        assert text.startswith("5.3.4"), text
        # Declared too big up front: refused at MAIL.
        code, text = w.cmd("MAIL FROM:<carol@remote.example> SIZE=5000")
        assert code == 552, text
        w.expect("MAIL FROM:<carol@remote.example> SIZE=300", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"Subject: small\r\n\r\nfits\r\n.", 250)
    (path,) = server.all_messages()
    assert _body_of(path.read_bytes()) == b"fits\n"
    wait_until(lambda: server.tmp_files() == [], what="spool removed")


TRAVERSALS = [
    b"<../../etc@test.example>",
    b"<a/b@test.example>",
    b"<..@test.example>",
    b"<.@test.example>",
    b"<../x@test.example>",
    b'<"a/b"@test.example>',
    b'<"../../etc"@test.example>',
    b'<"/etc/passwd"@test.example>',
    b'<".."@test.example>',
    b'<"a\\/b"@test.example>',
    b"<a\x00b@test.example>",
    b'<"a\x00b"@test.example>',
    b"<a\\b@test.example>",
    b"<%2e%2e@test.example>",
    b"<a\x01b@test.example>",
]


def test_path_traversal_in_rcpt_is_refused(make_server):
    server = make_server()  # alone: every file it makes is counted
    before = _all_files(server.root)
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        for path in TRAVERSALS:
            code, text = w.cmd(b"RCPT TO:" + path)
            assert code in (500, 501, 550), f"{path!r}: {code} {text}"
            if code == 550:
                assert text.startswith("5.1.3"), f"{path!r}: {text}"
        # The session is intact and mail can still go to a real mailbox.
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"\r\nok\r\n.", 250)
    after = _all_files(server.root)
    # A worker still starting when the first one answered makes its queue
    # share's lock file (`.queue/.share-N.lock`) meanwhile: not the client's doing.
    starting = {p for p in after if p.parent == server.mail_dir / ".queue" and p.suffix == ".lock"}
    created = {p for p in after - before - starting if not p.is_relative_to(server.log_dir)}
    assert created == {
        server.mail_dir / "alice",
        *(server.mail_dir / "alice" / sub for sub in ("tmp", "new", "cur")),
        *server.messages("alice"),
    }
    # Nothing next to or above the server root either.
    assert sorted(p.name for p in server.root.parent.iterdir()) == [server.root.name]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_vanishing_mid_data_leaves_nothing(server, how, box):
    before = server.all_messages()
    with Wire.connect(server.host, server.port) as w:
        _start_data(w, f"{box}@test.example")
        w.send(b"Subject: gone\r\n\r\n" + b"partial line\r\n" * 200 + b"no end")
        # The spool file exists while the message arrives...
        wait_until(lambda: server.tmp_files(), what="a spool file")
        if how == "reset":  # RST instead of FIN
            w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # ...and is removed once the server notices the client is gone.
    wait_until(lambda: server.tmp_files() == [], what="spool file removed")
    assert stored_since(server, before) == []
    # The server is still serving.
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("carol@remote.example", [f"{box}2@test.example"], b"\r\nnext\r\n")
    assert len(server.messages(f"{box}2")) == 1


def test_relay_denied_for_foreign_domains(server, box):
    before = server.all_messages()
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<alice@test.example>", 250)
        for rcpt in ("someone@foreign.example", "alice@test.example.evil", "x@[127.0.0.1]"):
            code, text = w.cmd(f"RCPT TO:<{rcpt}>")
            assert (code, text.split()[0]) == (550, "5.7.1"), f"{rcpt}: {code} {text}"
        code, _ = w.cmd("DATA")
        assert code == 503
    assert stored_since(server, before) == []


def test_unknown_recipients_reject(make_server):
    server = make_server({"unknown_recipients": "reject"})
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        code, text = w.cmd("RCPT TO:<nobody@test.example>")
        assert (code, text.split()[0]) == (550, "5.1.1"), text
        w.expect("RCPT TO:<postmaster@test.example>", 250)
        w.expect("RCPT TO:<Postmaster>", 250)
        w.expect("RCPT TO:<bob@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"\r\nfor postmaster and bob\r\n.", 250)
    assert len(server.messages("postmaster")) == 1
    assert len(server.messages("bob")) == 1
    assert not (server.mail_dir / "nobody").exists()


def test_null_sender_source_route_and_8bit_body_stored_intact(server, box):
    body = "Subject: h\xe9\r\n\r\nh\xe9llo \x00 nul \x7f del\r\n".encode("latin-1")
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO [127.0.0.1]", 250)
        w.expect("MAIL FROM:<> BODY=8BITMIME", 250)
        w.expect(f"RCPT TO:<@relay.example,@b.example:{box.upper()}@TEST.example>", 250)
        w.expect("DATA", 354)
        w.expect(body + b".", 250)
    (path,) = server.messages(box)
    raw = path.read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")
    assert raw.endswith(body.replace(b"\r\n", b"\n"))
