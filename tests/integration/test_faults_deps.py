"""Faults of what geosmtp depends on: a full disk under the queue and under the
logs, DNS that fails, a next hop that stalls in the middle of DATA, and a
Maildir that became read-only. Each through the real server (`geosmtp -c`)
and real clients, on loopback only.

The rule every test holds the server to: a `250` means the mail is stored; a
fault gives a 4xx (never a false `250`, never a `5xx` or a bounce for a fault
that is ours or passing); nothing acknowledged is lost, nothing is delivered
twice, nothing partial is left; and mail flows again once the fault is gone.

The disk faults mount small tmpfs file systems, which needs root (as the CI
runs); elsewhere those tests are skipped with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import os
import poplib
import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import child_pids, listeners, users, wait_until
from tests.integration.dns_server import dns_server, flaky_nameserver, remote_mx
from tests.integration.smtp_sink import Script, Sink, free_port_on
from tests.integration.test_access_log import parse
from tests.integration.wire import Wire

PASSWORD = "deps-test-pw"
MX = "127.0.0.2"
#: About half a megabyte: a 3 MB tmpfs holds five or so.
BIG = b"Subject: half a megabyte\r\n\r\n" + (b"y" * 76 + b"\r\n") * 6_800


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mount_point` (made first); unmounted at the end."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path, name: str = "filler") -> Path:
    """Write a file in `folder` until its file system has no room left at all."""
    path = folder / name
    chunk = b"\0" * 65536
    with open(path, "ab", buffering=0) as f:
        for _ in range(100_000):  # bounded: 6 GB
            try:
                f.write(chunk)
            except OSError:
                break
        for _ in range(16):  # the last pages, smaller than a chunk
            try:
                f.write(b"\0" * 4096)
            except OSError:
                break
    return path


def plain_auth(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def send(w: Wire, rcpts: list[str], body: bytes) -> tuple[int, str]:
    w.expect("MAIL FROM:<alice@test.example>", 250)
    for rcpt in rcpts:
        w.expect(f"RCPT TO:<{rcpt}>", 250)
    w.expect("DATA", 354)
    return w.cmd(body + b".")


def queue_files(server) -> tuple[list[Path], list[Path]]:  # type: ignore[no-untyped-def]
    """The queue's records and message files."""
    queue = server.mail_dir / ".queue"
    return sorted((queue / "records").glob("*")), sorted((queue / "messages").glob("*"))


def attempts(server, rcpt: str) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    """The queue's access-log lines for `rcpt` (a transaction's own have a session=)."""
    return [
        parse(line)
        for line in server.access_log().splitlines()
        if f" to=<{rcpt}> " in line and " session=" not in line
    ]


@pytest.fixture
def relay(make_server, tmp_path):
    """`start(mx_port, dns=..., **relay)`: a geosmtp that relays remote.test to
    127.0.0.2:`mx_port` (a sink the test starts when it wants the MX up),
    looking the MX up in a private dnsmasq (or the `dns:` section given)."""
    with contextlib.ExitStack() as stack:

        def start(port: int, dns: dict | None = None, **relay):  # type: ignore[no-untyped-def]
            if dns is None:
                dns = stack.enter_context(dns_server(remote_mx(MX), tmp_path / "dns")).config()
            config = {
                "listeners": listeners("submission"),
                "users": users(alice=PASSWORD),
                "auth": {"allow_plaintext": True},
                "relay": {"mx_port": port, "retry_schedule": [0.5], **relay},
                "dns": dns,
            }
            return make_server(config)

        yield start


def submit(server, rcpts: list[str], body: bytes) -> None:  # type: ignore[no-untyped-def]
    with smtplib.SMTP(server.host, server.ports["submission"], timeout=10) as client:
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@test.example", rcpts, body) == {}


# ------------------------------------------------------- the queue's disk full


