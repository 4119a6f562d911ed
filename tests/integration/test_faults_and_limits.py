"""Storage faults give 4xx and keep nothing; error and recipient limits; split reads."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import wait_until
from tests.integration.wire import Wire


def _transaction(w: Wire, rcpts: list[str], body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> tuple:
    w.expect("MAIL FROM:<carol@remote.example>", 250)
    for rcpt in rcpts:
        w.expect(f"RCPT TO:<{rcpt}@test.example>", 250)
    w.expect("DATA", 354)
    return w.cmd(body + b".")


@pytest.mark.parametrize("order", [["alice", "bob"], ["bob", "alice"]], ids=["second", "first"])
def test_storage_fault_gives_451_and_keeps_nothing(server, order):
    # bob's Maildir cannot be created: a plain file is in the way.
    (server.mail_dir / "bob").write_text("in the way")
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        code, text = _transaction(w, order)
        assert code == 451 and text.startswith("4.3.0"), text
        # The session goes on and delivers where it can.
        code, text = _transaction(w, ["alice"])
        assert code == 250, text
    # Never half-delivered: alice has only the second message.
    (path,) = server.messages("alice")
    assert path.read_bytes().endswith(b"\n\nbody\n")
    assert server.tmp_files() == []
    wait_until(lambda: "result=451" in server.access_log(), what="a 451 in the access log")
    server.logged("delivery failed")
    server.logged("mail_dir/bob")


def test_too_many_errors_disconnects(make_server):
    server = make_server({"limits": {"max_errors": 5}})
    with Wire.connect(server.host, server.port) as w:
        for _ in range(4):
            code, _ = w.cmd("BOGUS")
            assert code == 500
        w.send(b"BOGUS\r\n")
        assert w.reply()[0] == 500
        code, text = w.reply()
        assert code == 421 and text.startswith("4.7.0"), text
        assert w.is_closed()


def test_recipient_limit(make_server):
    server = make_server({"limits": {"max_recipients": 3}})
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        for name in ("r1", "r2", "r3"):
            w.expect(f"RCPT TO:<{name}@test.example>", 250)
        code, text = w.cmd("RCPT TO:<r4@test.example>")
        assert code == 452 and text.startswith("4.5.3"), text
        w.expect("DATA", 354)
        w.expect(b"\r\nthree only\r\n.", 250)
    assert [len(server.messages(n)) for n in ("r1", "r2", "r3", "r4")] == [1, 1, 1, 0]


def test_transaction_sent_one_byte_at_a_time(server):
    script = (
        b"EHLO slow.example\r\n"
        b"MAIL FROM:<carol@remote.example>\r\n"
        b"RCPT TO:<alice@test.example>\r\n"
        b"DATA\r\n"
        b"Subject: bytes\r\n\r\n.stuffed\r\nbare\nlf\r\nend\r\n.\r\n"
        b"QUIT\r\n"
    )
    with Wire.connect(server.host, server.port) as w:
        w.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(script)):
            w.send(script[i : i + 1])
        codes = [w.reply()[0] for _ in range(6)]
        assert codes == [250, 250, 250, 354, 250, 221]
        assert w.is_closed()
    (path,) = server.messages("alice")
    assert path.read_bytes().endswith(b"\n\nstuffed\nbare\nlf\nend\n")


def test_whole_session_pipelined_in_one_write(server):
    script = b"".join(
        [
            b"EHLO fast.example\r\n",
            *(
                b"MAIL FROM:<carol@remote.example>\r\n"
                + f"RCPT TO:<user{i}@test.example>\r\nDATA\r\n\r\nmail {i}\r\n.\r\n".encode()
                for i in range(5)
            ),
            b"QUIT\r\n",
        ]
    )
    with Wire.connect(server.host, server.port) as w:
        w.send(script)
        codes = [w.reply()[0] for _ in range(1 + 5 * 4 + 1)]
        assert codes == [250, *[250, 250, 354, 250] * 5, 221]
    for i in range(5):
        (path,) = server.messages(f"user{i}")
        assert path.read_bytes().endswith(f"\n\nmail {i}\n".encode())


def test_client_gone_right_after_the_end_of_data(server):
    """The client sends the end of data and vanishes: the mail is still stored whole."""
    with Wire.connect(server.host, server.port) as w:
        w.send(
            b"EHLO gone.example\r\nMAIL FROM:<carol@remote.example>\r\n"
            b"RCPT TO:<bob@test.example>\r\nDATA\r\n\r\nlast words\r\n.\r\n"
        )
        w.sock.shutdown(socket.SHUT_WR)
        codes = [w.reply()[0] for _ in range(5)]
        assert codes == [250, 250, 250, 354, 250]
        assert w.is_closed()
    (path,) = server.messages("bob")
    assert path.read_bytes().endswith(b"\n\nlast words\n")
    assert server.tmp_files() == []


def test_vrfy_does_not_enumerate_users_by_default(server):
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        known, _ = w.cmd("VRFY alice")
        unknown, _ = w.cmd("VRFY nobody")
        assert known == unknown == 252


@pytest.mark.parametrize("removed", ["alice", "alice/new", "alice/tmp"])
def test_maildir_removed_while_running_is_made_again(server, removed):
    def send(body: bytes) -> tuple:
        with Wire.connect(server.host, server.port) as w:
            w.expect("EHLO client.example", 250)
            return _transaction(w, ["bob", "alice"] if removed == "alice/new" else ["alice"], body)

    assert send(b"\r\nfirst\r\n")[0] == 250
    shutil.rmtree(server.mail_dir / removed)
    code, text = send(b"\r\nsecond\r\n")
    assert code == 250, text
    bodies = sorted(p.read_bytes().rsplit(b"\n\n", 1)[1] for p in server.messages("alice"))
    # Removing new/ or the whole Maildir took the first message with it.
    assert bodies == ([b"first\n"] if removed == "alice/tmp" else []) + [b"second\n"]
    assert server.tmp_files() == []


# ------------------------------------------------------------- a full disk

MESSAGE = b"Subject: half a megabyte\r\n\r\n" + (b"x" * 76 + b"\r\n") * 6_800  # ~0.5 MB


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs where the server's mail_dir will be (needs root to mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mount_point = tmp_path / "srv0" / "mail_dir"
    mount_point.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_mid_data_is_452_and_the_server_recovers(small_disk, make_server):
    server = make_server()
    assert server.mail_dir == small_disk
    expected_body = MESSAGE.replace(b"\r\n", b"\n")
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        replies = []
        for _ in range(12):  # 3 MB holds five or six of them
            replies.append(_transaction(w, ["alice"], MESSAGE))
            if replies[-1][0] != 250:
                break
        code, text = replies[-1]
        # The message was read to its end, then refused for want of room.
        assert code == 452 and text.startswith("4.3.1"), replies
        assert all(c == 250 for c, _ in replies[:-1]) and len(replies) >= 3, replies
        w.expect("NOOP", 250)  # the session goes on
        # Nothing partial anywhere: every stored message is whole, tmp/ is empty.
        stored = server.messages("alice")
        assert len(stored) == len(replies) - 1
        assert all(p.read_bytes().endswith(expected_body) for p in stored)
        assert server.tmp_files() == []
        # Space comes back (the user fetched the mail): the same session delivers.
        for path in stored:
            path.unlink()
        code, text = _transaction(w, ["alice"], MESSAGE)
        assert code == 250, text
    log = wait_until(lambda: "result=452" in server.access_log() and server.server_log())
    assert " ERROR " in log and "No space left on device" in log
    (path,) = server.messages("alice")
    assert path.read_bytes().endswith(expected_body)


# ------------------------------------------------------- a bug in the code

# Plants a bug in the running server: "NOOP boom" raises inside the core.
BUGGY = """
import sys
from geosmtp.smtp import rules, session
noop = session.SMTPConnection._do_NOOP
def _do_NOOP(self, arg):
    if arg == b"boom":
        raise RuntimeError("a planted bug")
    return noop(self, arg)
session.SMTPConnection.COMMANDS = {**session.SMTPConnection.COMMANDS, "NOOP": rules.Rule(_do_NOOP)}
from geosmtp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_in_a_session_is_421_and_a_logged_traceback(make_server):
    server = make_server(launcher=[sys.executable, "-c", BUGGY])
    with (
        Wire.connect(server.host, server.port) as bystander,
        Wire.connect(server.host, server.port) as victim,
    ):
        bystander.expect("EHLO bystander.example", 250)
        victim.expect("EHLO victim.example", 250)
        victim.expect("MAIL FROM:<carol@remote.example>", 250)
        code, text = victim.cmd("NOOP boom")
        assert code == 421 and text.startswith("4.3.0"), text
        assert victim.is_closed()
        # Every other client is served as before.
        assert _transaction(bystander, ["alice"])[0] == 250
    log = wait_until(
        lambda: "RuntimeError: a planted bug" in server.server_log() and server.server_log()
    )
    assert "internal error" in log and "Traceback" in log
    assert server.process.poll() is None
    assert "failed with RuntimeError" not in server.stderr()  # gevent's own report
    # The transaction it was in has its access-log line.
    wait_until(lambda: "reason=error" in server.access_log(), what="the aborted transaction")
