"""The queue on disk: durable entries, atomic records, quarantine, orphans."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from geosmtp.queue.store import (
    DELIVERED,
    PENDING,
    QueuedRecipient,
    QueueRecord,
    QueueStore,
)
from geosmtp.storage import Spool
from geosmtp.storage.errors import StorageError, SymlinkRefused
from geosmtp.storage.spool import UniqueNames


@pytest.fixture
def parts(tmp_path: Path):
    names = UniqueNames("host")
    return QueueStore(tmp_path / "mail" / ".queue"), Spool(tmp_path / "mail" / ".spool", names)


def record(queue_id: str = "Q1") -> QueueRecord:
    return QueueRecord(
        id=queue_id,
        sender="alice@example.test",
        arrival=1000.0,
        recipients=[
            QueuedRecipient("bob@remote.test", "remote.test", notify=["FAILURE"]),
            QueuedRecipient("carol@other.test", "other.test", orcpt="rfc822;carol@other.test"),
        ],
        size=12,
        ret="HDRS",
    )


def add(store: QueueStore, spool: Spool, queue_id: str = "Q1", data: bytes = b"Subject: x\n\nhi\n"):
    f = spool.open()
    f.write(data)
    delivery = store.add(f, record(queue_id))
    f.remove()  # the spool name goes; the queue keeps its link
    return delivery


def test_an_entry_is_a_message_and_a_record_that_load_back(parts):
    store, spool = parts
    add(store, spool)
    with store.open_message("Q1") as f:
        assert f.read() == b"Subject: x\n\nhi\n"
    loaded = store.load()
    assert [r.id for r in loaded.records] == ["Q1"]
    assert loaded.records[0] == record("Q1")
    assert loaded.quarantined == [] and loaded.orphans == 0
    for folder in (store.root, *(store.root / n for n in ("messages", "records", "quarantine"))):
        assert os.stat(folder).st_mode & 0o777 == 0o700, folder


def test_undo_takes_the_entry_back(parts):
    store, spool = parts
    add(store, spool).undo()
    assert store.load().records == []
    assert os.listdir(store.messages) == [] and os.listdir(store.records) == []


def test_a_saved_record_replaces_the_old_one_whole(parts):
    store, spool = parts
    add(store, spool)
    rec = store.load().records[0]
    rec.recipients[0].state = DELIVERED
    store.save(rec)
    (again,) = store.load().records
    assert [r.state for r in again.recipients] == [DELIVERED, PENDING]
    assert [n for n in os.listdir(store.records)] == ["Q1.json"]  # no temporary left


@pytest.mark.parametrize("step", ["write", "fsync"])
def test_a_record_that_cannot_be_written_leaves_the_old_one_and_no_temporary(
    parts, monkeypatch, step
):
    """A full disk while a record is saved: StorageError, the old record whole,
    no half-written temporary holding the room that is short."""
    import errno

    store, spool = parts
    add(store, spool)
    rec = store.load().records[0]
    rec.recipients[0].state = DELIVERED

    def no_space(*args):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, step, no_space)
    with pytest.raises(StorageError) as info:
        store.save(rec)
    monkeypatch.undo()
    assert info.value.no_space
    assert os.listdir(store.records) == ["Q1.json"]
    assert [r.state for r in store.load().records[0].recipients] == [PENDING, PENDING]


def _synced_and_opened(monkeypatch) -> tuple[list[tuple[int, int]], list[str]]:
    """Record what `os.fsync` syncs (device and inode) and what `os.open` opens."""
    synced: list[tuple[int, int]] = []
    opened: list[str] = []
    real_fsync, real_open = os.fsync, os.open

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    def open_(path, flags, *args):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", open_)
    return synced, opened


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_an_entry_and_a_saved_record_sync_both_folders_without_opening_them(parts, monkeypatch):
    """Durable before the 250: the message, the record, messages/ and records/
    are each fsynced; the folders through descriptors the store holds, so an
    entry's trip to the threadpool opens no folder (issue 20: four calls fewer
    per message on the relay's path)."""
    store, spool = parts
    f = spool.open()
    f.write(b"Subject: x\n\nhi\n")
    synced, opened = _synced_and_opened(monkeypatch)
    store.add(f, record("Q1"))
    f.remove()
    message, record_file = _inode(store.message_path("Q1")), _inode(f"{store.records}/Q1.json")
    assert {message, record_file, _inode(store.messages), _inode(store.records)} <= set(synced)
    assert opened == [f"{store.records}/.Q1.tmp"]  # the record's temporary only
    synced.clear()
    opened.clear()
    rec = store.load().records[0]
    opened.clear()
    rec.recipients[0].state = DELIVERED
    store.save(rec)
    assert synced == [_inode(f"{store.records}/Q1.json"), _inode(store.records)]
    assert opened == [f"{store.records}/.Q1.tmp"]


