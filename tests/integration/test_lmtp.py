"""LMTP in (RFC 2033, issue 21): another MTA hands geosmtp mail for its
Maildirs, on TCP or a UNIX socket, and it is read back through geosmtp's POP3.

One geosmtp serves the module: an mx listener (the start probe), an lmtp
listener on TCP, one on a UNIX socket (mode 0600) and POP3. `trusted_networks`
is 127.0.0.1/32, so a client from 127.0.0.2 (loopback, but not trusted) is
one the TCP lmtp listener must turn away. The clients are Python's
`smtplib.LMTP` (it reads one reply after DATA, so the per-recipient replies
after the first are read with `getreply()`) and a private Postfix whose
`virtual_transport` is `lmtp:` to geosmtp.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import smtplib
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, free_port, start_server, users, wait_until
from tests.integration.postfix import POSTFIX_HOST, PrivatePostfix, private_postfix

PASSWORD = "lmtp-test-pw"
#: geosmtp's users; Postfix's vmailbox knows bob and carol of remote.test.
USERS = ("alice", "bob", "carol", "dave")


def message(subject: str) -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@test.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.org>\r\n\r\nbody of {subject}\r\n.leading dot\r\n"
    ).encode()


@pytest.fixture(scope="module")
def lmtp_server(make_module_server) -> RunningServer:
    server = make_module_server(
        {
            # remote.test too: the domain the private Postfix hands over by LMTP.
            "domains": ["test.example", "remote.test"],
            "listeners": [
                {"address": "127.0.0.1", "port": free_port(), "role": "mx"},
                {"address": "127.0.0.1", "port": free_port(), "role": "lmtp"},
                {"role": "lmtp", "path": "lmtp.sock", "mode": 0o600},
                {"address": "127.0.0.1", "port": free_port(), "role": "pop3"},
            ],
            "users": users(**dict.fromkeys(USERS, PASSWORD)),
            "unknown_recipients": "reject",
            "auth": {"allow_plaintext": True},
            "trusted_networks": ["127.0.0.1/32"],
            # A listening set per worker: the one UNIX socket is in each.
            "workers": 2,
            "reuse_port": True,
        }
    )
    wait_until(lambda: (server.root / "lmtp.sock").exists(), what="the LMTP socket")
    return server


def pop3_messages(server: RunningServer, user: str) -> list[bytes]:
    """Every message in `user`'s box, as geosmtp's POP3 sends it."""
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        return [b"\r\n".join(client.retr(i)[1]) for i in range(1, count + 1)]
    finally:
        client.quit()


def access_line(server: RunningServer, text: str) -> str:
    """The access-log line with `text` in it, once it is written."""
    return wait_until(
        lambda: next((li for li in server.access_log().splitlines() if text in li), None),
        what=f"an access-log line with {text!r}",
    )


def send(client: smtplib.LMTP, recipients: list[str], body: bytes) -> list[tuple[int, bytes]]:
    """One transaction; the replies after the message, one per accepted recipient."""
    client.ehlo_or_helo_if_needed()  # LHLO, for smtplib.LMTP
    assert client.mail("sender@example.org")[0] == 250
    accepted = [r for r in recipients if client.rcpt(r)[0] == 250]
    replies = [client.data(body)]
    replies += [client.getreply() for _ in accepted[1:]]
    return replies


def test_lmtp_over_tcp_delivers_to_each_recipient(lmtp_server: RunningServer) -> None:
    body = message("tcp")
    client = smtplib.LMTP(timeout=10)
    with client:
        code, banner = client.connect("127.0.0.1", lmtp_server.ports["lmtp"])
        assert code == 220 and banner.endswith(b" LMTP geosmtp")
        assert client.ehlo("mta.test.example")[0] == 250  # smtplib.LMTP sends LHLO
        assert (
            "pipelining" in client.esmtp_features and "enhancedstatuscodes" in client.esmtp_features
        )
        assert "starttls" not in client.esmtp_features and "auth" not in client.esmtp_features
        assert client.docmd("EHLO", "mta.test.example")[0] == 500  # LHLO only
        rcpts = ["alice@test.example", "nobody@test.example", "bob@test.example"]
        assert client.mail("sender@example.org")[0] == 250
        assert client.rcpt(rcpts[0])[0] == 250
        assert client.rcpt(rcpts[1])[:1] == (550,)  # an unknown user, as in SMTP
        assert client.rcpt("someone@elsewhere.example") == (
            550,
            b"5.1.1 Recipient address rejected: not a local mailbox",
        )
        assert client.rcpt(rcpts[2])[0] == 250
        first = client.data(body)
        second = client.getreply()
        assert first[0] == 250 and b"<alice@test.example>" in first[1]
        assert second[0] == 250 and b"<bob@test.example>" in second[1]
        assert client.noop()[0] == 250  # nothing else was waiting in the stream
    for user in ("alice", "bob"):
        stored = pop3_messages(lmtp_server, user)
        assert len(stored) == 1
        assert stored[0].endswith(b"\r\n\r\nbody of tcp\r\n.leading dot")
        assert b"Subject: tcp" in stored[0]
        assert b" with LMTP id " in stored[0]  # RFC 3848's keyword in Received:
    line = access_line(lmtp_server, "to=<alice@test.example>,<bob@test.example>")
    assert "proto=lmtp" in line and "result=250" in line and "refused=" in line


def test_lmtp_over_a_unix_socket(lmtp_server: RunningServer) -> None:
    path = lmtp_server.root / "lmtp.sock"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with smtplib.LMTP(str(path), timeout=10) as client:
        replies = send(client, ["carol@test.example", "dave@test.example"], message("unix"))
    assert [code for code, _ in replies] == [250, 250]
    assert b"<carol@test.example>" in replies[0][1] and b"<dave@test.example>" in replies[1][1]
    for user in ("carol", "dave"):
        assert [m for m in pop3_messages(lmtp_server, user) if b"Subject: unix" in m]
    line = access_line(lmtp_server, "<carol@test.example>,<dave@test.example>")
    assert "client=unix" in line and "proto=lmtp" in line


def test_an_untrusted_peer_is_refused(lmtp_server: RunningServer) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind(("127.0.0.2", 0))  # loopback, yet not in trusted_networks
    try:
        sock.connect(("127.0.0.1", lmtp_server.ports["lmtp"]))
        data = b""
        while chunk := sock.recv(4096):  # until the server closes
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"421 4.7.0 ") and data.count(b"\r\n") == 1
    log = lmtp_server.logged("[127.0.0.2] refused on the lmtp listener")
    # The session ended cleanly (its outcome is one the metrics know), not in
    # a traceback from the end of the session.
    session = re.search(r"session (\w+): \[127\.0\.0\.2\] refused", log)[1]  # type: ignore[index]
    lmtp_server.logged(f"session {session} closed after")


def test_a_failing_mailbox_fails_its_recipient_alone(lmtp_server: RunningServer) -> None:
    # bob's Maildir cannot take a message for a while: its new/ is a file.
    broken = lmtp_server.mail_dir / "bob" / "new"
    before_alice = len(pop3_messages(lmtp_server, "alice"))
    before_bob = len(pop3_messages(lmtp_server, "bob"))
    saved = lmtp_server.mail_dir / "bob" / "new.saved"
    broken.rename(saved)
    broken.write_text("not a folder")
    try:
        with smtplib.LMTP("127.0.0.1", lmtp_server.ports["lmtp"], timeout=10) as client:
            replies = send(client, ["alice@test.example", "bob@test.example"], message("failing"))
    finally:
        broken.unlink()
        saved.rename(broken)
    assert replies[0][0] == 250
    assert replies[1][0] == 451 and replies[1][1].startswith(b"4.3.0 ")
    assert len(pop3_messages(lmtp_server, "alice")) == before_alice + 1
    assert len(pop3_messages(lmtp_server, "bob")) == before_bob  # nothing half-made
    line = access_line(lmtp_server, "failed=<bob@test.example>:451")
    assert "result=250" in line and "proto=lmtp" in line
    # The client tries bob again; alice keeps her one copy.
    with smtplib.LMTP("127.0.0.1", lmtp_server.ports["lmtp"], timeout=10) as client:
        assert send(client, ["bob@test.example"], message("failing"))[0][0] == 250
    assert len(pop3_messages(lmtp_server, "bob")) == before_bob + 1
    assert len(pop3_messages(lmtp_server, "alice")) == before_alice + 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it starts geosmtp with user: nobody")
def test_the_socket_belongs_to_the_workers_account_and_goes_at_the_stop() -> None:
    """Started as root with `user: nobody`: the master makes the socket (in a
    folder it makes), owned by nobody with the default mode 0660; a worker
    serving as nobody delivers through it; the stop removes it."""
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="geosmtp-lmtp-", dir="/tmp"))
    root.chmod(0o755)  # nobody must reach mail_dir (pytest's tmp_path is root's alone)
    server = start_server(
        root / "srv",
        {
            "user": "nobody",
            "workers": 1,
            "listeners": [
                {"address": "127.0.0.1", "port": free_port(), "role": "mx"},
                {"role": "lmtp", "path": "run/lmtp.sock"},
            ],
        },
    )
    try:
        path = server.root / "run" / "lmtp.sock"
        wait_until(path.exists, what="the LMTP socket")
        info = os.stat(path)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            nobody.pw_uid,
            nobody.pw_gid,
            0o660,
        )
        with smtplib.LMTP(str(path), timeout=10) as client:
            assert send(client, ["alice@test.example"], message("nobody"))[0][0] == 250
        (stored,) = server.messages("alice")
        assert stored.stat().st_uid == nobody.pw_uid and b"body of nobody" in stored.read_bytes()
        assert server.stop() == 0
        assert not path.exists()
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------ Postfix


@pytest.fixture(scope="module")
def postfix(lmtp_server: RunningServer) -> Iterator[PrivatePostfix]:
    """A private Postfix delivering remote.test (its virtual domain) by LMTP to
    geosmtp's TCP lmtp listener: an IP literal, so no DNS question is asked."""
    port = lmtp_server.ports["lmtp"]
    with private_postfix(
        {"virtual_transport": f"lmtp:inet:[127.0.0.1]:{port}"},
        services="lmtp      unix  -       -       n       -       -       lmtp\n",
    ) as server:
        yield server


