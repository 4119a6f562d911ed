"""POP3's UPDATE all or nothing (`storage.expunge`): the journal, its replay,
and a process that dies at every step of an expunge."""

import errno
import os
import signal
from pathlib import Path

import pytest

from geosmtp.storage import StorageError
from geosmtp.storage import expunge as ex
from geosmtp.storage.maildir import Maildir, make_maildir


def filled(tmp_path: Path, new: int = 3, cur: int = 3) -> Maildir:
    """A Maildir with `new` messages in new/ and `cur` seen ones in cur/."""
    path = tmp_path / "box"
    make_maildir(str(path))
    for i in range(new):
        (path / "new" / f"{1000 + i}.M1P1Q{i}.host,S=5,W=6").write_bytes(b"new \n")
    for i in range(cur):
        (path / "cur" / f"{2000 + i}.M1P1Q{i}.host,S=5,W=6:2,S").write_bytes(b"cur \n")
    return Maildir(path)


def keys(maildir: Maildir) -> set[str]:
    return {m.key for m in maildir.list()}


def journals(maildir: Maildir) -> list[str]:
    return sorted(p.name for p in maildir.path.iterdir() if p.name.startswith(ex.JOURNAL_NAME))


def test_expunge_removes_the_doomed_and_nothing_else(tmp_path):
    box = filled(tmp_path)
    messages = box.list()
    doomed, kept = messages[::2], messages[1::2]
    ex.expunge(box, doomed)
    assert keys(box) == {m.key for m in kept}
    assert journals(box) == []


def test_the_journal_lists_entries_and_ends_with_its_end_line():
    data = ex.encode(["new/a,S=1", "cur/b:2,S"])
    assert data == b"geosmtp-expunge 1\nnew/a,S=1\0cur/b:2,S\0end\n"
    assert ex.decode(data) == ["new/a,S=1", "cur/b:2,S"]
    assert ex.decode(ex.encode([])) == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"geosmtp-expunge 1\nnew/a\0",  # torn: no end line
        b"geosmtp-expunge 1\nnew/a\0cur/b",  # torn in an entry
        b"geosmtp-expunge 2\nnew/a\0end\n",  # another format
        b"geosmtp-expunge 1\ntmp/a\0end\n",  # not new/ or cur/
        b"geosmtp-expunge 1\nnew/../../x\0end\n",  # a path, not a name
        b"geosmtp-expunge 1\ncur/.hidden\0end\n",
    ],
)
def test_a_journal_that_is_not_whole_decides_nothing(tmp_path, data):
    box = filled(tmp_path)
    before = keys(box)
    assert ex.decode(data) is None
    (box.path / ex.JOURNAL_NAME).write_bytes(data)
    assert ex.finish_expunge(box) == 0
    assert keys(box) == before
    assert journals(box) == []


def test_a_leftover_journal_is_carried_out(tmp_path):
    """The crash after the commit point, before any unlink."""
    box = filled(tmp_path)
    messages = box.list()
    (box.path / ex.JOURNAL_NAME).write_bytes(ex.encode([m.relpath for m in messages[:4]]))
    assert ex.finish_expunge(box) == 4
    assert keys(box) == {m.key for m in messages[4:]}
    assert journals(box) == []


def test_a_half_carried_out_journal_is_finished(tmp_path):
    """The crash among the unlinks, and after them before the journal went."""
    box = filled(tmp_path)
    messages = box.list()
    (box.path / ex.JOURNAL_NAME).write_bytes(ex.encode([m.relpath for m in messages]))
    os.unlink(box.path / messages[0].relpath)
    os.unlink(box.path / messages[4].relpath)
    assert ex.finish_expunge(box) == 4
    assert keys(box) == set()
    # All gone already: only the journal is left to remove.
    (box.path / ex.JOURNAL_NAME).write_bytes(ex.encode([m.relpath for m in messages]))
    assert ex.finish_expunge(box) == 0
    assert journals(box) == []


def test_an_uncommitted_journal_is_dropped_and_nothing_deleted(tmp_path):
    """The crash before the rename: the `.tmp` is no decision."""
    box = filled(tmp_path)
    before = keys(box)
    (box.path / ex.JOURNAL_TMP).write_bytes(ex.encode([m.relpath for m in box.list()]))
    assert ex.finish_expunge(box) == 0
    assert keys(box) == before
    assert journals(box) == []


