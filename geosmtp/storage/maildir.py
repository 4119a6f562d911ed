"""Maildir: deliver a spooled message into every recipient's `new/`, and read
mailboxes back (the read side POP3 uses).

Delivery (`MaildirStore.deliver`): fsync the spool file, hard-link it into
`new/` of every recipient (copied through that Maildir's `tmp/` where a link
is impossible), fsync the `new/` folders. Only after it returns may the client
be told `250`. Nothing in `new/` is ever partial: a link appears whole or not
at all, and a failed delivery removes the links it made.

Blocking calls that can take long (fsync) go through `offload`, which the
gevent shell sets to its threadpool so one slow disk does not stall the hub.
`offload` must run the work to its end even when its caller is interrupted
(the shell's `threads.in_thread` does): a delivery that fails or is stopped
undoes its links only once the thread that makes them is done.

Errors are `StorageError`, never a bare `OSError`, so the shell can tell a
full disk from a lost client. Mailbox names are checked here again
(`safe_mailbox_name(box) == box`): no name from the network reaches the
filesystem unchecked, whoever calls.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..mail import safe_mailbox_name
from .errors import StorageError
from .spool import DIR_MODE, FILE_MODE, SpoolFile, UniqueNames
from .spool import fsync_path as _fsync_path
from .spool import unlink_quietly as _unlink_quietly

Offload = Callable[..., Any]


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


_CANNOT_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)


@dataclass
class Delivery:
    """The files one delivery made durable (in `new/` folders, or the queue), so
    it can be taken back until the whole message is delivered everywhere."""

    paths: list[str]
    #: Called once every destination has the message (the queue starts work).
    on_commit: Callable[[], None] | None = None

    def commit(self) -> None:
        if self.on_commit is not None:
            self.on_commit()

    def undo(self) -> None:
        """Remove them again: a later destination failed, so no one may keep it."""
        for path in self.paths:
            _unlink_quietly(path)
        self.paths = []


class MaildirStore:
    """The mail directory: one Maildir per mailbox name, `root/<name>/{tmp,new,cur}`."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        names: UniqueNames | None = None,
        offload: Offload = _direct,
    ) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.offload = offload
        self.names = names or UniqueNames()
        #: False when the spool is on another filesystem: copy instead of link.
        self.link = True
        self._known: dict[str, str] = {}  # mailbox name -> its Maildir, checked and made
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc

    # ------------------------------------------------------------ names

    def mailbox_path(self, box: str) -> Path:
        """The Maildir of `box`; refuses any name that is not a safe directory name."""
        if safe_mailbox_name(box) != box:
            raise StorageError(errno.EINVAL, f"unsafe mailbox name {box!r}")
        path = self.root / box
        if path.parent != self.root:
            raise StorageError(errno.EINVAL, f"mailbox {box!r} escapes the mail directory")
        return path

    def ensure_maildir(self, box: str) -> str:
        """The Maildir of `box` (a path string), checked and created the first time."""
        maildir = self._known.get(box)
        if maildir is None:
            maildir = str(self.mailbox_path(box))
            self.make_maildir(maildir)
            self._known[box] = maildir
        return maildir

    def make_maildir(self, maildir: str) -> None:
        created = not os.path.isdir(maildir)
        # makedirs gives `mode` only to the last folder: make each level itself.
        os.makedirs(maildir, mode=DIR_MODE, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(f"{maildir}/{sub}", mode=DIR_MODE, exist_ok=True)
        if created and self.fsync:
            self.offload(_fsync_path, str(self.root))

    # ------------------------------------------------------------ write

    def deliver(self, spool: SpoolFile, boxes: Iterable[str]) -> Delivery:
        """Make the spooled message durable in each mailbox's `new/`.

        All or nothing: on any error, and when the caller is stopped half-way,
        every link made is removed again before the exception goes on.
        """
        made: list[str] = []
        try:
            spool.flush()
            maildirs = [self.ensure_maildir(box) for box in dict.fromkeys(boxes)]
            if self.fsync:
                # One trip to the threadpool: the file's fsync, the links, new/'s fsync.
                self.offload(self._make_durable, spool, maildirs, made)
            else:
                self._place_all(spool, maildirs, made)
        except BaseException as exc:
            # Also when the session is killed mid-delivery (server stop): the client
            # was not told 250, so no mailbox may keep the message.
            Delivery(made).undo()
            if isinstance(exc, OSError):
                raise StorageError.wrap(exc) from exc
            raise
        return Delivery(made)

    def _make_durable(self, spool: SpoolFile, maildirs: list[str], made: list[str]) -> None:
        spool.fsync()
        self._place_all(spool, maildirs, made)
        for maildir in maildirs:
            _fsync_path(maildir + "/new")

    def _place_all(self, spool: SpoolFile, maildirs: list[str], made: list[str]) -> None:
        for maildir in maildirs:
            target = f"{maildir}/new/{spool.name}"
            try:
                self._place(spool, target, maildir)
            except FileNotFoundError:
                if not os.path.exists(spool.path):
                    raise
                # The Maildir was removed while the server ran: make it again.
                self.make_maildir(maildir)
                self._place(spool, target, maildir)
            made.append(target)

    def _place(self, spool: SpoolFile, target: str, maildir: str) -> None:
        if self.link:
            try:
                os.link(spool.path, target)
                return
            except OSError as exc:
                if exc.errno not in _CANNOT_LINK:
                    raise
        # A hard link is impossible here: copy through this Maildir's tmp/.
        tmp = f"{maildir}/tmp/{self.names()}"
        shutil.copyfile(spool.path, tmp)
        try:
            os.chmod(tmp, FILE_MODE)
            if self.fsync:
                _fsync_path(tmp, False)
            os.rename(tmp, target)
        except OSError:
            _unlink_quietly(tmp)
            raise

    # ------------------------------------------------------------- read

    def maildir(self, box: str) -> Maildir:
        """The read side of `box`'s Maildir (which may not exist yet: it is empty)."""
        return Maildir(self.mailbox_path(box))


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message in a Maildir, as listed."""

    key: str  # the unique name, without the ":2,..." info: stable across new/ -> cur/
    subdir: str  # "new" or "cur"
    filename: str  # the name in its folder (key plus info in cur/)
    size: int  # octets on disk (LF line ends)
    flags: str  # the Maildir info flags ("S" seen, "T" trashed, ...), sorted

    @property
    def relpath(self) -> str:
        return f"{self.subdir}/{self.filename}"


class Maildir:
    """Read side of one Maildir: list, open, flag (new/ -> cur/), delete.

    Follows maildir(5) as Dovecot and mutt use it: `tmp/` is never read;
    `cur/` names carry `:2,<flags>`; the part before the colon is the key.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def list(self) -> list[StoredMessage]:
        """Every message in `new/` and `cur/`, oldest delivery first."""
        out = []
        for subdir in ("new", "cur"):
            try:
                entries = list(os.scandir(self.path / subdir))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                key, _, info = entry.name.partition(":")
                flags = "".join(sorted(info[2:])) if info.startswith("2,") else ""
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:  # removed meanwhile
                    continue
                out.append(StoredMessage(key, subdir, entry.name, size, flags))
        out.sort(key=lambda m: _delivery_order(m.key))
        return out

    def __iter__(self) -> Iterator[StoredMessage]:
        return iter(self.list())

    def open(self, message: StoredMessage) -> BinaryIO:
        """The message's bytes (a file object, read in pieces: never whole in memory)."""
        try:
            return open(self.path / message.relpath, "rb")  # the caller closes it
        except OSError as exc:
            raise StorageError.wrap(exc) from exc

    def set_flags(self, message: StoredMessage, flags: str) -> StoredMessage:
        """Give the message these flags; a message in `new/` moves to `cur/` (seen by
        a client), as maildir(5) asks."""
        flags = "".join(sorted(set(flags)))
        filename = f"{message.key}:2,{flags}"
        if message.subdir == "cur" and message.filename == filename:
            return message
        try:
            os.rename(self.path / message.relpath, self.path / "cur" / filename)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        return StoredMessage(message.key, "cur", filename, message.size, flags)

    def delete(self, message: StoredMessage) -> None:
        try:
            os.unlink(self.path / message.relpath)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError.wrap(exc) from exc


def _delivery_order(key: str) -> tuple[int, int, str]:
    """`<sec>.M<usec>P...` sorts by time; any other name after, by name."""
    sec, _, rest = key.partition(".")
    usec = rest[1:].split("P", 1)[0] if rest.startswith("M") else ""
    if sec.isdigit() and usec.isdigit():
        return int(sec), int(usec), key
    return 1 << 62, 0, key
