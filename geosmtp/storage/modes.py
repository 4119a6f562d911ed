"""Who may read what geosmtp writes: the modes of its files and folders.

Owner: the user the server (its workers) runs as. Group: that user's group,
where an operator puts the programs that read the mail (Dovecot's mail
user, a mutt user): they may read every message and, as a Maildir reader
must, move it from `new/` to `cur/`, flag it (a rename) and delete it.
Others: nothing, anywhere.

- The Maildirs (`mail_dir/<box>` and its `tmp/`, `new/`, `cur/`): 0770. A
  reader renames and deletes files in `new/` and `cur/`, Dovecot writes its
  index and `dovecot-uidlist` in the Maildir itself, mutt writes through
  `tmp/`: all need write permission on the folders.
- `mail_dir` itself: 0750. The group passes through to the Maildirs but
  cannot add, rename or remove names in it: `.spool` and `.queue` live
  there, and a group member who could put a folder of their own in their
  place would read the queue and slip records into it (mail geosmtp would
  relay).
- Messages: 0640. Readable by the group; nobody rewrites a message (flags
  are in its name), so no one needs write permission on the file. A spool
  file is created 0640 because it is the same inode that is linked into
  `new/` (and into the queue): the spool and the queue are kept private by
  their folders, not by the file mode.
- The spool and the queue (folders 0700, queue records 0600) and the POP3
  lock files (0600): the server's alone.
- Logs: the folder 0750, `log.txt` and `access.log` (rotated ones too)
  0640, so an operator in the group reads them without root.
- The admin token file: 0600 (`admin/server.py`), as are DKIM keys.

The modes hold whatever the process umask is: folders are chmod'ed after
`mkdir`, messages and log files fchmod'ed after `open` (the umask can only
take bits away). `apply_umask()` sets the umask to `UMASK` (0027) for the
rest: files a filter program or a library creates get no group write and
nothing for others. The master calls it once, before it creates anything.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import SymlinkRefused

MAILDIR_DIR_MODE = 0o770
MAIL_ROOT_MODE = 0o750
MESSAGE_MODE = 0o640
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
LOG_DIR_MODE = 0o750
LOG_FILE_MODE = 0o640
UMASK = 0o027

__all__ = [
    "LOG_DIR_MODE",
    "LOG_FILE_MODE",
    "MAILDIR_DIR_MODE",
    "MAIL_ROOT_MODE",
    "MESSAGE_MODE",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "UMASK",
    "apply_umask",
    "is_link",
    "make_folder",
    "make_real_folder",
    "open_log_file",
]


def apply_umask(mask: int = UMASK) -> int:
    """Set the process umask (to 0027 by default); the previous one."""
    return os.umask(mask)


def make_folder(
    path: str | os.PathLike[str], mode: int, owner: tuple[int, int] | None = None
) -> bool:
    """Create the folder `path` with exactly `mode`, and any missing parent with
    the same mode, whatever the umask; `owner` (uid, gid): chown each one made
    (the master, as root, making folders for the workers' user). Whether `path`
    was made. An existing folder keeps its mode and owner: geosmtp never
    changes what an operator set up (`mail_dir: /var/mail` stays as it is).
    FileExistsError when `path` exists and is not a folder."""
    path = os.fspath(path)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return False
    except FileNotFoundError:
        parent = os.path.dirname(path.rstrip("/"))
        if not parent or parent == path:
            raise
        make_folder(parent, mode, owner)
        return make_folder(path, mode, owner)
    os.chmod(path, mode)  # mkdir's mode went through the umask
    if owner is not None:
        os.chown(path, *owner)
    return True


def make_real_folder(path: str | os.PathLike[str], mode: int) -> bool:
    """`make_folder`, for a folder that must be a real one, never reached through
    a symbolic link at its last step: the spool and the queue and the queue's
    folders, where a link (`.queue/messages` -> a folder elsewhere) would write
    mail outside `mail_dir`. `SymlinkRefused` naming the path when it is one.

    Checked when the server starts (and makes the folder): a link put in
    later, while it runs, takes write permission on the 0700 folder above,
    the server's own, and is not guarded against."""
    try:
        made = make_folder(path, mode)  # a link to a folder passes (isdir follows it)
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
    except OSError as exc:
        # A dangling link: EEXIST; through O_NOFOLLOW: ELOOP, or ENOTDIR (Linux).
        if exc.errno in (errno.EEXIST, errno.ELOOP, errno.ENOTDIR) and is_link(path):
            raise SymlinkRefused(os.fspath(path)) from None
        raise
    return made


def is_link(path: str | os.PathLike[str], dir_fd: int | None = None) -> bool:
    """Whether `path` (relative to `dir_fd` when given) is a symbolic link."""
    try:
        return stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_log_file(path: str, flags: int) -> int:
    """An `opener` for `open()` (loguru's file sink passes it on): the log file
    with `LOG_FILE_MODE`, also when it was made before with another mode or under
    a umask that cut it, and after each rotation (loguru opens a new file)."""
    fd = os.open(path, flags, LOG_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o7777 != LOG_FILE_MODE:
            os.fchmod(fd, LOG_FILE_MODE)
    except OSError:  # not ours to change (another user made it): it is still written
        pass
    return fd
