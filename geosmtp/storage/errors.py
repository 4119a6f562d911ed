"""The one error type of the storage layer (spool, Maildir, the queue), the
one case a caller must tell apart (a maildrop another session holds), and
the refusal of a symbolic link (in a Maildir, as the spool or a queue folder)."""

from __future__ import annotations

import errno

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


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


class MaildropBusy(StorageError):
    """The maildrop is locked by another session, in this process or another
    (POP3 answers `-ERR [IN-USE]`, RFC 2449 §8.1.2)."""

    def __init__(self, filename: str) -> None:
        super().__init__(errno.EWOULDBLOCK, "the maildrop is in use", filename)


class SymlinkRefused(StorageError):
    """A Maildir, one of its folders or a message is a symbolic link: never
    followed (it could lead delivery, RETR or DELE out of `mail_dir`). A
    temporary failure like any other storage error: SMTP answers `451`, a
    POP3 login `-ERR [SYS/TEMP]`, until an operator puts it right. The spool's
    or the queue's folders as a link stop the start (`modes.make_real_folder`)."""

    def __init__(self, filename: str) -> None:
        super().__init__(errno.ELOOP, "a symbolic link, not followed", filename)