def test_postfix_hands_mail_over_lmtp(lmtp_server: RunningServer, postfix: PrivatePostfix) -> None:
    body = message("via-postfix")
    with smtplib.SMTP(POSTFIX_HOST, postfix.port, timeout=10) as client:
        refused = client.sendmail(
            "sender@example.org", ["bob@remote.test", "carol@remote.test"], body
        )
    assert refused == {}

    def arrived() -> bool:
        return all(
            any(b"Subject: via-postfix" in m for m in pop3_messages(lmtp_server, user))
            for user in ("bob", "carol")
        )

    wait_until(arrived, timeout=15, interval=0.1, what="Postfix's LMTP delivery")
    for user in ("bob", "carol"):
        (stored,) = [m for m in pop3_messages(lmtp_server, user) if b"via-postfix" in m]
        assert stored.endswith(b"\r\n\r\nbody of via-postfix\r\n.leading dot")
    assert postfix.delivered() == []  # Postfix kept no copy in its own Maildirs
    wait_until(
        lambda: postfix.maillog().count("relay=127.0.0.1") >= 2,
        what="Postfix to log the LMTP delivery",
    )
    assert postfix.maillog().count("status=sent") >= 2
    line = access_line(lmtp_server, "<bob@remote.test>,<carol@remote.test>")
    assert "proto=lmtp" in line and "result=250" in line
