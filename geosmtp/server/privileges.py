"""Who the serving processes run as: the `user:`/`group:` account, and the drop.

Started as root with `user:` set, the master keeps root (to bind, to read keys
and the token, to start workers) and every worker drops to the account right
after the fork, before it reads a client byte: supplementary groups, then the
group, then the user (real, effective and saved ids), so nothing can get uid 0
back. A process whose ids all change from 0 loses every capability (unless
it asked to keep them, which geosmtp never does), and `PR_SET_NO_NEW_PRIVS`
stops any program it starts (a filter) from gaining privileges through a
set-uid file.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import signal
from dataclasses import dataclass

from ..config import ConfigError

#: prctl(2) options used here.
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Account:
    """The account workers run as."""

    name: str
    uid: int
    gid: int
    group: str


def account(user: str | None, group: str | None) -> tuple[Account | None, str | None]:
    """The account to drop to, and a note for the log.

    Root with `user:` set: that account (ConfigError when it does not exist).
    Root without `user:`: None, and the warning that says so. Not root: None,
    and a note when `user:` names someone else (it cannot be honoured).
    """
    euid = os.geteuid()
    if euid != 0:
        if user is not None and _uid_of(user) != euid:
            return None, (
                f"user: {user!r} ignored: geosmtp was not started as root, "
                f"so it runs as {pwd.getpwuid(euid).pw_name if _known(euid) else euid}"
            )
        return None, None
    if user is None:
        return None, (
            "running as root: every process that reads a client byte keeps uid 0; "
            "set 'user:' (and 'group:') in the config to serve as an unprivileged account"
        )
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigError(f"user: no such account: {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise ConfigError(f"group: no such group: {group!r}") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"user: {user!r} is root; name an unprivileged account")
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    return Account(entry.pw_name, entry.pw_uid, gid, group_name), None


def _uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid if not user.isdigit() else int(user)
    except KeyError:
        return None


def _known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def chown(path: str | os.PathLike, who: Account | None) -> None:
    """Give a folder or file the master made to the workers' account."""
    if who is not None:
        os.chown(path, who.uid, who.gid)


def drop(who: Account | None) -> None:
    """In a worker, after the fork: become `who` for good (no-op for None)."""
    if who is not None:
        os.setgroups([])
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)
        if 0 in os.getresuid() or os.geteuid() == 0:  # pragma: no cover - the kernel said no
            raise OSError("could not drop root")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def die_with_parent() -> None:
    """SIGKILL this process when the master dies (set after `drop`: a change of
    ids clears it). A master killed with -9 takes its workers with it, so a
    restart finds the ports and the queue free."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