def test_queue_disk_full_is_452_and_the_queue_keeps_every_message(tmp_path, relay):
    """The spool and the queue on a full 3 MB tmpfs, the MX down: a relayed
    message that does not fit gets 452 4.3.1 and leaves nothing; the runner,
    unable to write its records after failed attempts, keeps every message;
    with room again the session delivers, and once the MX is up each message
    arrives exactly once."""
    disk = tmp_path / "srv0" / "mail_dir"
    with tmpfs(disk, "3m"):
        port = free_port_on(MX)
        server = relay(port)
        assert server.mail_dir == disk
        room = fill(disk, "room")  # all of it but 1.2 MB: given back in the middle
        os.truncate(room, room.stat().st_size - 1_200_000)
        with Wire.connect(server.host, server.ports["submission"]) as w:
            w.expect("EHLO client.example", 250)
            w.expect(plain_auth("alice", PASSWORD), 235)
            replies = []
            for n in range(8):  # 1.2 MB holds two
                replies.append(send(w, ["bob@remote.test"], BIG + f"{n}\r\n".encode()))
                if replies[-1][0] != 250:
                    break
            code, text = replies[-1]
            assert code == 452 and text.startswith("4.3.1"), replies
            assert [c for c, _ in replies[:-1]] == [250] * (len(replies) - 1), replies
            assert len(replies) >= 2, replies
            w.expect("NOOP", 250)  # read to its end: the session goes on
            # Nothing partial: one record and one message file per 250, no spool file.
            records, messages = queue_files(server)
            assert len(records) == len(messages) == len(replies) - 1
            assert all(p.suffix == ".json" for p in records)
            assert server.tmp_files() == []
            # Not a byte left: the runner's attempts (the MX is down) cannot
            # write their records; each message stays queued, in memory and on disk.
            full = fill(disk)
            wait_until(
                lambda: "cannot save its record" in server.server_log(),
                timeout=10,
                what="an attempt that could not save its record",
            )
            server.logged("No space left on device")
            assert "unhandled error" not in server.server_log()
            assert queue_files(server)[0] == records
            # Room comes back: the same session sends again.
            room.unlink()
            full.unlink()
            code, text = send(w, ["bob@remote.test"], BIG + b"last\r\n")
            assert code == 250, text
        accepted = len(replies)  # every 250, and the last one
        assert server.process.poll() is None
        with Sink(Script(), address=MX, port=port) as sink:
            wait_until(
                lambda: len(sink.completed) >= accepted and not queue_files(server)[0],
                timeout=15,
                what="every queued message delivered",
            )
            ends = sorted(t.data.rsplit(b"\r\n", 2)[-2] for t in sink.completed)
            assert all(len(t.data) > len(BIG) for t in sink.completed)  # each one whole
        assert ends == sorted([f"{n}".encode() for n in range(accepted - 1)] + [b"last"])
        assert server.messages("alice") == []  # no bounce, no delay notice
        assert queue_files(server) == ([], [])
        log = server.access_log()
        assert "result=452" in log and "outcome=bounced" not in log


def test_a_bounce_that_cannot_be_written_keeps_the_message_queued(tmp_path, relay):
    """The MX refuses the recipient (550) while the disk is full: the bounce
    cannot be stored, so the message is not given up (it would be lost, its
    sender never told): it stays queued, a log line says why, and once there
    is room the bounce reaches the sender, once."""
    disk = tmp_path / "srv0" / "mail_dir"
    with tmpfs(disk, "2m"):
        port = free_port_on(MX)
        server = relay(port)
        submit(server, ["bob@remote.test"], b"Subject: to bounce\r\n\r\nhello\r\n")
        (record,), _ = queue_files(server)
        full = fill(disk)
        refuse = Script(rcpt_replies={"bob@remote.test": "550 5.1.1 <bob@remote.test>: no"})
        with Sink(refuse, address=MX, port=port) as sink:
            wait_until(lambda: len(sink.transactions) >= 2, timeout=10, what="two refusals")
            assert record.exists()
            assert server.messages("alice") == []
            log = server.server_log()
            assert "could not store the failed report to <alice@test.example>" in log
            assert "No space left on device" in log
            assert "<bob@remote.test> deferred, not given up" in log
            assert "its bounce could not be stored" in server.access_log()
            full.unlink()
            (bounce,) = wait_until(lambda: server.messages("alice"), what="the bounce")
            wait_until(lambda: not queue_files(server)[0], what="the queue to empty")
            assert b"5.1.1" in bounce.read_bytes()
        assert server.process.poll() is None
        assert len(server.messages("alice")) == 1
        assert server.tmp_files() == []


