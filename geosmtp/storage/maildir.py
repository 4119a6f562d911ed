"""Maildir delivery: spool once, fsync, link into every recipient's `new/`.

A message is written to `tmp/` of its first recipient's Maildir while it
arrives, then (on `commit`) flushed and fsynced, hard-linked into `new/` of
every recipient (copied where a link is impossible), the `new/` folders
fsynced, and the spool name removed. Only after `commit` returns may the
client be told `250`. Nothing in `new/` is ever partial: a link appears whole
or not at all, and a failed commit removes the links it made.

Blocking calls that can take long (fsync) go through `offload`, which the
gevent shell sets to its threadpool so one slow disk does not stall the hub.
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
from typing import Any, BinaryIO

from ..smtp.policy import safe_mailbox_name

Offload = Callable[..., Any]


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class StorageError(OSError):
    """Delivery failed; the message is not stored anywhere."""


def _fsync_path(path: Path, directory: bool = True) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(paths: Iterable[Path]) -> None:
    for path in paths:
        _fsync_path(path)


class Spool:
    """A message being received: an open file in some Maildir's `tmp/`."""

    def __init__(self, store: MaildirStore, path: Path, name: str) -> None:
        self.store = store
        self.path = path
        self.name = name
        self.size = 0
        self._file: BinaryIO | None = open(path, "xb", buffering=256 * 1024)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self.size += len(data)

    def commit(self, boxes: Iterable[str]) -> list[Path]:
        """Make the message durable in each mailbox; return the paths in `new/`."""
        assert self._file is not None
        store = self.store
        made: list[Path] = []
        try:
            self._file.flush()
            if store.fsync:
                store.offload(os.fsync, self._file.fileno())
            self._file.close()
            self._file = None
            new_dirs = []
            for box in dict.fromkeys(boxes):  # each mailbox once, in order
                maildir = store.ensure_maildir(box)
                target = maildir / "new" / self.name
                try:
                    self._place(target, maildir)
                except FileNotFoundError:
                    if not self.path.exists():
                        raise
                    # The Maildir was removed while the server ran: make it again.
                    maildir = store.ensure_maildir(box, check=True)
                    self._place(target, maildir)
                made.append(target)
                new_dirs.append(maildir / "new")
            if store.fsync:
                store.offload(_fsync_dirs, new_dirs)
        except BaseException as exc:
            # Also when the session is killed mid-commit (server stop): the client
            # was not told 250, so no mailbox may keep the message.
            for path in made:
                _unlink_quietly(path)
            self.discard()
            if isinstance(exc, OSError):
                raise StorageError(exc.errno, exc.strerror or str(exc), exc.filename) from exc
            raise
        _unlink_quietly(self.path)
        return made

    def _place(self, target: Path, maildir: Path) -> None:
        try:
            os.link(self.path, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
        # A hard link is impossible here: copy through this Maildir's tmp/.
        tmp = maildir / "tmp" / self.store.unique_name()
        shutil.copyfile(self.path, tmp)
        try:
            if self.store.fsync:
                self.store.offload(_fsync_path, tmp, False)
            os.rename(tmp, target)
        except OSError:
            _unlink_quietly(tmp)
            raise

    def discard(self) -> None:
        """Drop the message (aborted, too big, client gone): remove the spool file."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        _unlink_quietly(self.path)


def _unlink_quietly(path: Path) -> None:
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
        self._known: set[str] = set()
        self.root.mkdir(parents=True, exist_ok=True)

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

    def ensure_maildir(self, box: str, *, check: bool = False) -> Path:
        """The Maildir of `box`, created if needed (`check`: even if made before)."""
        path = self.mailbox_path(box)
        if check or box not in self._known:
            created = not path.exists()
            for sub in ("tmp", "new", "cur"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            if created and self.fsync:
                self.offload(_fsync_dirs, [path, self.root])
            self._known.add(box)
        return path

    def open_spool(self, first_box: str) -> Spool:
        maildir = self.ensure_maildir(first_box)
        name = self.unique_name()
        try:
            return Spool(self, maildir / "tmp" / name, name)
        except FileNotFoundError:
            # The Maildir was removed while the server ran: make it again.
            maildir = self.ensure_maildir(first_box, check=True)
            return Spool(self, maildir / "tmp" / name, name)

    def deliver(self, boxes: Iterable[str], data: bytes) -> list[Path]:
        """Store a whole message at once (for callers that have it in memory)."""
        boxes = list(boxes)
        spool = self.open_spool(boxes[0])
        try:
            spool.write(data)
        except OSError:
            spool.discard()
            raise
        return spool.commit(boxes)
