"""Maildir delivery: spool once, fsync, link into every recipient's `new/`.

A message is written to `tmp/` of its first recipient's Maildir while it
arrives, then (on `commit`) flushed and fsynced, hard-linked into `new/` of
every recipient (copied where a link is impossible), the `new/` folders
fsynced, and the spool name removed. Only after `commit` returns may the
client be told `250`. Nothing in `new/` is ever partial: a link appears whole
or not at all, and a failed commit removes the links it made.

Blocking calls that can take long (fsync) go through `offload`, which the
gevent shell sets to its threadpool so one slow disk does not stall the hub.
`offload` must run the work to its end even when its caller is interrupted
(the shell's `threads.in_thread` does): a commit that fails or is stopped
undoes its links only once the thread that makes them is done.

Errors are `StorageError`, never a bare `OSError`, so the shell can tell a
full disk from a lost client.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..mail import safe_mailbox_name

Offload = Callable[..., Any]


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class StorageError(Exception):
    """Spooling or delivery failed; the message is not stored anywhere.

    Deliberately not an `OSError`: the session treats socket errors as a lost
    client, and a full disk must never be mistaken for one (the client gets a
    `452`/`451` instead). `errno` says which, `no_space` whether it is a
    matter of room (disk or quota full).
    """

    def __init__(self, errno_: int | None, message: str, filename: str | None = None) -> None:
        super().__init__(message if filename is None else f"{message}: '{filename}'")
        self.errno = errno_
        self.filename = filename

    @classmethod
    def wrap(cls, exc: OSError) -> StorageError:
        return cls(exc.errno, exc.strerror or str(exc), exc.filename)

    @property
    def no_space(self) -> bool:
        return self.errno in _NO_SPACE


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


FILE_MODE = 0o600  # mail is private to the server's user, as Postfix and Dovecot keep it
DIR_MODE = 0o700
_SPOOL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_WRITE_BUFFER = 64 * 1024


def _fsync_path(path: str, directory: bool = True) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A message being received: a file in some Maildir's `tmp/`.

    Small writes are gathered up to 64 KiB before they reach the file, so a
    short message is one `write` however the client cut it.
    """

    def __init__(self, store: MaildirStore, path: str, name: str) -> None:
        self.store = store
        self.path = path
        self.name = name
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._fd: int | None = os.open(path, _SPOOL_FLAGS, FILE_MODE)

    def write(self, data: bytes) -> None:
        """Take a piece of the message; StorageError when the disk refuses it."""
        self._pending.append(data)
        self._pending_size += len(data)
        self.size += len(data)
        if self._pending_size >= _WRITE_BUFFER:
            try:
                self._write_pending()
            except OSError as exc:
                raise StorageError.wrap(exc) from exc

    def _write_pending(self) -> None:
        assert self._fd is not None
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        self._pending_size = 0
        while data:
            data = data[os.write(self._fd, data) :]

    def commit(self, boxes: Iterable[str]) -> list[Path]:
        """Make the message durable in each mailbox; return the paths in `new/`."""
        assert self._fd is not None
        store = self.store
        made: list[str] = []
        try:
            self._write_pending()
            maildirs = [store.ensure_maildir(box) for box in dict.fromkeys(boxes)]
            if store.fsync:
                # One trip to the threadpool: fsync, the links, fsync of new/.
                store.offload(self._make_durable, maildirs, made)
            else:
                self._link_all(maildirs, made)
            os.close(self._fd)
            self._fd = None
        except BaseException as exc:
            # Also when the session is killed mid-commit (server stop): the client
            # was not told 250, so no mailbox may keep the message.
            for path in made:
                _unlink_quietly(path)
            self.discard()
            if isinstance(exc, OSError):
                raise StorageError.wrap(exc) from exc
            raise
        _unlink_quietly(self.path)
        return [Path(p) for p in made]

    def _make_durable(self, maildirs: list[str], made: list[str]) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        self._link_all(maildirs, made)
        for maildir in maildirs:
            _fsync_path(maildir + "/new")

    def _link_all(self, maildirs: list[str], made: list[str]) -> None:
        for maildir in maildirs:
            target = f"{maildir}/new/{self.name}"
            try:
                self._place(target, maildir)
            except FileNotFoundError:
                if not os.path.exists(self.path):
                    raise
                # The Maildir was removed while the server ran: make it again.
                self.store.make_maildir(maildir)
                self._place(target, maildir)
            made.append(target)

    def _place(self, target: str, maildir: str) -> None:
        try:
            os.link(self.path, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
        # A hard link is impossible here: copy through this Maildir's tmp/.
        tmp = f"{maildir}/tmp/{self.store.unique_name()}"
        shutil.copyfile(self.path, tmp)
        try:
            os.chmod(tmp, FILE_MODE)
            if self.store.fsync:
                _fsync_path(tmp, False)
            os.rename(tmp, target)
        except OSError:
            _unlink_quietly(tmp)
            raise

    def discard(self) -> None:
        """Drop the message (aborted, too big, client gone): remove the spool file."""
        self._pending.clear()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        _unlink_quietly(self.path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class MaildirStore:
    """The mail directory: one Maildir per mailbox name, `root/<name>/{tmp,new,cur}`."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        hostname: str | None = None,
        offload: Offload = _direct,
    ) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.offload = offload
        # Maildir names carry the host; '/' and ':' are escaped as the spec says.
        host = hostname or socket.gethostname()
        self._host = host.replace("/", r"\057").replace(":", r"\072")
        self._counter = itertools.count(1)
        self._pid = os.getpid()
        self._known: dict[str, str] = {}  # mailbox name -> its Maildir, checked and made
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)

    def unique_name(self) -> str:
        """`<sec>.M<usec>P<pid>Q<n>.<host>`, the modern Maildir convention."""
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{self._pid}Q{next(self._counter)}.{self._host}"

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

    def open_spool(self, first_box: str) -> Spool:
        """A new spool file for a message; StorageError when it cannot be made."""
        try:
            maildir = self.ensure_maildir(first_box)
            name = self.unique_name()
            try:
                return Spool(self, f"{maildir}/tmp/{name}", name)
            except FileNotFoundError:
                # The Maildir was removed while the server ran: make it again.
                self.make_maildir(maildir)
                return Spool(self, f"{maildir}/tmp/{name}", name)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc

    def deliver(self, boxes: Iterable[str], data: bytes) -> list[Path]:
        """Store a whole message at once (for callers that have it in memory)."""
        boxes = list(boxes)
        spool = self.open_spool(boxes[0])
        try:
            spool.write(data)
        except StorageError:
            spool.discard()
            raise
        return spool.commit(boxes)
