"""The Maildir read side as POP3 uses it: sizes from names, UIDLs, flags, the lock."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from geosmtp.storage import (
    Maildir,
    MaildirStore,
    MaildropBusy,
    MaildropLock,
    Spool,
    StorageError,
    StoredMessage,
    uid_for,
)
from geosmtp.storage import maildir as maildir_module
from geosmtp.storage.errors import SymlinkRefused
from geosmtp.storage.expunge import expunge
from geosmtp.storage.lock import LOCK_NAME
from geosmtp.storage.spool import UniqueNames

NAMES = UniqueNames("mx.example")


def crlf(data: bytes) -> bytes:
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", fsync=False, names=NAMES)


@pytest.fixture
def deliver(store):  # type: ignore[no-untyped-def]
    spool = Spool(store.root / ".spool", NAMES)

    def deliver(data: bytes, box: str = "alice") -> None:
        f = spool.open()
        f.write(data)
        store.deliver(f, [box])
        f.remove()

    return deliver


@pytest.fixture
def alice(store) -> Maildir:  # type: ignore[no-untyped-def]
    box = store.maildir("alice")
    store.ensure_maildir("alice")
    return box


@pytest.fixture(autouse=True)
def fresh_cache():  # type: ignore[no-untyped-def]
    maildir_module.VIRTUAL_SIZES.clear()
    yield
    maildir_module.VIRTUAL_SIZES.clear()


def put(box: Maildir, relpath: str, data: bytes) -> Path:
    path = box.path / relpath
    path.write_bytes(data)
    return path


# ------------------------------------------------------------- sizes


def test_sizes_come_from_the_name_without_opening_or_stating(alice):
    # The name says 999/1000 while the file holds 3 octets: the name is believed,
    # so list() did not stat it and virtual_size() did not read it.
    put(alice, "new/1700000000.M1P2.mx,S=999,W=1000", b"x\n\n")
    (m,) = alice.list()
    assert (m.size, m.vsize) == (999, 1000)
    assert alice.virtual_size(m) == 1000


def test_dovecot_names_are_read_whole(alice):
    put(alice, "cur/1700000000.M5P9.dove,S=5,W=7:2,ST", b"a\nb\nc")
    (m,) = alice.list()
    assert (m.key, m.subdir, m.flags) == ("1700000000.M5P9.dove,S=5,W=7", "cur", "ST")
    assert (m.size, m.vsize) == (5, 7)


def test_a_name_with_only_s_is_stated_for_nothing_and_read_for_w(alice):
    put(alice, "new/1700000000.M1P2.mx,S=4", b"a\nb\n")
    (m,) = alice.list()
    assert (m.size, m.vsize) == (4, None)
    assert alice.virtual_size(m) == 6


@pytest.mark.parametrize(
    "data", [b"", b"no end", b"a\nb\r\nc\rd\n", b"\r\n" * 3, b"\n" * 5, b".\n..\n"]
)
def test_foreign_mail_without_fields_is_read_once(alice, monkeypatch, data):
    put(alice, "new/foreign-message", data)
    (m,) = alice.list()
    assert (m.size, m.vsize) == (len(data), None)
    assert alice.virtual_size(m) == len(crlf(data))
    # Known now for the whole process: any Maildir object on the path, no reading.
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("read again"))
    again = Maildir(alice.path)
    (m2,) = again.list()
    assert m2.vsize == len(crlf(data))
    assert again.virtual_size(m) == len(crlf(data))


def test_a_large_foreign_message_is_counted_across_read_chunks(alice, monkeypatch):
    monkeypatch.setattr(maildir_module, "_READ_CHUNK", 7)
    data = b"abcdef\r\nabcde\r\n\n\r" * 50  # CR at chunk ends, LF at chunk starts
    put(alice, "new/big", data)
    (m,) = alice.list()
    assert alice.virtual_size(m) == len(crlf(data))


def test_a_message_changed_in_place_is_read_again(alice):
    path = put(alice, "new/changing", b"a\n")
    (m,) = alice.list()
    assert alice.virtual_size(m) == 3
    path.write_bytes(b"a\nb\nc\n")
    (m,) = alice.list()
    assert m.vsize is None  # another size: not the cached entry
    assert alice.virtual_size(m) == 9


def test_the_size_cache_forgets_the_least_recently_used():
    cache = maildir_module._VirtualSizes(2)
    cache.put(("m", "a", 1, 1), 10)
    cache.put(("m", "b", 1, 1), 20)
    assert cache.get(("m", "a", 1, 1)) == 10  # a is now the most recent
    cache.put(("m", "c", 1, 1), 30)
    assert cache.get(("m", "b", 1, 1)) is None
    assert (cache.get(("m", "a", 1, 1)), cache.get(("m", "c", 1, 1))) == (10, 30)


def test_a_vanished_message_is_a_storage_error(alice):
    path = put(alice, "new/gone", b"x\n")
    (m,) = alice.list()
    path.unlink()
    with pytest.raises(StorageError) as info:
        alice.virtual_size(m)
    assert not isinstance(info.value, OSError)


# ------------------------------------------------------------- UIDL


def test_the_uidl_is_the_key_and_survives_flags_and_moves(alice, deliver):
    deliver(b"Subject: one\n\nbody\n")
    deliver(b"Subject: two\n\nbody\n")
    first, second = alice.list()
    uid = uid_for(first)
    # Dovecot's %f: the name without the info, the S= and W= fields kept.
    assert uid == first.key == first.filename.partition(":")[0]
    assert re.fullmatch(r"[^,]+,S=[0-9]+,W=[0-9]+", uid)
    assert re.fullmatch(r"[\x21-\x7e]{1,70}", uid)
    assert uid != uid_for(second)
    seen = alice.set_flags(first, "S")
    assert uid_for(seen) == uid
    trashed = alice.set_flags(seen, "ST")
    assert uid_for(trashed) == uid
    assert [uid_for(m) for m in Maildir(alice.path).list()] == [uid, uid_for(second)]


@pytest.mark.parametrize(
    "name",
    ["x" * 67 + ",S=1", "with space", "caf\u00e9", "tab\there", "bad\udcffbyte"],
)
def test_a_key_that_cannot_be_a_uidl_is_digested(name):
    m = StoredMessage(name, "new", name, 1, "")
    uid = uid_for(m)
    assert re.fullmatch(r"[0-9a-f]{64}", uid)
    assert uid == uid_for(StoredMessage(name, "cur", name + ":2,S", 1, "S"))  # stable
    other = StoredMessage("2" + name, "new", "2" + name, 1, "")
    assert uid_for(other) != uid


def test_a_key_of_exactly_70_characters_is_kept():
    name = "y" * 66 + ",S=3"
    assert uid_for(StoredMessage(name, "new", name, 3, "")) == name


# ------------------------------------------------------------- list, flags, delete


def test_list_skips_tmp_dotfiles_folders_links_and_the_lock(alice, deliver):
    deliver(b"real\n")
    put(alice, "tmp/1700000000.M1P1.mx", b"half")
    put(alice, "new/.hidden", b"x")
    put(alice, "cur/.also,S=1:2,S", b"x")
    (alice.path / "new" / "a-folder").mkdir()
    os.symlink("/etc/passwd", alice.path / "cur" / "link:2,S")
    with alice.lock():
        (m,) = alice.list()
    assert m.subdir == "new" and (alice.path / m.relpath).read_bytes() == b"real\n"
    assert (alice.path / LOCK_NAME).exists()


def test_set_flags_changes_only_the_info(alice, deliver):
    deliver(b"a\nb\n")
    (m,) = alice.list()
    seen = alice.set_flags(m, "S")
    assert seen.filename == f"{m.key}:2,S" and seen.key == m.key
    assert (seen.size, seen.vsize) == (4, 6)
    flagged = alice.set_flags(seen, "FS")
    assert flagged.filename == f"{m.key}:2,FS"
    assert [x.filename for x in alice.list()] == [flagged.filename]
    assert alice.set_flags(flagged, "SF") is flagged  # nothing to do: no rename


def test_deleting_a_message_another_reader_took_is_no_error(alice, deliver):
    deliver(b"x\n")
    (m,) = alice.list()
    os.unlink(alice.path / m.relpath)
    expunge(alice, [m])
    expunge(alice, [m])
    assert alice.list() == []


def test_odd_names_sort_without_error(alice):
    for name in ["\u00b2.M1P1.x", "17.M\u00b2P1.x", "1700000000.27041_118.foo.org", "zzz"]:
        put(alice, f"new/{name}", b"x")
    put(alice, "new/1600000000.M5P1.mx,S=1,W=1", b"x")
    keys = [m.key for m in alice.list()]
    assert keys[:3] == [
        "17.M\u00b2P1.x",
        "1600000000.M5P1.mx,S=1,W=1",
        "1700000000.27041_118.foo.org",
    ]
    assert sorted(keys[3:]) == ["zzz", "\u00b2.M1P1.x"]


# ------------------------------------------------------------- the lock


def test_the_lock_makes_the_maildir_of_a_user_who_never_got_mail(store):
    box = store.maildir("newcomer")
    assert box.list() == []
    with box.lock() as lock:
        assert lock.held
        assert all((box.path / sub).is_dir() for sub in ("tmp", "new", "cur"))
        assert os.stat(box.path).st_mode & 0o777 == 0o770
        assert os.stat(box.path / LOCK_NAME).st_mode & 0o777 == 0o600
        assert box.list() == []  # the lock file is no message
    assert not lock.held


def test_two_sessions_in_one_process_conflict(alice):
    first = alice.lock()
    with pytest.raises(MaildropBusy) as info:
        Maildir(alice.path).lock()  # another object, another open file description
    assert isinstance(info.value, StorageError) and info.value.filename.endswith(LOCK_NAME)
    first.release()
    first.release()  # idempotent
    second = Maildir(alice.path).lock()
    assert second.held
    second.release()


def test_the_lock_is_released_when_the_block_fails(alice):
    with pytest.raises(RuntimeError), alice.lock():
        raise RuntimeError("the session broke")
    alice.lock().release()  # free again


def test_a_dropped_lock_object_lets_go(alice):
    fds = len(os.listdir("/proc/self/fd"))
    alice.lock()  # never released, never kept: garbage at once
    assert len(os.listdir("/proc/self/fd")) == fds  # its descriptor, and the flock, are gone
    again = alice.lock()  # MaildropBusy if the dropped one still held it
    assert again.held
    with pytest.raises(MaildropBusy):  # as a lock that is held does
        MaildropLock(again.path).acquire()
    again.release()


def test_a_planted_symlink_is_refused_not_followed(alice, tmp_path):
    target = tmp_path / "elsewhere"
    os.symlink(target, alice.path / LOCK_NAME)
    with pytest.raises(StorageError) as info:
        alice.lock()
    assert not isinstance(info.value, MaildropBusy)
    assert not target.exists()


def test_a_child_process_does_not_inherit_the_lock(alice):
    lock = alice.lock()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=False,
    )
    try:
        # Running its own code: past exec, where close-on-exec descriptors go.
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        lock.release()
        alice.lock().release()  # the child's copy (had it one) would still hold it
    finally:
        child.communicate(b"", timeout=10)


HOLDER = """
import sys
from pathlib import Path
from geosmtp.storage import Maildir
lock = Maildir(Path(sys.argv[1])).lock()
print("locked", flush=True)
sys.stdin.read()
"""


def test_another_process_holds_the_lock_until_it_is_killed(alice):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(alice.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(MaildropBusy):
            alice.lock()
        holder.send_signal(signal.SIGKILL)  # no cleanup runs in the holder
        assert holder.wait(timeout=10) == -signal.SIGKILL
        with alice.lock() as lock:  # the kernel dropped the holder's lock
            assert lock.held
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_a_lock_held_by_this_process_blocks_another(alice):
    with alice.lock():
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try:\n"
                "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except BlockingIOError:\n"
                "    sys.exit(3)\n",
                str(alice.path / LOCK_NAME),
            ],
            timeout=10,
        )
    assert probe.returncode == 3


def test_maildrop_lock_directly(tmp_path):
    path = tmp_path / "x.lock"
    with MaildropLock(path) as a:
        b = MaildropLock(path)
        with pytest.raises(MaildropBusy):
            b.acquire()
        assert not b.held
        assert a.acquire() is a  # already held: nothing to do
    assert b.acquire().held
    b.release()


def test_names_carry_the_first_label_of_the_host_and_fit_a_uidl():
    """The host part is the first label, so a key with the sizes of a 99 MB message
    stays a UIDL of at most 70 characters (docs/dovecot.md does the sum)."""
    names = UniqueNames("mail-relay.hosting-company.example")
    name = names()
    assert name.endswith(".mail-relay") and "," not in name and ":" not in name
    longest = f"{2**31}.M999999P4194304Q9999999.{'x' * 13},S={10**8 - 1},W={10**8 - 1}"
    assert len(longest) == 70
    assert uid_for(StoredMessage(longest, "new", longest, 1, "")) == longest
    assert UniqueNames("localhost")().endswith(".localhost")


# ------------------------------------------------------------- symbolic links


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside mail_dir with a file someone cares about."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "1700000000.M1P1.victim:2,S").write_bytes(b"not mail\n")
    return folder


def relink(box: Maildir, sub: str, outside: Path) -> None:
    """Put a symbolic link to `outside` where the folder `sub` was (a group member can)."""
    (box.path / sub).rename(box.path / f"{sub}.moved")
    (box.path / sub).symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("sub", ["cur", "new"])
def test_a_symlinked_folder_is_neither_locked_nor_listed(alice, deliver, outside, sub):
    deliver(b"mine\n")
    relink(alice, sub, outside)
    with pytest.raises(SymlinkRefused):
        alice.lock()  # POP3 answers the login -ERR [SYS/TEMP]
    with pytest.raises(SymlinkRefused):
        alice.list()
    assert [p.name for p in outside.iterdir()] == ["1700000000.M1P1.victim:2,S"]


def test_a_symlinked_maildir_is_not_locked(store, outside):
    (store.root / "alice").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SymlinkRefused):
        store.maildir("alice").lock()
    assert [p.name for p in outside.iterdir()] == ["1700000000.M1P1.victim:2,S"]  # no lock file


def test_retr_and_dele_of_a_listed_message_never_reach_through_a_new_link(alice, deliver, outside):
    """Listed at login, then `cur` is swapped for a link: reading, flagging and
    deleting by the listed name refuse, and the file outside stays."""
    deliver(b"mine\n")
    (m,) = alice.list()
    seen = alice.set_flags(m, "S")
    victim = StoredMessage("1700000000.M1P1.victim", "cur", "1700000000.M1P1.victim:2,S", 9, "S")
    relink(alice, "cur", outside)
    for listed in (seen, victim):
        with pytest.raises(SymlinkRefused):
            alice.open(listed)
        with pytest.raises(SymlinkRefused):
            expunge(alice, [listed])
        with pytest.raises(SymlinkRefused):
            alice.set_flags(listed, "ST")
    with pytest.raises(SymlinkRefused):
        alice.virtual_size(StoredMessage(victim.key, "cur", victim.filename, 9, "S"))
    assert (outside / victim.filename).read_bytes() == b"not mail\n"


def test_a_message_replaced_by_a_link_is_not_read_and_its_target_not_deleted(alice, outside):
    put(alice, "new/1700000000.M2P1.mx", b"was mail\n")
    (m,) = alice.list()
    target = outside / "1700000000.M1P1.victim:2,S"
    (alice.path / m.relpath).unlink()
    (alice.path / m.relpath).symlink_to(target)  # after the listing
    with pytest.raises(SymlinkRefused):
        alice.open(m)
    with pytest.raises(SymlinkRefused):
        alice.virtual_size(m)
    assert alice.list() == []  # a link is no message
    expunge(alice, [m])  # the name goes, not what it pointed to
    assert not os.path.lexists(alice.path / m.relpath)
    assert target.read_bytes() == b"not mail\n"


def test_a_fifo_in_place_of_a_message_does_not_hang_the_reader(alice):
    put(alice, "new/1700000000.M2P1.mx", b"was mail\n")
    (m,) = alice.list()
    (alice.path / m.relpath).unlink()
    os.mkfifo(alice.path / m.relpath)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            alice.open(m)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)  # a hang fails, not blocks, the run
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "open() blocked on a FIFO"
    assert len(errors) == 1 and isinstance(errors[0], StorageError)
