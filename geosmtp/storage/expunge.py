"""POP3's UPDATE, all or nothing: a roll-forward journal of the doomed messages.

Removing the messages a POP3 client deleted is many `unlink`s; a process
killed among them (`kill -9`, a crash, a power cut) would leave some gone and
some not, where RFC 1939 §6 and the client expect the maildrop as it was or
without all of them. So `expunge` first makes the decision durable:

1. write the list of doomed files to `geosmtp-pop3.expunge.tmp` in the Maildir
   (beside the lock file: Dovecot, Courier and mutt read only `tmp/`, `new/`,
   `cur/` and their own files there), fsync it;
2. rename it to `geosmtp-pop3.expunge` and fsync the Maildir: the commit
   point. Before it nothing is removed; after it everything will be;
3. unlink every doomed file, fsync `new/` and `cur/`;
4. remove the journal.

`finish_expunge` runs whenever a mailbox is opened (POP3 login, under the
maildrop lock, before the listing): a leftover journal is carried out (steps
3 and 4) and a leftover `.tmp` (a crash before the commit) removed. Replaying
is idempotent: a file already gone is done. A message another reader (Dovecot)
moved from `new/` to `cur/` or flagged since is found by its key (the name
before the `:2,` info), as the listing keys it.

The journal is `geosmtp-expunge 1\\n`, then each entry (`new/<name>` or
`cur/<name>`) followed by a NUL (no file name holds one), then `end\\n`. One
without its end line (a torn write the rename should make impossible) is no
decision: it is removed and nothing deleted.

Like the rest of `Maildir`'s read side, these block in the calling thread: the
caller offloads them. Errors are `StorageError`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from loguru import logger

from .errors import StorageError
from .maildir import FOLDER_FLAGS, MESSAGE_FLAGS, Maildir, StoredMessage, open_folder, open_nofollow
from .modes import PRIVATE_FILE_MODE

JOURNAL_NAME = "geosmtp-pop3.expunge"
JOURNAL_TMP = JOURNAL_NAME + ".tmp"
_MAGIC = b"geosmtp-expunge 1\n"
_END = b"end\n"
_FOLDERS = ("new", "cur")
#: A new journal: never through a link, never an existing file reused.
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class ExpungeIncomplete(StorageError):
    """The journal is durable but `failed` of its files could not be removed;
    it stays, and the next opening of the mailbox tries again."""

    def __init__(self, failed: int, total: int, filename: str) -> None:
        super().__init__(errno.EIO, f"{failed} of {total} messages not removed", filename)
        self.failed = failed


def encode(entries: Sequence[str]) -> bytes:
    """The journal's bytes for these entries (`new/<name>`, `cur/<name>`)."""
    body = b"".join(e.encode("utf-8", "surrogateescape") + b"\0" for e in entries)
    return _MAGIC + body + _END


def decode(data: bytes) -> list[str] | None:
    """The entries of a journal; None when it is not a whole one."""
    if not data.startswith(_MAGIC) or not data.endswith(_END):
        return None
    body = data[len(_MAGIC) : -len(_END)]
    if body and not body.endswith(b"\0"):
        return None
    entries = [e.decode("utf-8", "surrogateescape") for e in body.split(b"\0")[:-1]]
    for entry in entries:
        folder, _, name = entry.partition("/")
        if folder not in _FOLDERS or not name or "/" in name or name[0] == ".":
            return None
    return entries


def expunge(maildir: Maildir, messages: Sequence[StoredMessage], fsync: bool = True) -> None:
    """Remove `messages` from `maildir`, all or nothing across a crash.

    Raises `StorageError` before the commit point (nothing removed: the
    journal could not be written), `ExpungeIncomplete` after it when some
    files could not be removed (the journal stays for the next opening)."""
    if not messages:
        return
    path = str(maildir.path)
    box = _open_box(path)
    try:
        entries = [m.relpath for m in messages]
        try:  # what an earlier expunge could not remove stays decided
            earlier = decode(_read_journal(box) or b"") or []
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        _write_journal(box, encode([*dict.fromkeys(earlier + entries)]), fsync)
        _carry_out(path, box, fsync)
    finally:
        os.close(box)


