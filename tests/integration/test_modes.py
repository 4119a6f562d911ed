"""The modes of what a running server writes (geosmtp/storage/modes.py): a mail
reader in the server's group (Dovecot, mutt) may read, flag and delete mail;
the spool, the queue and the token stay the server's; others get nothing."""

from __future__ import annotations

import json
import os
import smtplib
from pathlib import Path

import pytest

from geosmtp.storage.modes import MAIL_ROOT_MODE, make_folder
from tests.conftest import free_port, start_server, wait_until

MESSAGE = "From: carol@remote.example\r\nSubject: modes\r\n\r\nfor the group\r\n"


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


def serve_and_deliver(root: Path, umask: int):  # type: ignore[no-untyped-def]
    """A server started under `umask`, holding a message for alice in her
    Maildir and one for a remote recipient in the queue (its MX lookup goes to a
    dead port, so it waits there for its retry)."""
    old = os.umask(umask)  # the server process inherits it
    try:
        server = start_server(
            root,
            {
                "trusted_networks": ["127.0.0.0/8"],
                "admin": {"enabled": True, "port": free_port(), "token_file": "admin.token"},
            },
        )
    finally:
        os.umask(old)
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("carol@remote.example", ["alice@test.example"], MESSAGE)
        client.sendmail("carol@test.example", ["dave@elsewhere.example"], MESSAGE)
    wait_until(lambda: server.messages("alice"), what="alice's message")
    queue = server.mail_dir / ".queue"
    wait_until(lambda: list((queue / "records").glob("*.json")), what="the queue record")
    wait_until(lambda: "result=250" in server.access_log(), what="the access log")
    return server


@pytest.fixture
def stop_later():  # type: ignore[no-untyped-def]
    servers = []
    yield servers.append
    for server in servers:
        server.stop()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_what_the_server_writes_has_its_mode_whatever_the_umask(tmp_path, umask, stop_later):
    server = serve_and_deliver(tmp_path / "srv", umask)
    stop_later(server)
    alice = server.mail_dir / "alice"
    for folder in (alice, alice / "tmp", alice / "new", alice / "cur"):
        assert mode(folder) == 0o770, folder
    (message,) = server.messages("alice")
    assert mode(message) == 0o640
    assert mode(server.mail_dir / ".spool") == 0o700
    queue = server.mail_dir / ".queue"
    for folder in (queue, queue / "messages", queue / "records", queue / "quarantine"):
        assert mode(folder) == 0o700, folder
    (record,) = (queue / "records").glob("*.json")
    assert mode(record) == 0o600
    (queued,) = (queue / "messages").iterdir()
    assert mode(queued) == 0o640  # the spool file's inode: private by its 0700 folders
    assert {p.name: mode(p) for p in server.log_dir.iterdir()} == {
        "log.txt": 0o640,
        "access.log": 0o640,
    }
    assert mode(server.root / "admin.token") == 0o600


def test_the_folders_the_cli_makes_are_open_to_the_group(tmp_path, stop_later):
    server = serve_and_deliver(tmp_path / "srv", 0o022)
    stop_later(server)
    assert (mode(server.mail_dir), mode(server.log_dir)) == (0o750, 0o750)


def _as_user(uid: int, gid: int, mail_dir: Path, work) -> dict:  # type: ignore[no-untyped-def]
    """Run `work(mail_dir_fd)` in a child process as uid:gid (no other group)
    and return what it returns (a JSON-able dict). The folder is opened before
    the privileges go, so the test's own 0700 temporary folders above it are no
    obstacle; every step below it is checked against the child's uid and gid."""
    read_end, write_end = os.pipe()
    fd = os.open(mail_dir, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.write(write_end, json.dumps(work(fd)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    os.close(fd)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return json.loads(out)


def _try(fn) -> str:  # type: ignore[no-untyped-def]
    try:
        fn()
    except PermissionError:
        return "denied"
    return "ok"


def _reader(fd: int) -> dict:
    """What a Maildir reader does with alice's message, and what it must not reach."""
    new = os.listdir(os.open("alice/new", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
    name = new[0]
    out: dict = {"listed": len(new)}

    def read() -> None:
        with os.fdopen(os.open(f"alice/new/{name}", os.O_RDONLY, dir_fd=fd), "rb") as f:
            out["body"] = f.read().decode()

    out["read"] = _try(read)
    out["to_cur"] = _try(
        lambda: os.rename(
            f"alice/new/{name}", f"alice/cur/{name}:2,S", src_dir_fd=fd, dst_dir_fd=fd
        )
    )
    out["delete"] = _try(lambda: os.unlink(f"alice/cur/{name}:2,S", dir_fd=fd))
    out["spool"] = _try(lambda: os.open(".spool", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
    out["queue"] = _try(lambda: os.open(".queue/records", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
    out["new_mailbox"] = _try(lambda: os.mkdir("mallory", dir_fd=fd))
    return out


def _other(fd: int) -> dict:
    return {"maildir": _try(lambda: os.open("alice", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))}


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_a_reader_in_the_group_reads_flags_and_deletes_others_get_nothing(tmp_path, stop_later):
    """A child process with another uid: in the files' group it is a Maildir
    reader; outside it, nobody. mail_dir is made first as the master makes it
    (`make_folder(mail_dir, MAIL_ROOT_MODE)`)."""
    root = tmp_path / "srv"
    make_folder(root / "mail_dir", MAIL_ROOT_MODE)
    server = serve_and_deliver(root, 0o022)
    stop_later(server)
    group = os.stat(server.messages("alice")[0]).st_gid
    reader = _as_user(65534, group, server.mail_dir, _reader)
    body = reader.pop("body", "")
    assert reader == {
        "listed": 1,
        "read": "ok",
        "to_cur": "ok",
        "delete": "ok",
        "spool": "denied",
        "queue": "denied",
        "new_mailbox": "denied",
    }
    assert body.endswith("for the group\n")
    assert server.messages("alice") == [] and not list((server.mail_dir / "alice/cur").iterdir())
    other_gid = 65534 if group != 65534 else 65533
    assert _as_user(65534, other_gid, server.mail_dir, _other) == {"maildir": "denied"}
