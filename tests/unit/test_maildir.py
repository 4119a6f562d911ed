"""Maildir storage: spool once, link into every new/, nothing partial, names checked."""

import errno
import mailbox
import os
import threading
import time
from pathlib import Path

import gevent
import pytest

from geosmtp.server.threads import in_thread
from geosmtp.storage.maildir import MaildirStore, StorageError


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", fsync=True, hostname="host/with:chars")


def test_deliver_links_one_file_into_each_mailbox(store):
    paths = store.deliver(["alice", "bob", "alice"], b"Subject: x\n\nhello\n")
    assert [p.parent.parent.name for p in paths] == ["alice", "bob"]  # alice once
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino
    assert all(p.read_bytes() == b"Subject: x\n\nhello\n" for p in paths)
    assert not list(store.root.glob("*/tmp/*"))
    for box in ("alice", "bob"):
        (msg,) = list(mailbox.Maildir(store.root / box, create=False))
        assert msg["Subject"] == "x"


def test_unique_names_escape_slash_and_colon(store):
    names = {store.unique_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all("/" not in n and ":" not in n for n in names)
    assert all(n.endswith(r".host\057with\072chars") for n in names)


@pytest.mark.parametrize("box", ["../evil", "a/b", "..", ".hidden", "a\0b", "", "A", "x\ny"])
def test_unsafe_mailbox_names_never_touch_the_filesystem(store, box):
    before = set(store.root.parent.rglob("*"))
    with pytest.raises(StorageError):
        store.deliver([box], b"x\n")
    assert set(store.root.parent.rglob("*")) == before


def test_discard_removes_the_spool(store):
    spool = store.open_spool("alice")
    spool.write(b"partial")
    assert os.path.exists(spool.path)
    spool.discard()
    assert not os.path.exists(spool.path)
    assert not list(store.root.glob("*/new/*"))


def test_failed_commit_leaves_nothing_in_new(store, monkeypatch):
    spool = store.open_spool("alice")
    spool.write(b"body\n")
    calls = []
    real_link = os.link

    def failing_link(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(StorageError):
        spool.commit(["alice", "bob"])
    assert len(calls) == 2
    assert not list(store.root.glob("*/new/*"))
    assert not list(store.root.glob("*/tmp/*"))


def test_copy_when_hard_links_are_impossible(store, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    paths = store.deliver(["alice", "bob"], b"copied\n")
    assert [p.read_bytes() for p in paths] == [b"copied\n", b"copied\n"]
    assert os.stat(paths[0]).st_ino != os.stat(paths[1]).st_ino
    assert not list(store.root.glob("*/tmp/*"))


def test_fsync_is_offloaded(tmp_path):
    calls = []

    def offload(fn, *args):
        calls.append(fn.__name__)
        return fn(*args)

    store = MaildirStore(tmp_path / "m", fsync=True, offload=offload)
    store.deliver(["alice"], b"x\n")
    # One trip to the threadpool does the file's fsync, the links and new/'s fsync.
    assert calls.count("_make_durable") == 1
    calls.clear()
    MaildirStore(tmp_path / "n", fsync=False, offload=offload).deliver(["alice"], b"x\n")
    assert calls == []


def test_mail_is_private_to_the_server_user(store):
    (path,) = store.deliver(["alice"], b"secret\n")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(store.root / "alice").st_mode & 0o777 == 0o700
    assert os.stat(store.root / "alice" / "new").st_mode & 0o777 == 0o700


def test_many_small_writes_make_one_file(store):
    spool = store.open_spool("alice")
    for i in range(10_000):
        spool.write(b"%d\n" % i)
    (path,) = spool.commit(["alice"])
    assert path.read_bytes() == b"".join(b"%d\n" % i for i in range(10_000))


def test_storage_errors_are_not_socket_errors(store, monkeypatch):
    """A full disk must never be taken for a lost client (an OSError in the shell)."""
    spool = store.open_spool("alice")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError) as info:
        spool.write(b"x" * 70_000)  # more than the write buffer: reaches the file
    assert not isinstance(info.value, OSError)
    assert info.value.no_space and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    spool.discard()
    assert not list(store.root.glob("*/tmp/*"))


@pytest.mark.parametrize("stop_at", ["link", "fsync"])
def test_a_commit_stopped_in_the_thread_leaves_all_or_nothing(tmp_path, monkeypatch, stop_at):
    """The greenlet is killed while the threadpool is half-way through the commit.

    The thread cannot be stopped; the greenlet's cleanup must wait for it, or it
    would unlink and close under the thread's feet and leave a link behind.
    """
    store = MaildirStore(tmp_path / "mail", fsync=True, offload=in_thread)
    spool = store.open_spool("alice")
    spool.write(b"Subject: x\n\nbody\n")
    inside, release = threading.Event(), threading.Event()
    real_link, real_fsync = os.link, os.fsync

    def slow_link(src, dst):
        real_link(src, dst)  # the link exists before the commit records it
        if stop_at == "link":
            inside.set()
            release.wait(10)

    def slow_fsync(fd):
        if stop_at == "fsync" and not inside.is_set():
            inside.set()
            release.wait(10)
        real_fsync(fd)  # EBADF if the greenlet closed the descriptor meanwhile

    monkeypatch.setattr(os, "link", slow_link)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    committer = gevent.spawn(spool.commit, ["alice", "bob", "carol"])
    deadline = time.monotonic() + 10
    while not inside.is_set():  # the thread is in the middle of the commit
        assert time.monotonic() < deadline, "the commit never reached the thread"
        gevent.sleep(0.001)
    committer.kill(block=False)
    gevent.idle()  # the kill is delivered: the greenlet now waits for the thread
    release.set()
    committer.join(timeout=10)
    assert committer.dead
    assert isinstance(committer.value, gevent.GreenletExit)  # never returned: no 250
    assert list(store.root.glob("*/new/*")) == []  # nothing, not a partial delivery
    assert list(store.root.glob("*/tmp/*")) == []