# --------------------------------------------------------- the logs' disk full


def test_a_full_log_disk_neither_stops_mail_nor_fakes_a_250(tmp_path, make_server):
    """logs/ on a full 1 MB tmpfs: every 250 is a stored message, a storage
    fault is still a 451, POP3 works, the server runs on; once there is room
    the log lines come again."""
    logs = tmp_path / "srv0" / "logs"
    with tmpfs(logs, "1m"):
        server = make_server(
            {
                "listeners": listeners("mx", "pop3"),
                "users": users(alice="pw", bob=None),
                "auth": {"allow_plaintext": True},
            }
        )
        assert server.log_dir == logs
        started = wait_until(lambda: re.search(r" workers=(\d+) ", server.server_log()))
        workers = wait_until(
            lambda: (
                (pids := child_pids(server.process.pid)) and len(pids) == int(started[1]) and pids
            ),
            what="every worker",
        )
        full = fill(logs)
        stored_before = len(server.messages("alice"))
        (server.mail_dir / "bob").write_text("in the way")  # bob's Maildir cannot be made
        with Wire.connect(server.host, server.port) as w:
            w.expect("EHLO client.example", 250)
            for n in range(20):
                code, text = send(w, ["alice@test.example"], f"\r\nm{n}\r\n".encode())
                assert code == 250, text
            code, text = send(w, ["alice@test.example", "bob@test.example"], b"\r\nboth\r\n")
            assert code == 451 and text.startswith("4.3.0"), text  # not a false 250
            w.expect("NOOP", 250)
        stored = server.messages("alice")
        assert len(stored) == stored_before + 20
        assert sorted(p.read_bytes().rsplit(b"\n", 2)[-2] for p in stored) == sorted(
            f"m{n}".encode() for n in range(20)
        )
        pop = poplib.POP3(server.host, server.ports["pop3"], timeout=10)
        try:
            pop.user("alice")
            pop.pass_("pw")
            assert pop.stat()[0] == 20
            assert pop.retr(1)[1][-1].startswith(b"m")
        finally:
            pop.quit()
        # The log writes did fail (loguru says so on stderr), and nothing stopped.
        wait_until(lambda: "Logging error" in server.stderr(), what="a failed log write")
        assert server.process.poll() is None
        assert child_pids(server.process.pid) == workers
        # Room again: the lines come again.
        size = (logs / "log.txt").stat().st_size
        full.unlink()
        with Wire.connect(server.host, server.port) as w:
            w.expect("EHLO client.example", 250)
            code, text = send(w, ["alice@test.example"], b"Subject: again\r\n\r\nagain\r\n")
            assert code == 250
        queue_id = text.split()[-1]
        wait_until(lambda: queue_id in server.access_log(), what="the access log to resume")
        wait_until(lambda: (logs / "log.txt").stat().st_size > size, what="log.txt to resume")
        assert server.process.poll() is None
        assert child_pids(server.process.pid) == workers


# ------------------------------------------------------------- DNS failing


@pytest.mark.parametrize("failure", ["servfail", "timeout"])
def test_dns_failing_defers_and_delivers_once_it_answers(tmp_path, relay, failure):
    """The MX lookup gets SERVFAIL or no answer: deferred (4.4.3), never
    bounced, retried; delivered once the nameserver answers again."""
    port = free_port_on(MX)
    with (
        dns_server(remote_mx(MX), tmp_path / "dns") as real,
        flaky_nameserver(real, failure) as flaky,
        Sink(Script(), address=MX, port=port) as sink,
    ):
        server = relay(port, dns={"nameservers": [flaky.nameserver], "timeout": 0.5})
        submit(server, ["bob@remote.test"], b"Subject: dns\r\n\r\nlooked up\r\n")
        wait_until(lambda: len(attempts(server, "bob@remote.test")) >= 2, what="two attempts")
        for line in attempts(server, "bob@remote.test"):
            assert (line["outcome"], line["status"]) == ("deferred", "4.4.3"), line
            assert ("SERVFAIL" if failure == "servfail" else "timed out") in line["reason"]
        assert sink.connections == 0
        assert queue_files(server)[0]
        flaky.healthy.set()
        (tx,) = wait_until(lambda: sink.completed, what="the delivery")
        wait_until(lambda: not queue_files(server)[0], what="the queue to empty")
        assert tx.data.endswith(b"\r\nlooked up\r\n")
        assert len(sink.completed) == 1
    assert server.messages("alice") == []  # no bounce
    assert "outcome=bounced" not in server.access_log()