def test_what_cannot_be_read_is_quarantined_and_orphans_removed(parts):
    store, spool = parts
    add(store, spool, "GOOD")
    add(store, spool, "NOMSG")
    os.unlink(store.message_path("NOMSG"))
    add(store, spool, "BAD")
    Path(store.records, "BAD.json").write_bytes(b"{not json")
    add(store, spool, "OLDVER")
    raw = json.loads(Path(store.records, "OLDVER.json").read_bytes())
    raw["version"] = 99
    Path(store.records, "OLDVER.json").write_text(json.dumps(raw))
    Path(store.messages, "ORPHAN").write_bytes(b"never acknowledged")
    Path(store.records, ".HALF.tmp").write_bytes(b"{")
    loaded = store.load()
    assert [r.id for r in loaded.records] == ["GOOD"]
    assert sorted(q.queue_id for q in loaded.quarantined) == ["BAD", "NOMSG", "OLDVER"]
    assert sorted(q.problem.split(":")[0] for q in loaded.quarantined) == [
        "json",
        "message",
        "version",
    ]
    assert loaded.orphans == 1
    assert sorted(os.listdir(store.quarantine_dir)) == [
        "BAD",
        "BAD.json",
        "NOMSG.json",
        "OLDVER",
        "OLDVER.json",
    ]
    assert sorted(os.listdir(store.messages)) == ["GOOD"]
    assert sorted(os.listdir(store.records)) == ["GOOD.json"]


def test_remove_takes_the_record_first(parts, monkeypatch):
    store, spool = parts
    add(store, spool)
    order = []
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p: (order.append(os.path.basename(p)), real(p)))
    store.remove("Q1")
    assert order == ["Q1.json", "Q1"]  # a crash between leaves an orphan, never a dangling record


# ------------------------------------------------------------- folder links


@pytest.mark.parametrize("folder", ["", "messages", "records", "quarantine"])
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-folder", "dangling"])
def test_a_queue_folder_that_is_a_link_is_refused(tmp_path: Path, folder: str, dangling: bool):
    """`.queue/messages` -> a folder elsewhere once had relayed mail written there."""
    root = tmp_path / "mail" / ".queue"
    outside = tmp_path / "outside"
    if not dangling:
        outside.mkdir()
    link = root / folder if folder else root
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(SymlinkRefused) as refused:
        QueueStore(root)
    assert refused.value.filename == str(link)
    assert str(refused.value) == f"a symbolic link, not followed: '{link}'"
    assert link.is_symlink()  # left as it is, and nothing made through it
    assert not dangling or not outside.exists()
    assert dangling or list(outside.iterdir()) == []


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-folder", "dangling"])
def test_a_spool_folder_that_is_a_link_is_refused(tmp_path: Path, dangling: bool):
    outside = tmp_path / "outside"
    if not dangling:
        outside.mkdir()
    link = tmp_path / ".spool"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(SymlinkRefused) as refused:
        Spool(link, UniqueNames("host"))
    assert refused.value.filename == str(link)
    assert not dangling or not outside.exists()
    assert dangling or list(outside.iterdir()) == []


def test_real_queue_folders_are_made_private(tmp_path: Path):
    store = QueueStore(tmp_path / "mail" / ".queue")
    for folder in (store.root, store.messages, store.records, store.quarantine_dir):
        assert os.lstat(folder).st_mode & 0o7777 == 0o700
    QueueStore(store.root)  # made before: taken as it is
