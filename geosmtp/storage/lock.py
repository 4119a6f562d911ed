"""The maildrop lock: one POP3 session at a time per Maildir, across processes.

`fcntl.flock(LOCK_EX | LOCK_NB)` on `<maildir>/geosmtp-pop3.lock`. A flock
belongs to the open file description, so two sessions in one process conflict
just as two processes do (a POSIX `fcntl` lock would not: it is per process),
and the kernel drops it when the holder's descriptor closes, however the
process ends (`kill -9` included): no stale lock to clean up. The file itself
stays; its presence means nothing.

The lock is advisory and geosmtp's own: Dovecot, sharing the Maildir, keeps its
own locks and does not see this one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from .errors import MaildropBusy, StorageError
from .modes import PRIVATE_FILE_MODE

LOCK_NAME = "geosmtp-pop3.lock"
# O_NOFOLLOW: a symlink planted in the Maildir never makes us create a file elsewhere.
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


class MaildropLock:
    """An exclusive, non-blocking lock on one maildrop.

    `acquire()` raises `MaildropBusy` when someone else holds it, another
    `StorageError` when the file cannot be made. `release()` may be called any
    number of times; as a context manager it is released on every way out.
    """

    __slots__ = ("_fd", "path")

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, dir_fd: int | None = None) -> MaildropLock:
        """Take the lock; `dir_fd`: the descriptor of the folder that holds the
        file, opened by its name there (the Maildir as checked, `Maildir.lock`)."""
        if self._fd is not None:
            return self
        name = self.path if dir_fd is None else os.path.basename(self.path)
        try:
            fd = os.open(name, _LOCK_FLAGS, PRIVATE_FILE_MODE, dir_fd=dir_fd)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MaildropBusy(self.path) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError.wrap(exc) from exc
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the next session in (closing the descriptor drops the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> MaildropLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A lock object dropped without release() (a bug, not a path) still lets go.
        self.release()