# ---------------------------------------------- the next hop stalls mid-DATA


def test_a_hop_stalling_mid_data_times_out_defers_and_delivers_once(relay):
    """The MX takes the envelope, then stops reading in the middle of the
    message: `relay.timeouts.data_block` fires, the attempt is deferred, the
    connection closed; once the MX behaves the message arrives exactly once."""
    port = free_port_on(MX)
    body = b"Subject: large\r\n\r\n" + (b"z" * 998 + b"\r\n") * 4000 + b"end\r\n"  # 4 MB
    stall = Script(stall_in_data_after=100_000)
    with Sink(stall, address=MX, port=port) as sink:
        server = relay(port, timeouts={"data_block": 1, "data_end": 3, "command": 3})
        submit(server, ["bob@remote.test"], body)
        (line,) = wait_until(lambda: attempts(server, "bob@remote.test"), timeout=15)
        assert (line["outcome"], line["status"]) == ("deferred", "4.4.2"), line
        assert "timed out while sending the message" in line["reason"], line
        assert server.messages("alice") == []  # deferred, not bounced
        sink.script = Script()  # the next connections are served
        sink.unstall.set()
        wait_until(lambda: sink.peer_closed == 1, what="geosmtp to close the stalled connection")
        (tx,) = wait_until(lambda: sink.completed, timeout=15, what="the delivery")
        wait_until(lambda: not queue_files(server)[0], what="the queue to empty")
        assert tx.data.endswith(b"\r\nend\r\n") and len(tx.data) > 4_000_000
        assert len(sink.completed) == 1
        assert [t.complete for t in sink.transactions] == [False, True]
    assert server.messages("alice") == []
    assert "outcome=bounced" not in server.access_log()


# --------------------------------------------- a Maildir that became read-only


def test_a_maildir_made_read_only_is_451_logged_and_recovers(tmp_path, make_server):
    """alice's Maildir is a tmpfs remounted read-only while the server runs
    (root writes through any mode bits; a read-only mount it cannot): 4xx,
    a log line naming the problem, nothing partial; writable again: 250."""
    box = tmp_path / "srv0" / "mail_dir" / "alice"
    with tmpfs(box, "1m"):
        server = make_server()

        def transaction(body: bytes) -> tuple[int, str]:
            with Wire.connect(server.host, server.port) as w:
                w.expect("EHLO client.example", 250)
                w.expect("MAIL FROM:<carol@remote.example>", 250)
                w.expect("RCPT TO:<alice@test.example>", 250)
                w.expect("DATA", 354)
                return w.cmd(body + b".")

        def remount(mode: str) -> None:
            done = subprocess.run(
                ["mount", "-o", f"remount,{mode}", str(box)], capture_output=True, text=True
            )
            if done.returncode != 0:
                pytest.skip(f"cannot remount a tmpfs {mode} here: {done.stderr.strip()}")

        assert transaction(b"\r\nfirst\r\n")[0] == 250
        remount("ro")
        try:
            code, text = transaction(b"\r\nsecond\r\n")
            assert 400 <= code < 500, (code, text)
            assert text.startswith("4.3."), text
            log = wait_until(
                lambda: "Read-only file system" in server.server_log() and server.server_log()
            )
            assert "mail_dir/alice" in log
            assert "unhandled error" not in log and "Traceback" not in log  # an expected fault
            assert server.tmp_files() == []
        finally:
            remount("rw")
        code, text = transaction(b"\r\nthird\r\n")
        assert code == 250, text
        bodies = sorted(p.read_bytes().rsplit(b"\n\n", 1)[1] for p in server.messages("alice"))
        assert bodies == [b"first\n", b"third\n"]
        assert server.tmp_files() == []
        assert server.process.poll() is None
