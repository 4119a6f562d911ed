"""The spool: where a message is written, once, while it arrives.

A folder of its own (`spool_dir`, by default `mail_dir/.spool`: no mailbox
name can start with a dot), on the same filesystem as the Maildirs so that
delivery is a hard link. A spool file belongs to no mailbox: a message for
remote recipients only (the outbound queue) is spooled the same way.

The folder is private (0700), and never reached through a symbolic link
(`modes.make_real_folder`: a link would have each message written
elsewhere). The file is 0640, since the same inode is linked into `new/`
where a Maildir reader in the group reads it (see `modes`), and written
through a raw descriptor, small writes gathered up to 64 KiB, so a short
message is one `write` however the client cut it. It is made durable
(`fsync`) by whoever keeps it (Maildir delivery, the queue), in the same
threadpool trip as their own file work.

While it is written the file counts its POP3 size as well (`vsize`: line ends
as CRLF, RFC 1939 §11), so Maildir delivery can put it in the file name and
no POP3 login ever reads a message to know its size.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import StorageError
from .modes import MESSAGE_MODE, PRIVATE_DIR_MODE, make_folder, make_real_folder

#: The spool folder's mode (the CLI makes `spool_dir` with it too).
DIR_MODE = PRIVATE_DIR_MODE
_SPOOL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_WRITE_BUFFER = 64 * 1024
#: A spool file this old belongs to no live session (a crash left it): removed
#: at start, as Maildir readers treat tmp/ files (maildir(5): 36 hours).
STALE_AFTER = 36 * 3600


def fsync_path(path: str, directory: bool = True) -> None:
    """fsync a folder (after names in it changed) or a file, by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lone_lfs(data: bytes, after_cr: bool = False) -> int:
    """How many LFs in `data` are not preceded by a CR (`after_cr`: the byte
    before `data` was one): what a CRLF wire form adds to the stored size.

    The rule of the POP3 encoder (and Dovecot's): a LF alone becomes CRLF, a
    CRLF stays, a CR alone stays. `bytes.count`, no loop in Python; the CRLFs
    are counted only when there is a CR at all (`find` is a memchr), which in
    the SMTP spool, where the core stores line ends as LF, is rare.
    """
    n = data.count(b"\n")
    if data.find(b"\r") >= 0:
        n -= data.count(b"\r\n")
    if after_cr and data[:1] == b"\n":
        n -= 1
    return n


def read_return_path(message: BinaryIO) -> bytes:
    """The `Return-Path:` line a spooled message starts with, read past; or b""
    with `message` back at its start when it has none.

    Messages are spooled with the Return-Path that final delivery into a
    Maildir needs (RFC 5321 §4.4); what relays or filters the message reads
    it from the line after.
    """
    start = message.tell()
    first = message.readline(8192)
    if first.lower().startswith(b"return-path:"):
        return first
    message.seek(start)
    return b""


#: The longest header line read whole when looking for `Return-Path:` fields.
_HEADER_LINE_LIMIT = 1024 * 1024


def _is_return_path(line: bytes) -> bool:
    """A header line that starts a `Return-Path:` field (white space may come
    before the colon, RFC 5322 §4.5.3)."""
    name, colon, _ = line.partition(b":")
    return bool(colon) and name.rstrip(b" \t").lower() == b"return-path"


def without_return_paths(spool: Spool, message: SpoolFile) -> SpoolFile | None:
    """`message` (flushed) without the `Return-Path:` fields a client or a
    filter wrote into its header section, as a new spool file; None when it
    has none (the usual case: nothing is written). The server's own first
    line is kept: a local copy has exactly one Return-Path, the envelope's
    (RFC 5321 §4.4; Postfix's cleanup removes the others too), and the relay,
    which skips that line, passes none on. Blocking file work; StorageError."""
    try:
        with open(message.path, "rb") as f:
            ours = read_return_path(f)
            start = f.tell()
            if not any(_is_return_path(line) for line in _header_lines(f)):
                return None
            f.seek(start)
            new = spool.open()
            try:
                new.write(ours)
                dropping = False
                for line in _header_lines(f):
                    if line[:1] not in (b" ", b"\t"):
                        dropping = _is_return_path(line)
                    if not dropping:
                        new.write(line)
                new.append_file(message.path, f.tell())
                new.flush()
            except BaseException:
                new.remove()
                raise
    except OSError as exc:
        raise StorageError.wrap(exc) from exc
    return new


