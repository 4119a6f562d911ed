"""A private Dovecot POP3 server on a loopback port, for tests and the bench.

    with Dovecot(mail_dir, {"alice": "secret"}) as dc:   # mail_dir None: <root>/mail_dir
        poplib.POP3(dc.host, dc.port) ...

Debian's `dovecot-pop3d` (`/usr/sbin/dovecot`), run in the foreground
(`dovecot -F -c <its own config>`) as a child process of the caller: stopping
it is a signal to that one PID. Nothing of the system's Dovecot is used or
touched: no `/etc/dovecot`, no `/run/dovecot`; its base_dir (sockets, pid
file), state_dir, log, passwd-file and its own index and control files all
live in a temp dir of its own (`root`).

- Only POP3 (`protocols = pop3`), on `host:port`, no TLS (`ssl = no`);
  USER/PASS and AUTH PLAIN/LOGIN are allowed without TLS (loopback only).
- Users: a `passwd-file` with one line per user. A password is written as
  `{PLAIN}password`, or, when it is an argon2 hash (`$argon2id$...`, as
  `geosmtp passwd` prints), as `{ARGON2ID}hash`: Dovecot verifies it with
  libsodium, so both servers check the very same hash.
- Mail: a static userdb, `mail_location = maildir:<mail_dir>/%u`: the user's
  Maildir is `<mail_dir>/<user>/{cur,new,tmp}` itself (Maildir++: the root
  folder is the INBOX), the same folders geosmtp delivers into.
- Dovecot's own files stay out of the Maildirs: `INDEX=<root>/index/%u`
  (`indexes="memory"`: INDEX=MEMORY, nothing on disk) and
  `CONTROL=<root>/control/%u` (dovecot-uidlist, dovecot-uidvalidity). What it
  does to a Maildir itself: it moves every message it has seen from `new/` to
  `cur/` with an info suffix (`:2,` and `:2,S` once retrieved), and on QUIT
  after DELE it unlinks the files. It writes nothing else into the Maildir.
- `pop3_uidl_format = %f` (`uidl_format`): UIDL is the Maildir file's name
  without the `:2,...` info, `S=` and `W=` included: geosmtp's UIDL too
  (`storage.maildir.uid_for`), so the two agree.
- Mail processes run as the calling user, except that Dovecot refuses uid 0
  for mail ("userdb returned 0 as uid"): as root they run as `nobody`, and the
  Maildir tree must belong to it (`own_mail_dir()`, called by `start()`; call
  it again after anything else wrote to the Maildirs as root) and every
  folder above `mail_dir` must be searchable by others (pytest's temp dirs
  are not: without a `mail_dir` it is `<root>/mail_dir`, which is).
- Up to `sessions` concurrent POP3 sessions (Dovecot's default
  `default_process_limit` of 100 caps its login processes) and 2 GB of
  address space for auth (an argon2 check with 64 MiB does not fit in the
  default 256 MB); otherwise Dovecot's defaults, including one `pop3-login`
  and one `pop3` process per connection (its "high-security mode", the
  packaged default) and one `auth` process. `performance=True`: its
  "high-performance mode" instead (long-lived login processes, pop3
  processes reused).
- LMTP too, with `lmtp=True` (Debian's `dovecot-lmtpd`): an `lmtp` service
  on `host:lmtp_port` and on the UNIX socket `lmtp_socket` (`<root>/run/lmtp`),
  delivering into the same Maildirs. A recipient is looked up by its local
  part (`auth_username_format = %Ln`: `alice@example.test` is the passwd-file's
  `alice`); one not there is refused with `550 5.1.1`.
- Duplicate suppression too, with `dedup=True` (and `lmtp=True`; Debian's
  `dovecot-sieve`): a Sieve script run before every LMTP delivery
  (`sieve_before`) discards a message whose Message-ID that user has already
  received in the last 12 hours (RFC 7352 `duplicate`, Dovecot's duplicate
  database in the user's home, `<root>/home/<user>`). That is how a backend
  keeps one copy of a message an MTA sends again because it died between
  Dovecot's `250` and its own record of it. Dovecot 2.3's duplicate database
  is one file per user that each delivery reads whole and writes whole
  (`src/lib-storage/mail-duplicate.c`): two processes delivering to one user
  at once can each write it without the other's mark, and the lost mark lets a
  later copy through. So the LMTP service is then one process
  (`process_limit = 1`) serving many connections (`client_limit`), which
  makes its deliveries one at a time (`lmtp_processes=N` runs N processes of
  one connection each, to show that race:
  bench/experiments/dovecot_dedup.py).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from ..probe import free_port, greets, process_tree, started

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
UNPRIVILEGED = "nobody"  # the mail user when the caller is root
INTERNAL_USER = "dovecot"  # its auth process's user when started as root (the package's)

CONFIG = """\
# A private Dovecot: nothing here reads or writes the system's Dovecot files.
base_dir = {root}/run
state_dir = {root}/state
instance_name = {instance}
log_path = {root}/dovecot.log
protocols = pop3
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
{users_block}
mail_location = maildir:{mail_dir}/%u:INDEX={index}:CONTROL={root}/control/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
pop3_uidl_format = {uidl_format}
default_process_limit = {processes}
default_client_limit = {clients}
default_vsz_limit = 1G
mail_debug = {debug}
auth_debug = {debug}

passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid}{userdb_home}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
{no_chroot}{login_mode}}}
service pop3 {{
{pop3_mode}}}
service anvil {{
{no_chroot}}}
service auth {{
  # argon2 (64 MiB per check with geosmtp's default hash) needs more than 256 MB.
  vsz_limit = 2G
}}
service auth-worker {{
  vsz_limit = 2G
}}
"""


# Dovecot's "high-performance mode" (its documentation, Login processes): a few
# long-lived login processes serve every connection, and pop3 processes are
# reused for the next session (all users share one uid here).
PERFORMANCE_LOGIN = """\
  service_count = 0
  process_min_avail = {cpus}
"""
PERFORMANCE_POP3 = """\
  service_count = 0
  process_min_avail = {cpus}
"""


def available() -> bool:
    """Is Debian's Dovecot with POP3 installed here?"""
    return os.access(DOVECOT, os.X_OK) and Path("/usr/lib/dovecot/pop3").exists()


# ---------------------------------------------------------------- LMTP

LMTP_SERVER = "/usr/lib/dovecot/lmtp"

#: Added to the config with `lmtp=True`: the LMTP service, on loopback and on
#: a UNIX socket in base_dir; users by local part (the passwd-file's names).
LMTP_CONFIG = """protocols = $protocols lmtp
auth_username_format = %Ln
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


def lmtp_available() -> bool:
    """Is Debian's Dovecot with POP3 and LMTP (`dovecot-lmtpd`) installed here?"""
    return available() and Path(LMTP_SERVER).exists()


SIEVE_PLUGIN = "/usr/lib/dovecot/modules/lib90_sieve_plugin.so"

#: Added with `dedup=True`: Sieve (Pigeonhole) in LMTP deliveries, the script
#: below before any of the user's own, and one LMTP process (the module's
#: docstring says why).
DEDUP_CONFIG = """protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
plugin {{
  sieve_before = {root}/sieve/dedup.sieve
}}
"""

#: The LMTP processes with `lmtp_processes` (one with `dedup=True` unless it
#: says otherwise): N processes, each with one connection at a time (Dovecot's
#: default), or one process with all of them.
LMTP_PROCESSES = """service lmtp {{
  process_limit = {processes}
  client_limit = {clients}
}}
"""

#: RFC 7352: `duplicate` is true for a Message-ID this user has had (and
#: records it once the delivery succeeds); `discard` makes the LMTP reply a
#: `250` with no copy stored.
DEDUP_SCRIPT = """require ["duplicate"];
if duplicate {
  discard;
  stop;
}
"""


def dedup_available() -> bool:
    """Is Debian's Dovecot with LMTP and Sieve (`dovecot-sieve`) installed here?"""
    return lmtp_available() and Path(SIEVE_PLUGIN).exists()