def test_a_message_moved_since_is_found_by_its_key(tmp_path):
    """Dovecot moved a doomed message from new/ to cur/ before the replay."""
    box = filled(tmp_path, new=1, cur=1)
    moving, other = box.list()
    (box.path / ex.JOURNAL_NAME).write_bytes(ex.encode([moving.relpath]))
    box.set_flags(moving, "S")
    assert ex.finish_expunge(box) == 1
    assert keys(box) == {other.key}


def test_finishing_a_maildir_that_does_not_exist_does_nothing(tmp_path):
    assert ex.finish_expunge(Maildir(tmp_path / "nobody")) == 0


def test_a_journal_that_cannot_be_written_removes_nothing(tmp_path, monkeypatch):
    box = filled(tmp_path)
    before = keys(box)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex.os, "rename", full)
    with pytest.raises(StorageError) as raised:
        ex.expunge(box, box.list())
    assert raised.value.no_space
    monkeypatch.undo()
    assert keys(box) == before
    assert journals(box) == []  # the .tmp removed too


def test_a_file_that_cannot_be_removed_keeps_the_journal_for_the_next_opening(
    tmp_path, monkeypatch
):
    box = filled(tmp_path)
    messages = box.list()
    stuck = messages[2].filename
    unlink = os.unlink

    def refuse(name, *args, **kwargs):
        if name == stuck:
            raise PermissionError(errno.EACCES, "Permission denied")
        return unlink(name, *args, **kwargs)

    monkeypatch.setattr(ex.os, "unlink", refuse)
    with pytest.raises(ex.ExpungeIncomplete) as raised:
        ex.expunge(box, messages)
    assert raised.value.failed == 1
    monkeypatch.undo()
    assert keys(box) == {messages[2].key}
    assert journals(box) == [ex.JOURNAL_NAME]
    assert ex.finish_expunge(box) == 1  # the next login finishes it
    assert keys(box) == set() and journals(box) == []


def test_an_expunge_keeps_what_an_earlier_one_left_undone(tmp_path):
    box = filled(tmp_path)
    messages = box.list()
    (box.path / ex.JOURNAL_NAME).write_bytes(ex.encode([messages[0].relpath]))
    ex.expunge(box, messages[1:3])  # the earlier journal's entry goes too
    assert keys(box) == {m.key for m in messages[3:]}
    assert journals(box) == []


# --------------------------------------------- a process dies at every step

#: The calls of an expunge, in order: a child process dies at the n-th.
STEPS = ("write", "fsync", "rename", "unlink")


def crash_at(box: Maildir, doomed: list, n: int) -> bool:
    """Run `expunge` in a child that SIGKILLs itself at the n-th of its file
    calls (`STEPS`); whether it got that far (else it finished)."""
    pid = os.fork()
    if pid == 0:  # the child: count the calls, die at the n-th
        calls = [0]

        def dying(real):  # type: ignore[no-untyped-def]
            def call(*args, **kwargs):  # type: ignore[no-untyped-def]
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            return call

        for name in STEPS:
            setattr(os, name, dying(getattr(os, name)))
        try:
            ex.expunge(box, doomed)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def test_a_kill_at_any_step_leaves_all_or_nothing_after_the_next_opening(tmp_path):
    seen = {"nothing": 0, "all": 0}
    n = 1
    while True:
        root = tmp_path / str(n)
        root.mkdir()
        box = filled(root)
        messages = box.list()
        doomed, kept = messages[1:5], [messages[0], messages[5]]
        killed = crash_at(box, doomed, n)
        committed = (box.path / ex.JOURNAL_NAME).exists()
        ex.finish_expunge(box)
        left = keys(box)
        assert {m.key for m in kept} <= left, n  # never a message not deleted
        doomed_left = {m.key for m in doomed} & left
        assert doomed_left in (set(), {m.key for m in doomed}), (n, doomed_left)
        if committed:
            assert not doomed_left, n  # once the journal is in place, all go
        seen["all" if not doomed_left else "nothing"] += 1
        assert journals(box) == []
        if not killed:
            assert not doomed_left
            break
        n += 1
        assert n < 50
    # Killed before the commit (write, fsync, rename) and after it (each unlink).
    assert seen["nothing"] >= 3 and seen["all"] >= len(doomed) + 1, seen


def test_a_tmp_journal_that_cannot_be_removed_stops_no_opening(tmp_path):
    box = filled(tmp_path)
    (box.path / ex.JOURNAL_TMP).mkdir()  # not a file: unlink fails
    assert ex.finish_expunge(box) == 0
    with pytest.raises(StorageError):  # and no expunge can commit
        ex.expunge(box, box.list())
    assert len(keys(box)) == 6
