"""Storage: the spool, Maildir delivery (all or nothing, names checked) and reading."""

import errno
import mailbox
import os
import random
import re
import threading
import time
from pathlib import Path

import gevent
import pytest
from loguru import logger

from geosmtp.server.threads import in_thread
from geosmtp.storage import MaildirStore, Spool, StorageError
from geosmtp.storage.errors import SymlinkRefused
from geosmtp.storage.expunge import expunge
from geosmtp.storage.spool import STALE_AFTER, UniqueNames

NAMES = UniqueNames("host/with:chars")


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", fsync=True, names=NAMES)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "mail" / ".spool", NAMES)


def spooled(spool: Spool, data: bytes):  # type: ignore[no-untyped-def]
    f = spool.open()
    f.write(data)
    return f


def crlf(data: bytes) -> bytes:
    """What a POP3 server sends for stored bytes: a LF alone becomes CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def stored_as(f, data: bytes) -> str:  # type: ignore[no-untyped-def]
    return f"{f.name},S={len(data)},W={len(crlf(data))}"


def test_deliver_links_one_file_into_each_mailbox(store, spool):
    f = spooled(spool, b"Subject: x\n\nhello\n")
    paths = [Path(p) for p in store.deliver(f, ["alice", "bob", "alice"]).paths]
    assert [p.parent.parent.name for p in paths] == ["alice", "bob"]  # alice once
    # Dovecot's name: the spool's base, the size on disk, the size with CRLF.
    assert [p.name for p in paths] == [f"{f.name},S=18,W=21"] * 2
    assert Path(f.path).name == f.name  # the spool file keeps its own name
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino == os.stat(f.path).st_ino
    f.remove()
    assert all(p.read_bytes() == b"Subject: x\n\nhello\n" for p in paths)
    assert list(spool.root.iterdir()) == []
    for box in ("alice", "bob"):
        (msg,) = list(mailbox.Maildir(store.root / box, create=False))
        assert msg["Subject"] == "x"


def test_unique_names_escape_slash_colon_and_comma():
    names = {NAMES() for _ in range(1000)}
    assert len(names) == 1000
    assert all("/" not in n and ":" not in n for n in names)
    assert all(n.endswith(r".host\057with\072chars") for n in names)
    # ',' would start Dovecot's fields (S=, W=) inside the base name.
    assert UniqueNames("a,b").__call__().endswith(r".a\054b")


# ------------------------------------------------------------- POP3 sizes


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"plain, no line end",
        b"lf\nlf\n",
        b"crlf\r\ncrlf\r\n",
        b"lone\rcr\r",
        b"\n\n\r\r\n\r\n\n\r",
        b"..\n.\r\n...\n",
    ],
)
def test_the_spool_counts_the_crlf_size_across_every_write_boundary(spool, data):
    """One write, and every split into two (flushed in between or not): a CR at
    the end of one piece and a LF at the start of the next are one CRLF."""
    for cut in range(len(data) + 1):
        for flush_between in (False, True):
            f = spool.open()
            f.write(data[:cut])
            if flush_between:
                f.flush()
            f.write(data[cut:])
            assert (f.size, f.vsize) == (len(data), len(crlf(data))), (cut, flush_between)
            f.flush()  # the same once everything reached the file
            assert (f.size, f.vsize) == (len(data), len(crlf(data)))
            assert os.fstat(f.fd).st_size == len(data)
            f.remove()


def test_the_crlf_size_of_random_writes_matches_the_encoding(spool):
    rng = random.Random(11)
    for _ in range(200):
        data = bytes(rng.choice(b"a.\r\n") for _ in range(rng.randrange(0, 300)))
        f = spool.open()
        at = 0
        while at < len(data):
            step = rng.randrange(0, 40)
            f.write(data[at : at + step])
            at += step
            if rng.random() < 0.3:
                f.flush()
        assert (f.size, f.vsize) == (len(data), len(crlf(data))), data
        f.remove()


def test_a_large_message_is_counted_across_buffer_flushes(store, spool):
    f = spool.open()
    piece = b"x" * 1000 + b"\r"  # every write ends in CR, the next starts with LF
    for _ in range(200):
        f.write(piece)
        f.write(b"\nline\n")
    data = (piece + b"\nline\n") * 200
    (path,) = store.deliver(f, ["alice"]).paths
    assert Path(path).name == stored_as(f, data)
    assert Path(path).read_bytes() == data


@pytest.mark.parametrize("box", ["../evil", "a/b", "..", ".hidden", ".spool", "a\0b", "", "A"])
def test_unsafe_mailbox_names_never_touch_the_filesystem(store, spool, box):
    f = spooled(spool, b"x\n")
    before = set(store.root.rglob("*"))
    with pytest.raises(StorageError):
        store.deliver(f, [box])
    with pytest.raises(StorageError):
        store.maildir(box)
    assert set(store.root.rglob("*")) == before


def test_a_spool_file_is_private_by_its_folder_and_removed(spool):
    f = spooled(spool, b"partial")
    # 0640: the inode becomes the Maildir message; the 0700 folder keeps it private.
    assert os.stat(f.path).st_mode & 0o777 == 0o640
    assert os.stat(spool.root).st_mode & 0o777 == 0o700
    f.remove()
    assert not os.path.exists(f.path)


def test_failed_delivery_leaves_nothing_in_new(store, spool, monkeypatch):
    f = spooled(spool, b"body\n")
    calls = []
    real_link = os.link

    def failing_link(src, dst, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(StorageError) as info:
        store.deliver(f, ["alice", "bob"])
    assert info.value.no_space
    assert len(calls) == 2
    assert not list(store.root.glob("*/new/*"))


def test_undo_takes_a_delivery_back(store, spool):
    delivery = store.deliver(spooled(spool, b"x\n"), ["alice", "bob"])
    assert len(list(store.root.glob("*/new/*"))) == 2
    delivery.undo()
    assert not list(store.root.glob("*/new/*"))


def test_copy_when_hard_links_are_impossible(store, spool, monkeypatch):
    def no_link(src, dst, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    f = spooled(spool, b"copied\n")
    paths = store.deliver(f, ["alice", "bob"]).paths
    assert [Path(p).read_bytes() for p in paths] == [b"copied\n", b"copied\n"]
    assert [Path(p).name for p in paths] == [f"{f.name},S=7,W=8"] * 2  # as when linked
    assert os.stat(paths[0]).st_ino != os.stat(paths[1]).st_ino
    assert not list(store.root.glob("*/tmp/*"))


def test_copy_everywhere_when_told_the_spool_is_elsewhere(store, spool, monkeypatch):
    store.link = False
    monkeypatch.setattr(os, "link", lambda *a: pytest.fail("no link may be tried"))
    f = spooled(spool, b"copied\r\n")
    (path,) = store.deliver(f, ["alice"]).paths
    assert Path(path).read_bytes() == b"copied\r\n"
    assert Path(path).name == f"{f.name},S=8,W=8"


def test_fsync_is_offloaded(tmp_path, spool):
    calls = []

    def offload(fn, *args):
        calls.append(fn.__name__)
        return fn(*args)

    store = MaildirStore(tmp_path / "m", fsync=True, offload=offload)
    store.deliver(spooled(spool, b"x\n"), ["alice"])
    # One trip to the threadpool does the file's fsync, the links and new/'s fsync.
    assert calls.count("_make_durable") == 1
    calls.clear()
    lazy = MaildirStore(tmp_path / "n", fsync=False, offload=offload)
    lazy.deliver(spooled(spool, b"x\n"), ["alice"])
    assert calls == []


@pytest.fixture(params=[0o022, 0o077, 0o000], ids=lambda m: f"umask{m:03o}")
def umask(request):  # type: ignore[no-untyped-def]
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("link", [True, False], ids=["linked", "copied"])
def test_mail_is_for_the_servers_group_whatever_the_umask(tmp_path, umask, link):
    """Maildir folders 0770 (a reader in the group moves and deletes), messages
    0640, mail_dir 0750, the spool 0700; nothing for others (storage/modes.py)."""
    store = MaildirStore(tmp_path / "mail", fsync=True, names=NAMES)
    spool = Spool(tmp_path / "mail" / ".spool", NAMES)
    store.link = link
    (path,) = store.deliver(spooled(spool, b"secret\n"), ["alice"]).paths
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert os.stat(store.root).st_mode & 0o777 == 0o750
    assert os.stat(spool.root).st_mode & 0o777 == 0o700
    for folder in ("", "tmp", "new", "cur"):
        assert os.stat(store.root / "alice" / folder).st_mode & 0o777 == 0o770, folder


def test_many_small_writes_make_one_file(store, spool):
    f = spool.open()
    for i in range(10_000):
        f.write(b"%d\n" % i)
    (path,) = store.deliver(f, ["alice"]).paths
    assert Path(path).read_bytes() == b"".join(b"%d\n" % i for i in range(10_000))


def test_storage_errors_are_not_socket_errors(spool, monkeypatch):
    """A full disk must never be taken for a lost client (an OSError in the shell)."""
    f = spool.open()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError) as info:
        f.write(b"x" * 70_000)  # more than the write buffer: reaches the file
    assert not isinstance(info.value, OSError)
    assert info.value.no_space and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    f.remove()
    assert list(spool.root.iterdir()) == []


def test_stale_spool_files_are_removed_at_start(spool):
    old, fresh = spooled(spool, b"old"), spooled(spool, b"fresh")
    old.close()
    fresh.close()
    long_ago = time.time() - STALE_AFTER - 60
    os.utime(old.path, (long_ago, long_ago))
    assert spool.remove_stale() == 1
    assert [p.name for p in spool.root.iterdir()] == [fresh.name]


def test_the_spool_knows_whether_it_can_link(spool, store):
    assert spool.same_filesystem(store.root)


@pytest.mark.parametrize("stop_at", ["link", "fsync"])
def test_a_delivery_stopped_in_the_thread_leaves_all_or_nothing(tmp_path, monkeypatch, stop_at):
    """The greenlet is killed while the threadpool is half-way through the delivery.

    The thread cannot be stopped; the greenlet's cleanup must wait for it, or it
    would unlink under the thread's feet and leave a link behind.
    """
    store = MaildirStore(tmp_path / "mail", fsync=True, offload=in_thread)
    f = spooled(Spool(tmp_path / "mail" / ".spool", NAMES), b"Subject: x\n\nbody\n")
    inside, release = threading.Event(), threading.Event()
    real_link, real_fsync = os.link, os.fsync

    def slow_link(src, dst, **kwargs):
        real_link(src, dst, **kwargs)  # the link exists before the delivery records it
        if stop_at == "link":
            inside.set()
            release.wait(10)

    def slow_fsync(fd):
        if stop_at == "fsync" and not inside.is_set():
            inside.set()
            release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "link", slow_link)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    committer = gevent.spawn(store.deliver, f, ["alice", "bob", "carol"])
    deadline = time.monotonic() + 10
    while not inside.is_set():  # the thread is in the middle of the delivery
        assert time.monotonic() < deadline, "the delivery never reached the thread"
        gevent.sleep(0.001)
    committer.kill(block=False)
    gevent.idle()  # the kill is delivered: the greenlet now waits for the thread
    release.set()
    committer.join(timeout=10)
    assert committer.dead
    assert isinstance(committer.value, gevent.GreenletExit)  # never returned: no 250
    assert list(store.root.glob("*/new/*")) == []  # nothing, not a partial delivery


# ------------------------------------------------------------- reading


def test_the_read_side_lists_opens_flags_and_deletes(store, spool):
    for i in range(3):
        store.deliver(spooled(spool, b"Subject: %d\n\nbody %d\n" % (i, i)), ["alice"])
    box = store.maildir("alice")
    listed = box.list()
    assert [m.subdir for m in listed] == ["new"] * 3
    assert [m.size for m in listed] == [len(b"Subject: 0\n\nbody 0\n")] * 3
    with box.open(listed[1]) as f:
        assert f.read() == b"Subject: 1\n\nbody 1\n"  # oldest delivery first
    assert [m.vsize for m in listed] == [len(b"Subject: 0\r\n\r\nbody 0\r\n")] * 3
    seen = box.set_flags(listed[1], "S")
    assert (seen.subdir, seen.filename, seen.flags) == ("cur", f"{listed[1].key}:2,S", "S")
    assert re.fullmatch(r"[^,]+,S=\d+,W=\d+:2,S", seen.filename)  # the sizes stay
    expunge(box, [listed[0]])
    again = box.list()
    assert [m.key for m in again] == [listed[1].key, listed[2].key]
    # Python's mailbox (and so mutt, Dovecot) sees the same Maildir.
    reader = mailbox.Maildir(store.root / "alice", create=False)
    assert sorted(m["Subject"] for m in reader) == ["1", "2"]
    assert {m.get_flags() for m in reader} == {"S", ""}


def test_a_mailbox_never_delivered_to_is_empty(store):
    assert store.maildir("nobody").list() == []


# ------------------------------------------------------------- symbolic links


@pytest.fixture
def warnings_logged():  # type: ignore[no-untyped-def]
    lines: list[str] = []
    handler = logger.add(
        lambda m: lines.append(m.rstrip("\n")), level="WARNING", format="{level} {message}"
    )
    yield lines
    logger.remove(handler)


def plant_link(store: MaildirStore, box: str, folder: str, outside: Path) -> Path:
    """Make `folder` of `box` ("" the Maildir itself) a symbolic link to `outside`."""
    outside.mkdir(exist_ok=True)
    link = store.root / box / folder if folder else store.root / box
    if link.is_dir():
        link.rename(link.with_name(link.name + ".moved"))  # what a local user could do
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    return link


@pytest.mark.parametrize("link", [True, False], ids=["linked", "copied"])
@pytest.mark.parametrize("folder", ["", "tmp", "new", "cur"])
def test_delivery_never_goes_through_a_symlinked_maildir_folder(
    store, spool, tmp_path, warnings_logged, folder, link
):
    store.link = link
    outside = tmp_path / "outside"
    (store.root / "alice" / "new").mkdir(parents=True)
    planted = plant_link(store, "alice", folder, outside)
    with pytest.raises(SymlinkRefused) as info:
        store.deliver(spooled(spool, b"Subject: x\n\nbody\n"), ["bob", "alice"])
    assert info.value.errno == errno.ELOOP and not info.value.no_space  # 451, not 452
    assert list(outside.rglob("*")) == []  # nothing written outside mail_dir
    assert not list(store.root.glob("*/new/*"))  # all or nothing: bob has no copy either
    assert warnings_logged == [f"WARNING mailbox alice: {planted} is a symbolic link: not followed"]


@pytest.mark.parametrize("link", [True, False], ids=["linked", "copied"])
@pytest.mark.parametrize("folder", ["new", "tmp", ""])
def test_a_link_planted_after_the_first_delivery_is_refused_too(
    store, spool, tmp_path, folder, link
):
    """The Maildir is made and checked once, but opened without following links
    at every delivery."""
    store.link = link
    store.deliver(spooled(spool, b"first\n"), ["alice"])
    outside = tmp_path / "outside"
    plant_link(store, "alice", folder, outside)
    if folder == "tmp" and link:
        # A hard link never touches tmp/: delivered, and nothing went outside.
        store.deliver(spooled(spool, b"second\n"), ["alice"])
    else:
        with pytest.raises(SymlinkRefused):
            store.deliver(spooled(spool, b"second\n"), ["alice"])
    assert list(outside.rglob("*")) == []