def passwd_line(user: str, password: str) -> str:
    """One passwd-file line: `user:{SCHEME}secret`."""
    if not user or any(c in user for c in ":\n\r\0/"):
        raise ValueError(f"user name {user!r} cannot stand in a passwd-file")
    if any(c in password for c in ":\n\r\0"):
        raise ValueError(f"the password of {user!r} cannot stand in a passwd-file")
    if password.startswith("$argon2id$"):
        return f"{user}:{{ARGON2ID}}{password}\n"
    if password.startswith("$argon2i$"):
        return f"{user}:{{ARGON2I}}{password}\n"
    return f"{user}:{{PLAIN}}{password}\n"


class Dovecot:
    """One private Dovecot POP3 instance (see the module's docstring)."""

    def __init__(
        self,
        mail_dir: Path | str | None,
        users: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        root: Path | str | None = None,
        indexes: str = "disk",
        sessions: int = 1000,
        performance: bool = False,
        debug: bool = False,
        uidl_format: str = "%f",
        lmtp: bool = False,
        lmtp_port: int | None = None,
        dedup: bool = False,
        lmtp_processes: int | None = None,
    ) -> None:
        if indexes not in ("disk", "memory"):
            raise ValueError("indexes: 'disk' or 'memory'")
        if dedup and not lmtp:
            raise ValueError("dedup needs lmtp: it acts on LMTP deliveries")
        self.users = dict(users)
        self.host = host
        self.port = port or free_port(host)
        # A short path of its own: base_dir holds UNIX sockets (108 octets at most).
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="dovecot-"))
        self._own_root = root is None
        self.mail_dir = Path(mail_dir or self.root / "mail_dir").resolve()
        self.indexes = indexes
        self.sessions = sessions
        self.performance = performance
        self.debug = debug
        self.uidl_format = uidl_format
        self.lmtp = lmtp
        self.lmtp_port = (lmtp_port or free_port(host)) if lmtp else None
        self.dedup = dedup
        if lmtp_processes is None and dedup:
            lmtp_processes = 1
        self.lmtp_processes = lmtp_processes
        if os.geteuid() == 0:
            pw = pwd.getpwnam(UNPRIVILEGED)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        self.proc: subprocess.Popen | None = None
        self._out: BinaryIO | None = None

    # ------------------------------------------------------------ files

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    def log(self) -> str:
        """Dovecot's log and whatever it wrote to stdout/stderr."""
        text = ""
        for name in ("dovecot.out", "dovecot.log"):
            try:
                text += (self.root / name).read_text(errors="replace")
            except OSError:
                pass
        return text

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._own_root:
            os.chmod(self.root, 0o755)  # the mail user reaches its index and control dirs
        for sub in ("state", "index", "control", *(("home", "sieve") if self.dedup else ())):
            path = self.root / sub
            path.mkdir(exist_ok=True)
            if os.geteuid() == 0:
                os.chown(path, self.uid, self.gid)
        if os.geteuid() == 0:
            users_block = ""  # Dovecot's packaged users: dovecot, dovenull
            no_chroot = ""
        else:
            me = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            users_block = (
                f"default_internal_user = {me}\ndefault_internal_group = {group}\n"
                f"default_login_user = {me}\n"
            )
            no_chroot = "  chroot =\n"  # chroot needs root
        index = "MEMORY" if self.indexes == "memory" else f"{self.root}/index/%u"
        cpus = os.cpu_count() or 1
        if self.dedup:  # compiled on first use, into the same folder (so the mail user's)
            (self.root / "sieve" / "dedup.sieve").write_text(DEDUP_SCRIPT)
            for user in self.users:  # the duplicate database's file is made, not its folder
                home = self.root / "home" / user
                home.mkdir(exist_ok=True)
                if os.geteuid() == 0:
                    os.chown(home, self.uid, self.gid)
        passwd = self.root / "passwd"
        passwd.write_text("".join(passwd_line(u, p) for u, p in self.users.items()))
        os.chmod(passwd, 0o600)
        if os.geteuid() == 0:  # read by the auth process, Dovecot's internal user
            internal = pwd.getpwnam(INTERNAL_USER)
            os.chown(passwd, internal.pw_uid, internal.pw_gid)
        self.config_path.write_text(
            CONFIG.format(
                root=self.root,
                instance=f"dovecot-{self.port}",
                host=self.host,
                port=self.port,
                mail_dir=self.mail_dir,
                index=index,
                uid=self.uid,
                gid=self.gid,
                processes=self.sessions + 10,
                clients=2 * (self.sessions + 10) + 100,
                users_block=users_block,
                no_chroot=no_chroot,
                login_mode=PERFORMANCE_LOGIN.format(cpus=cpus) if self.performance else "",
                pop3_mode=PERFORMANCE_POP3.format(cpus=cpus) if self.performance else "",
                debug="yes" if self.debug else "no",
                uidl_format=self.uidl_format,
                userdb_home=f" home={self.root}/home/%u" if self.dedup else "",
            )
            + (LMTP_CONFIG.format(host=self.host, lmtp_port=self.lmtp_port) if self.lmtp else "")
            + (DEDUP_CONFIG.format(root=self.root) if self.dedup else "")
            + (self._lmtp_processes() if self.lmtp and self.lmtp_processes else "")
        )

    def _lmtp_processes(self) -> str:
        n = self.lmtp_processes or 1
        return LMTP_PROCESSES.format(processes=n, clients=self.sessions if n == 1 else 1)

    @property
    def lmtp_socket(self) -> Path:
        """The LMTP service's UNIX socket (with `lmtp=True`)."""
        return self.root / "run" / "lmtp"

    def own_mail_dir(self) -> None:
        """Give the Maildir tree to the mail user (when it is not the caller) and
        check that it can reach `mail_dir` at all."""
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        for parent in self.mail_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                raise RuntimeError(
                    f"Dovecot's mail user {UNPRIVILEGED} cannot reach {self.mail_dir}: "
                    f"{parent} is mode {stat.S_IMODE(mode):o}"
                )
        os.chown(self.mail_dir, self.uid, self.gid)
        for top, dirs, files in os.walk(self.mail_dir):
            for name in dirs + files:
                os.chown(os.path.join(top, name), self.uid, self.gid, follow_symlinks=False)

    def dovecot_files(self) -> list[Path]:
        """The files Dovecot keeps of its own (indexes, uidlists), outside the Maildirs."""
        return sorted(
            p for sub in ("index", "control") for p in (self.root / sub).rglob("*") if p.is_file()
        )

    # ------------------------------------------------------------ process

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> Dovecot:
        if not available():
            raise RuntimeError(f"Dovecot with POP3 is not installed ({DOVECOT})")
        if self.dedup and not dedup_available():
            raise RuntimeError(f"Dovecot's Sieve plugin is not installed ({SIEVE_PLUGIN})")
        self.write_config()
        self.own_mail_dir()
        self._out = open(self.root / "dovecot.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the caller reaches it only through stop()
        )
        deadline = time.monotonic() + timeout
        while not greets(self.host, self.port, b"+OK", timeout=1.0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not answer on {self.port}: {self.log()[-2000:]}")
            time.sleep(0.05)
        if self.lmtp:
            assert self.lmtp_port is not None
            while not greets(self.host, self.lmtp_port, b"220", timeout=1.0):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"dovecot's LMTP did not answer: {self.log()[-2000:]}")
                time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the master (it stops its children); then SIGKILL to any
        process of the instance still there (a login process waiting for auth
        may outlive the master)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            tree = [(pid, started(pid)) for pid in process_tree(proc.pid)]
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            for pid, when in reversed(tree):  # all of them ours: the same PID, started then
                if when is not None and started(pid) == when:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if self._out is not None:
            self._out.close()
            self._out = None

    def cleanup(self) -> None:
        """Stop, and remove the temp dir when it is the instance's own."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
