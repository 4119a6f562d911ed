"""Maildir: deliver a spooled message into every recipient's `new/`, and read
mailboxes back (the read side POP3 uses).

Delivery (`MaildirStore.deliver`): fsync the spool file, hard-link it into
`new/` of every recipient (copied through that Maildir's `tmp/` where a link
is impossible), fsync the `new/` folders. Only after it returns may the client
be told `250`. Nothing in `new/` is ever partial: a link appears whole or not
at all, and a failed delivery removes the links it made.

File names are Dovecot's: `new/<base>,S=<size>,W=<vsize>`, where `<base>` is
the spool file's unique name, `S=` the size on disk (LF line ends) and `W=`
the size with CRLF line ends, what POP3 reports (RFC 1939 §11). A reader
flags a message by moving it to `cur/<base>,S=..,W=..:2,<flags>`. Listing a
maildrop reads the sizes from the names: no message is opened or stat'ed for
them, ours or Dovecot's. A POP3 UIDL is the key, the name without the flags
(`uid_for`): what Dovecot's `pop3_uidl_format = %f` (and `%g`) gives for the
same file, so a user moving between the two downloads nothing twice.

Blocking calls that can take long (fsync) go through `offload`, which the
gevent shell sets to its threadpool so one slow disk does not stall the hub.
`offload` must run the work to its end even when its caller is interrupted
(the shell's `threads.in_thread` does): a delivery that fails or is stopped
undoes its links only once the thread that makes them is done. The read side
(`Maildir`) does its file work directly: the caller offloads what may be slow.

Errors are `StorageError`, never a bare `OSError`, so the shell can tell a
full disk from a lost client. Mailbox names are checked here again
(`safe_mailbox_name(box) == box`): no name from the network reaches the
filesystem unchecked, whoever calls.

Nothing inside `mail_dir` is reached through a symbolic link. The group
that reads the mail may rename in a Maildir (`modes`), so a `cur` or a
message replaced by a link would otherwise lead delivery, RETR and DELE out
of `mail_dir`. The Maildir is opened by path with `O_NOFOLLOW` (`mail_dir`
itself, the operator's, may be reached through links), its folders with
`O_NOFOLLOW` relative to its descriptor, and messages relative to their
folder's: every file call then works on the folder that was checked. A link
is refused with a WARNING (`SymlinkRefused`, a temporary failure).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import re
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from loguru import logger

from ..mail import safe_mailbox_name
from .errors import MaildropBusy, StorageError, SymlinkRefused
from .lock import LOCK_NAME, MaildropLock
from .modes import MAIL_ROOT_MODE, MAILDIR_DIR_MODE, MESSAGE_MODE, is_link, make_folder
from .spool import SpoolFile, UniqueNames, lone_lfs
from .spool import fsync_path as _fsync_path
from .spool import unlink_quietly as _unlink_quietly

__all__ = [  # the lock's names too: a POP3 session finds all it needs here
    "Delivery",
    "Maildir",
    "MaildirStore",
    "MaildropBusy",
    "MaildropLock",
    "StoredMessage",
    "SymlinkRefused",
    "make_maildir",
    "uid_for",
]

Offload = Callable[..., Any]


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


_CANNOT_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)


#: A Maildir or one of its folders: a folder, and not through a link at the last step.
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A message to read; O_NONBLOCK: a FIFO put in its place cannot hang the reader.
MESSAGE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: A copy made in tmp/: a new file, never an existing one or a link.
_COPY_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_nofollow(maildir: str, rel: str, flags: int, dir_fd: int | None = None) -> int:
    """Open `maildir/rel` (the Maildir itself when `rel` is empty) without
    following a symbolic link at its last step: the Maildir by path, anything
    in it by its name relative to `dir_fd`, the folder that holds it.

    A link there is refused with a WARNING naming the mailbox and the path
    (`SymlinkRefused`); other errors are the `OSError`."""
    path = f"{maildir}/{rel}" if rel else maildir
    name = path if dir_fd is None else rel.rpartition("/")[2]
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        # O_NOFOLLOW gives ELOOP, or ENOTDIR with O_DIRECTORY (Linux).
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not is_link(name, dir_fd):
            raise
    logger.warning(
        "mailbox {}: {} is a symbolic link: not followed", os.path.basename(maildir), path
    )
    raise SymlinkRefused(path)


def open_folder(maildir: str, sub: str) -> int:
    """A descriptor of `maildir/sub` (`tmp`, `new` or `cur`), no step of the two
    through a link. FileNotFoundError when either is missing."""
    box = open_nofollow(maildir, "", FOLDER_FLAGS)
    try:
        return open_nofollow(maildir, sub, FOLDER_FLAGS, box)
    finally:
        os.close(box)


def _open_message(maildir: str, relpath: str) -> int:
    """A descriptor of the message `maildir/relpath` (`new/<name>` or
    `cur/<name>`), to read: never through a link, and a regular file."""
    folder = open_folder(maildir, relpath.partition("/")[0])
    try:
        fd = open_nofollow(maildir, relpath, MESSAGE_FLAGS, folder)
    finally:
        os.close(folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(errno.EINVAL, "not a regular file", f"{maildir}/{relpath}")
    return fd


def make_maildir(maildir: str) -> bool:
    """Create `maildir` and its `tmp/`, `new/`, `cur/` (0770: a Maildir reader in
    the group moves and deletes messages; `modes`) where missing; whether the
    Maildir itself was new (its parent then wants an fsync). `SymlinkRefused`
    when the Maildir or one of its folders is a symbolic link."""
    created = make_folder(maildir, MAILDIR_DIR_MODE)
    box = open_nofollow(maildir, "", FOLDER_FLAGS)
    try:
        for sub in ("tmp", "new", "cur"):
            try:
                os.mkdir(sub, MAILDIR_DIR_MODE, dir_fd=box)
                made = True
            except FileExistsError:
                made = False
            fd = open_nofollow(maildir, sub, FOLDER_FLAGS, box)
            try:
                if made:
                    os.fchmod(fd, MAILDIR_DIR_MODE)  # mkdir's mode went through the umask
            finally:
                os.close(fd)
    finally:
        os.close(box)
    return created


def stored_name(spool: SpoolFile) -> str:
    """The name in `new/`: `<base>,S=<size>,W=<vsize>`, as Dovecot writes it."""
    return f"{spool.name},S={spool.size},W={spool.vsize}"


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
            make_folder(self.root, MAIL_ROOT_MODE)
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
        if make_maildir(maildir) and self.fsync:
            self.offload(_fsync_path, str(self.root))

    # ------------------------------------------------------------ write

    def deliver(self, spool: SpoolFile, boxes: Iterable[str]) -> Delivery:
        """Make the spooled message durable in each mailbox's `new/`, named
        `<spool name>,S=<size>,W=<vsize>` (the spool file keeps its name).

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
            # Opened again, not kept: a message to many mailboxes holds no
            # descriptor a mailbox.
            new = open_folder(maildir, "new")
            try:
                os.fsync(new)
            finally:
                os.close(new)

    def _place_all(self, spool: SpoolFile, maildirs: list[str], made: list[str]) -> None:
        name = stored_name(spool)  # after the flush: the sizes are final
        for maildir in maildirs:
            try:
                new = open_folder(maildir, "new")
            except FileNotFoundError:
                # The Maildir was removed while the server ran: make it again.
                self.make_maildir(maildir)
                new = open_folder(maildir, "new")
            try:
                self._place(spool, name, maildir, new)
            except OSError as exc:
                # The error names the spool file (a link's source) or a bare
                # name (a `dir_fd` call): the log must say which Maildir failed.
                raise OSError(exc.errno, exc.strerror, f"{maildir}/new/{name}") from exc
            finally:
                os.close(new)
            made.append(f"{maildir}/new/{name}")

    def _place(self, spool: SpoolFile, name: str, maildir: str, new: int) -> None:
        """Link (or copy) the spool file as `name` into the folder `new`."""
        if self.link:
            try:
                os.link(spool.path, name, dst_dir_fd=new)
                return
            except OSError as exc:
                if exc.errno not in _CANNOT_LINK:
                    raise
        # A hard link is impossible here: copy through this Maildir's tmp/.
        tmp_dir = open_folder(maildir, "tmp")
        try:
            self._copy(spool, name, tmp_dir, new)
        finally:
            os.close(tmp_dir)

    def _copy(self, spool: SpoolFile, name: str, tmp_dir: int, new: int) -> None:
        tmp = self.names()
        fd = os.open(tmp, _COPY_FLAGS, MESSAGE_MODE, dir_fd=tmp_dir)
        try:
            with open(spool.path, "rb") as src, open(fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst)
            os.fchmod(fd, MESSAGE_MODE)  # open's mode went through the umask
            if self.fsync:
                os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=tmp_dir, dst_dir_fd=new)
        except OSError:
            try:
                os.unlink(tmp, dir_fd=tmp_dir)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)

    # ------------------------------------------------------------- read

    def maildir(self, box: str) -> Maildir:
        """The read side of `box`'s Maildir (which may not exist yet: it is empty)."""
        return Maildir(self.mailbox_path(box))


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message in a Maildir, as listed."""

    key: str  # the name without the ":2,..." info: stable across new/ -> cur/ and flags
    subdir: str  # "new" or "cur"
    filename: str  # the name in its folder (key plus info in cur/)
    size: int  # octets on disk (LF line ends): `,S=` in the name, else stat'ed
    flags: str  # the Maildir info flags ("S" seen, "T" trashed, ...), sorted
    #: Octets with CRLF line ends (POP3's size): `,W=` in the name, or known from
    #: an earlier reading (`Maildir.virtual_size`); None: not known yet.
    vsize: int | None = None

    @property
    def relpath(self) -> str:
        return f"{self.subdir}/{self.filename}"


_UIDL = re.compile(r"[\x21-\x7e]{1,70}")


def uid_for(message: StoredMessage) -> str:
    """The message's POP3 unique-id (UIDL, RFC 1939 §7): its key (the file name
    without the `:2,<flags>` info, the `S=` and `W=` fields included) when that
    is 1-70 characters in 0x21-0x7E, else the SHA-256 of the key in hex.

    The key is what Dovecot gives for the same file with `pop3_uidl_format =
    %f` (its `%g` for a Maildir is the same), so both servers name a message
    alike. Unique in the maildrop, and stable across sessions and restarts, the
    move from `new/` to `cur/` and flag changes (none of them touches the key).
    geosmtp's own names qualify while the host name is short (docs/dovecot.md
    says how short); a longer key is digested, where Dovecot sends it whole,
    past RFC 1939's 70 characters.
    """
    key = message.key
    if _UIDL.fullmatch(key):
        return key
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


_FIELD = re.compile(r",([SW])=([0-9]+)(?=,|$)")


def _name_sizes(key: str) -> tuple[int | None, int | None]:
    """`S=` and `W=` from the fields after the base (`<base>,S=123,W=130`)."""
    size = vsize = None
    if "," in key:
        for field, value in _FIELD.findall(key):
            if field == "S":
                size = int(value)
            else:
                vsize = int(value)
    return size, vsize


class _VirtualSizes:
    """POP3 sizes of messages whose name does not carry them (foreign mail
    without `W=`), learned by reading each once; shared by the process.

    Keyed by (Maildir, key, size, mtime): a message changed in place is read
    again. Bounded, the least recently used forgotten first. Threads may use it
    at once (each `OrderedDict` call is atomic under the GIL).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sizes: OrderedDict[tuple[str, str, int, int], int] = OrderedDict()

    def get(self, key: tuple[str, str, int, int]) -> int | None:
        try:
            vsize = self._sizes[key]
            self._sizes.move_to_end(key)
        except KeyError:  # absent, or forgotten meanwhile by another thread
            return None
        return vsize

    def put(self, key: tuple[str, str, int, int], vsize: int) -> None:
        self._sizes[key] = vsize
        while len(self._sizes) > self.limit:
            try:
                self._sizes.popitem(last=False)
            except KeyError:
                break

    def clear(self) -> None:
        self._sizes.clear()