def _header_lines(f: BinaryIO) -> Iterator[bytes]:
    """The header section's lines from where `f` stands, the empty line that
    ends it included (the body starts where `f` stands after it)."""
    while line := f.readline(_HEADER_LINE_LIMIT):
        yield line
        if line in (b"\n", b"\r\n"):
            return


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class UniqueNames:
    """`<sec>.M<usec>P<pid>Q<n>.<host>`, the modern Maildir file name.

    This is the base name: Maildir delivery appends `,S=<size>,W=<vsize>` and
    a reader flags after a colon, so the base holds no ',' either.

    `<host>` is the first label of the host name (`mx` for `mx.example.org`):
    maildir(5) wants the host there so that machines sharing a folder never
    make the same name, which the first label does within one domain, and a
    short name keeps the key (`<base>,S=..,W=..`), which is also the POP3 UIDL,
    within RFC 1939's 70 characters, where Dovecot gives the same UIDL.
    """

    def __init__(self, hostname: str | None = None) -> None:
        host = hostname or socket.gethostname()
        host = host.partition(".")[0] or host
        # '/' and ':' cannot stand in a Maildir name: escaped as the spec says;
        # ',' starts Dovecot's fields (S=, W=) after the base: escaped alike.
        self._host = host.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")
        self._counter = itertools.count(1)
        self._pid = os.getpid()

    def __call__(self) -> str:
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{self._pid}Q{next(self._counter)}.{self._host}"


class SpoolFile:
    """One message being received. Errors are `StorageError`.

    Every byte goes through `write()` (`append_file()` too): `size` and `vsize`
    count what it saw, and the Maildir name is made of them. Never write to
    `fd` directly: the name would lie about the file.
    """

    __slots__ = (
        "_after_cr",
        "_fd",
        "_lone_lfs",
        "_pending",
        "_pending_size",
        "_written",
        "name",
        "path",
    )

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._written = 0  # octets handed to the kernel
        self._lone_lfs = 0  # in those octets
        self._after_cr = False  # the last of them was a CR
        self._fd: int | None = os.open(path, _SPOOL_FLAGS, MESSAGE_MODE)
        try:
            os.fchmod(self._fd, MESSAGE_MODE)  # the umask may have cut the group's read
        except OSError:
            self.remove()
            raise

    @property
    def pending_size(self) -> int:
        """Octets written but not yet handed to the kernel."""
        return self._pending_size

    @property
    def size(self) -> int:
        """Octets written so far (the file's size once flushed)."""
        return self._written + self._pending_size

    @property
    def vsize(self) -> int:
        """The size with every line end as CRLF, as POP3 counts it (RFC 1939 §11):
        `size` plus the LFs not preceded by a CR (`lone_lfs`), across writes."""
        pending = lone_lfs(b"".join(self._pending), self._after_cr) if self._pending else 0
        return self.size + self._lone_lfs + pending

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise StorageError(None, "the spool file is closed", self.path)
        return self._fd

    def write(self, data: bytes) -> None:
        """Take a piece of the message; StorageError when the disk refuses it."""
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= _WRITE_BUFFER:
            self.flush()

    def append_file(self, path: str, offset: int = 0) -> None:
        """Append the file at `path` from `offset` to its end, through `write()`,
        so `size` and `vsize` count it as they count every other byte (a stage
        that rewrites the header section copies the body this way). OSError when
        the file cannot be read; StorageError when the spool cannot take it."""
        with open(path, "rb") as f:
            f.seek(offset)
            while block := f.read(_WRITE_BUFFER):
                self.write(block)

    def flush(self) -> None:
        """Hand what is gathered to the kernel (not yet durable: see `fsync`)."""
        if not self._pending:
            return
        joined = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        # Counted here, once per flush over the gathered bytes, not per write.
        self._lone_lfs += lone_lfs(joined, self._after_cr)
        if joined:
            self._after_cr = joined[-1] == 0x0D  # b"\r"
        self._written += len(joined)
        data = memoryview(joined)
        try:
            fd = self.fd
            while data:
                data = data[os.write(fd, data) :]
        except OSError as exc:
            raise StorageError.wrap(exc) from exc

    def fsync(self) -> None:
        """Make the written message durable (blocking: call it in the threadpool)."""
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the descriptor; the file stays (a destination linked it)."""
        self._pending.clear()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def remove(self) -> None:
        """The message is delivered everywhere, or given up: close and unlink."""
        self.close()
        unlink_quietly(self.path)

    discard = remove


class Spool:
    """The spool folder: `open()` a file per message being received."""

    def __init__(self, root: Path, names: UniqueNames) -> None:
        self.root = Path(root)
        self.names = names
        try:
            # Never through a link: SymlinkRefused (`make_real_folder`).
            make_real_folder(self.root, DIR_MODE)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        self._root = str(self.root)

    def open(self) -> SpoolFile:
        """A new spool file; StorageError when it cannot be made (disk full, gone)."""
        name = self.names()
        try:
            try:
                return SpoolFile(f"{self._root}/{name}", name)
            except FileNotFoundError:  # the folder was removed while the server ran
                make_folder(self.root, DIR_MODE)
                return SpoolFile(f"{self._root}/{name}", name)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc

    def remove_stale(self, now: float | None = None) -> int:
        """Remove spool files older than `STALE_AFTER` (left by a crash); how many."""
        limit = (time.time() if now is None else now) - STALE_AFTER
        removed = 0
        for entry in os.scandir(self._root):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def same_filesystem(self, other: Path) -> bool:
        """Whether files here can be hard-linked into `other`."""
        return os.stat(self._root).st_dev == os.stat(other).st_dev