def finish_expunge(maildir: Maildir, fsync: bool = True) -> int:
    """Carry out an expunge a crash left half done; how many files it removed.

    A `.tmp` journal (never committed) is removed: nothing of it is deleted
    (one that cannot be removed is logged, and the opening goes on). A
    Maildir that does not exist has nothing to finish."""
    path = str(maildir.path)
    try:
        box = _open_box(path)
    except StorageError as exc:
        if exc.errno == errno.ENOENT:
            return 0
        raise
    try:
        try:
            _unlink_entry(box, JOURNAL_TMP)
        except StorageError as exc:  # no decision: it cannot stop a login
            logger.warning("mailbox {}: cannot remove {}: {}", path, JOURNAL_TMP, exc)
        return _carry_out(path, box, fsync)
    finally:
        os.close(box)


# ------------------------------------------------------------------- steps


def _open_box(path: str) -> int:
    try:
        return open_nofollow(path, "", FOLDER_FLAGS)
    except OSError as exc:
        raise StorageError.wrap(exc) from exc


def _write_journal(box: int, data: bytes, fsync: bool) -> None:
    """Steps 1 and 2: the journal written, fsynced, renamed into place, the
    Maildir fsynced. On an error nothing is committed (the `.tmp` removed)."""
    try:
        fd = os.open(JOURNAL_TMP, _WRITE_FLAGS, PRIVATE_FILE_MODE, dir_fd=box)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(JOURNAL_TMP, JOURNAL_NAME, src_dir_fd=box, dst_dir_fd=box)
        if fsync:
            os.fsync(box)  # the commit point: from here on, everything goes
    except OSError as exc:
        _unlink_entry(box, JOURNAL_TMP)
        raise StorageError.wrap(exc) from exc


def _read_journal(box: int) -> bytes | None:
    try:
        fd = os.open(JOURNAL_NAME, MESSAGE_FLAGS, dir_fd=box)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        return f.read()


def _carry_out(path: str, box: int, fsync: bool) -> int:
    """Steps 3 and 4 for the journal in place, if any: how many files went."""
    try:
        data = _read_journal(box)
    except OSError as exc:
        raise StorageError.wrap(exc) from exc
    if data is None:
        return 0
    entries = decode(data)
    if entries is None:
        logger.warning(
            "mailbox {}: {} is not a whole journal: removed, nothing deleted", path, JOURNAL_NAME
        )
        _unlink_entry(box, JOURNAL_NAME)
        return 0
    removed, failed = _remove_all(path, entries, fsync)
    if failed:
        raise ExpungeIncomplete(failed, len(entries), f"{path}/{JOURNAL_NAME}")
    _unlink_entry(box, JOURNAL_NAME)
    return removed


def _remove_all(path: str, entries: list[str], fsync: bool) -> tuple[int, int]:
    """Unlink every entry (by its key when it moved meanwhile); fsync the
    folders. (removed, failed): an entry already gone is neither."""
    keys = {entry.partition("/")[2].partition(":")[0] for entry in entries}
    removed = failed = 0
    for folder in _FOLDERS:
        try:
            fd = open_folder(path, folder)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.error("mailbox {}: cannot open {}/: {}", path, folder, exc)
            failed += 1
            continue
        try:
            gone, errors = _remove_keys(path, folder, fd, keys, fsync)
        finally:
            os.close(fd)
        removed += gone
        failed += errors
    return removed, failed


def _remove_keys(path: str, folder: str, fd: int, keys: set[str], fsync: bool) -> tuple[int, int]:
    """Unlink, in the folder `fd`, each name whose key is doomed (the name
    the journal gives, or the same message moved or flagged since)."""
    removed = failed = 0
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it if e.name.partition(":")[0] in keys]
        for name in names:
            try:
                os.unlink(name, dir_fd=fd)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.error("mailbox {}: cannot remove {}/{}: {}", path, folder, name, exc)
                failed += 1
        if fsync and names:
            os.fsync(fd)
    except OSError as exc:
        logger.error("mailbox {}: cannot expunge in {}/: {}", path, folder, exc)
        failed += 1
    return removed, failed


def _unlink_entry(box: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=box)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError.wrap(exc) from exc