#: About 150 bytes an entry: ~7 MB at the limit.
VIRTUAL_SIZES = _VirtualSizes(50_000)
_READ_CHUNK = 1 << 20


class Maildir:
    """Read side of one Maildir: list, open, flag (new/ -> cur/); sizes
    for POP3; the maildrop lock.

    Follows maildir(5) as Dovecot and mutt use it: `tmp/` is never read;
    `cur/` names carry `:2,<flags>`; the part before the colon is the key.
    Every method does blocking file work in the calling thread: the caller
    offloads what may be slow (`virtual_size` of foreign mail reads the file).
    Each opens the Maildir and the folder it works in afresh, never through
    a symbolic link (`SymlinkRefused`), and acts on names in that folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._path = str(self.path)

    def lock(self) -> MaildropLock:
        """Lock the maildrop for one session (`MaildropBusy` if another has it),
        creating the Maildir of a user who never got mail. Release it, or use it
        in a `with`: `with maildir.lock(): ...`."""
        try:
            make_maildir(self._path)
            box = open_nofollow(self._path, "", FOLDER_FLAGS)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        try:
            return MaildropLock(f"{self._path}/{LOCK_NAME}").acquire(dir_fd=box)
        finally:
            os.close(box)

    def list(self) -> list[StoredMessage]:
        """Every message in `new/` and `cur/`, oldest delivery first.

        Dotfiles and anything not a regular file (symbolic links too) are
        skipped (and `tmp/` and the lock file, outside both folders, never
        seen). A name with `,S=` is not stat'ed; one without gets its vsize
        from `VIRTUAL_SIZES` when it was read before. 20,000 messages list in
        about 120 ms, one `getdents64` pass, against about 190 ms with a `stat`
        each (foreign names; `bench/experiments/maildir_list.py`).
        """
        out: list[StoredMessage] = []
        for subdir in ("new", "cur"):
            try:
                folder = open_folder(self._path, subdir)
            except FileNotFoundError:
                continue
            try:
                self._list_folder(folder, subdir, out)
            finally:
                os.close(folder)
        out.sort(key=lambda m: delivery_order(m.key))
        return out

    def _list_folder(self, folder: int, subdir: str, out: builtins.list[StoredMessage]) -> None:
        with os.scandir(folder) as it:
            entries = list(it)
        for entry in entries:
            name = entry.name
            if name[0] == "." or not entry.is_file(follow_symlinks=False):
                continue
            key, _, info = name.partition(":")
            flags = "".join(sorted(info[2:])) if info.startswith("2,") else ""
            size, vsize = _name_sizes(key)
            if size is None:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed meanwhile
                    continue
                size = st.st_size
                if vsize is None:
                    vsize = VIRTUAL_SIZES.get((self._path, key, size, st.st_mtime_ns))
            out.append(StoredMessage(key, subdir, name, size, flags, vsize))

    def open(self, message: StoredMessage) -> BinaryIO:
        """The message's bytes (a file object, read in pieces: never whole in memory)."""
        try:
            fd = _open_message(self._path, message.relpath)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        return open(fd, "rb")  # the caller closes it

    def virtual_size(self, message: StoredMessage) -> int:
        """The message's size with CRLF line ends, as POP3 counts it (RFC 1939 §11).

        From the name (`,W=`) when it is there; else the file is read once (in
        1 MiB pieces) and the answer kept in `VIRTUAL_SIZES`, so foreign mail
        without `W=` is read once per process, not at every login. Reading
        blocks: the caller offloads it.
        """
        if message.vsize is not None:
            return message.vsize
        try:
            fd = _open_message(self._path, message.relpath)
            try:
                st = os.fstat(fd)
                cache_key = (self._path, message.key, st.st_size, st.st_mtime_ns)
                vsize = VIRTUAL_SIZES.get(cache_key)
                if vsize is None:
                    vsize = st.st_size + _count_lone_lfs(fd)
                    VIRTUAL_SIZES.put(cache_key, vsize)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        return vsize

    def set_flags(self, message: StoredMessage, flags: str) -> StoredMessage:
        """Give the message these flags; a message in `new/` moves to `cur/` (seen by
        a client), as maildir(5) asks. Only the info after the colon changes: the
        key, with its `,S=` and `,W=`, stays."""
        flags = "".join(sorted(set(flags)))
        filename = f"{message.key}:2,{flags}"
        if message.subdir == "cur" and message.filename == filename:
            return message
        try:
            source = open_folder(self._path, message.subdir)
            try:
                cur = source if message.subdir == "cur" else open_folder(self._path, "cur")
                try:
                    os.rename(message.filename, filename, src_dir_fd=source, dst_dir_fd=cur)
                finally:
                    if cur != source:
                        os.close(cur)
            finally:
                os.close(source)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        return StoredMessage(message.key, "cur", filename, message.size, flags, message.vsize)


def _count_lone_lfs(fd: int) -> int:
    """The LFs not after a CR in the file `fd`, read to its end in 1 MiB pieces."""
    lone, after_cr = 0, False
    while chunk := os.read(fd, _READ_CHUNK):
        lone += lone_lfs(chunk, after_cr)
        after_cr = chunk[-1] == 0x0D  # b"\r"
    return lone


_ORDER = re.compile(r"([0-9]+)\.(?:M([0-9]+)P)?")


def delivery_order(key: str) -> tuple[int, int, str]:
    """`<sec>.M<usec>P...` sorts by time (a name with only `<sec>.` first, by its
    second); any other name after, by name."""
    match = _ORDER.match(key)
    if match is None:
        return 1 << 62, 0, key
    sec, usec = match.groups()
    return int(sec), int(usec or 0), key
