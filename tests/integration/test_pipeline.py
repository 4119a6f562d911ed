"""The spool and the pipeline through the real server: where messages wait,
what happens when the spool is elsewhere, and what a crash left behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from geosmtp.storage import Maildir, uid_for
from tests.conftest import wait_until
from tests.integration.wire import Wire

BODY = b"Subject: spooled\r\n\r\nbody\r\n"


def _send(server, rcpts=("alice",)) -> None:
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        for rcpt in rcpts:
            w.expect(f"RCPT TO:<{rcpt}@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(BODY + b".", 250)


def test_a_message_waits_in_the_spool_not_in_a_mailbox(make_server):
    server = make_server({"spool_dir": "spool"})
    spool = server.root / "spool"
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("RCPT TO:<bob@test.example>", 250)
        w.expect("DATA", 354)
        w.send(b"Subject: half\r\n\r\n" + (b"x" * 70 + b"\r\n") * 1000)  # past 64 KiB
        (waiting,) = wait_until(lambda: list(spool.iterdir()), what="the spool file")
        assert list(server.mail_dir.glob("*/tmp/*")) == []  # no mailbox's tmp/ holds it
        w.expect(b".", 250)
    assert list(spool.iterdir()) == []
    alice, bob = server.messages("alice")[0], server.messages("bob")[0]
    # The spool's name is the base of the name in new/ (Dovecot's ,S= and ,W= follow).
    assert alice.name == bob.name
    assert alice.name.startswith(waiting.name + ",S=")
    assert os.stat(alice).st_ino == os.stat(bob).st_ino  # one file, linked twice


def test_a_delivered_name_carries_its_size_and_its_pop3_size(server):
    """`new/<base>,S=<octets on disk>,W=<octets with CRLF line ends>` (RFC 1939 §11),
    for CRLF text, a bare LF, a lone CR and lines of dots (stuffed on the wire)."""
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(
            b"Subject: sizes\r\n\r\ncrlf line\r\nbare lf\na lone\rcr\r\n..\r\n....\r\nend\r\n.",
            250,
        )
    (path,) = server.messages("alice")
    data = path.read_bytes()
    assert data.endswith(b"Subject: sizes\n\ncrlf line\nbare lf\na lone\rcr\n.\n...\nend\n")
    _, size, vsize = re.fullmatch(r"([^,:]+),S=(\d+),W=(\d+)", path.name).groups()
    assert int(size) == len(data) == os.stat(path).st_size
    # What a POP3 server sends: every LF not after a CR becomes CRLF, a lone CR stays.
    assert int(vsize) == len(re.sub(rb"(?<!\r)\n", b"\r\n", data))
    assert int(vsize) - int(size) == data.count(b"\n") - data.count(b"\r\n")
    (listed,) = Maildir(server.mail_dir / "alice").list()
    assert (listed.size, listed.vsize, uid_for(listed)) == (int(size), int(vsize), path.name)


def test_a_spool_on_another_filesystem_is_copied_and_said(make_server, tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs for the spool needs root and mount(8)")
    spool = tmp_path / "other-fs"
    spool.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        server = make_server({"spool_dir": str(spool)})
        _send(server, ("alice", "bob"))
        alice, bob = server.messages("alice")[0], server.messages("bob")[0]
        assert alice.read_bytes().endswith(BODY.replace(b"\r\n", b"\n"))
        assert bob.read_bytes() == alice.read_bytes()
        assert os.stat(alice).st_ino != os.stat(bob).st_ino  # copies, not links
        data = alice.read_bytes()  # LF line ends only: W= is the size plus one per line
        vsize = len(data) + data.count(b"\n")
        assert re.fullmatch(rf"[^,:]+,S={len(data)},W={vsize}", alice.name)
        assert bob.name == alice.name  # named as a link would be
        assert "is not on the filesystem of mail_dir" in server.server_log()
        assert list(spool.iterdir()) == [] and server.tmp_files() == []
        server.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_what_a_crash_left_in_the_spool_is_removed_at_start(make_server, tmp_path):
    root = tmp_path / "srv0"
    spool = root / "mail_dir" / ".spool"
    spool.mkdir(parents=True)
    old, recent = spool / "1.M1P1Q1.crashed", spool / "2.M2P2Q2.recent"
    old.write_bytes(b"never acknowledged")
    recent.write_bytes(b"maybe another process's")
    long_ago = time.time() - 37 * 3600
    os.utime(old, (long_ago, long_ago))
    server = make_server()
    assert server.root == root
    assert sorted(p.name for p in spool.iterdir()) == [recent.name]
    server.logged("removed 1 stale spool files")
    _send(server)
    assert len(server.messages("alice")) == 1
