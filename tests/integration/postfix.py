"""A private Postfix as the relay tests' next hop (test_relay_modes.py,
test_relay_postfix.py): `postfix -c ROOT/etc start` on 127.0.0.3, delivering
remote.test into a Maildir per user (virtual(8)), its log in ROOT/maillog.

Built from the bench's `MAIN_CF`/`MASTER_CF` (bench/servers.py), with more
main.cf lines and more smtpd listeners (each with its own `-o` overrides) for
the tests that need them. Skips the test when Postfix cannot run here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.probe import greets
from bench.servers import MAIN_CF, MASTER_CF, POSTFIX, RELAY_CONCURRENCY, Postfix
from tests.conftest import wait_until
from tests.integration.smtp_sink import free_port_on

POSTFIX_HOST = "127.0.0.3"
#: The users whose Maildirs it keeps, under remote.test.
USERS = ("bob", "carol")

# inet_interfaces must name an address an interface has (127.0.0.3 is only
# inside lo's 127.0.0.0/8, and postfix refuses it, saying so only to syslog);
# master.cf's smtpd listens on 127.0.0.3 all the same.


@dataclass
class PrivatePostfix:
    root: Path
    port: int  # the smtpd as configured in main.cf
    #: the other smtpd listeners, by the name they were asked for
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def mail_dir(self) -> Path:
        return self.root / "mail_dir"

    def delivered(self, user: str | None = None) -> list[Path]:
        """The messages in one user's Maildir (or everyone's)."""
        return sorted(self.mail_dir.glob(f"{user or '*'}/new/*"))

    def maillog(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


def master_cf(port: int, listeners: dict[str, tuple[int, list[str]]]) -> str:
    """master.cf with an smtpd on `port` and one more per listener (its `-o`s)."""
    text = MASTER_CF.format(host=POSTFIX_HOST, port=port)
    for other, options in listeners.values():
        extra = "".join(f"\n  -o {option}" for option in options)
        text += f"{POSTFIX_HOST}:{other} inet n - n - - smtpd{extra}\n"
    return text


@contextlib.contextmanager
def private_postfix(
    main: dict[str, str] | None = None,
    listeners: dict[str, list[str]] | None = None,
    relayhost: str = "[127.0.0.1]:1",
    services: str = "",
) -> Iterator[PrivatePostfix]:
    """A private Postfix on 127.0.0.3: `main` are more main.cf settings,
    `listeners` more smtpd services (name -> `-o name=value` overrides),
    `relayhost` where its own mail (bounces, DSNs) goes: by default a closed
    loopback port (it stays deferred), so that it never looks up a domain in
    DNS nor sends a packet off loopback; `services` more master.cf lines (the
    `lmtp` client of test_lmtp.py)."""
    if not Postfix.available():
        pytest.skip("a private Postfix needs root, /usr/sbin/postfix and /usr/lib/postfix/sbin")
    # Not under pytest's tmp_path: its folders are 0700, and Postfix's daemons
    # (postfix, nobody) must reach their spool and the mailboxes.
    root = Path(tempfile.mkdtemp(prefix="geosmtp-postfix-"))
    os.chmod(root, 0o755)
    etc = root / "etc"
    for sub in ("etc", "spool", "data", "mail_dir"):
        (root / sub).mkdir()
    owner = pwd.getpwnam("nobody")
    os.chown(root / "mail_dir", owner.pw_uid, owner.pw_gid)
    pf = pwd.getpwnam("postfix")
    os.chown(root / "data", pf.pw_uid, pf.pw_gid)
    port = free_port_on(POSTFIX_HOST)
    others = {
        name: (free_port_on(POSTFIX_HOST), options) for name, options in (listeners or {}).items()
    }
    text = MAIN_CF.format(
        root=root,
        hostname="mx.remote.test",
        mail_domain="remote.test",
        relayhost=relayhost,
        relay_concurrency=RELAY_CONCURRENCY,
        max_size=10 * 1024 * 1024,
        procs=100,
        uid=owner.pw_uid,
        gid=owner.pw_gid,
    )
    (etc / "main.cf").write_text(text + "".join(f"{k} = {v}\n" for k, v in (main or {}).items()))
    (etc / "master.cf").write_text(master_cf(port, others) + services)
    (etc / "vmailbox").write_text("".join(f"{u}@remote.test {u}/\n" for u in USERS))
    started = subprocess.run(
        [POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, timeout=60
    )
    server = PrivatePostfix(root, port, {name: p for name, (p, _) in others.items()})
    try:
        if started.returncode != 0:
            # its reason goes to syslog (there may be none): say what we have
            pytest.skip(f"postfix did not start ({started.returncode}): {started.stderr[-300:]}")
        for each in (port, *server.ports.values()):
            try:
                wait_until(
                    lambda p=each: greets(POSTFIX_HOST, p, b"220"),
                    timeout=30,
                    what="postfix to greet",
                )
            except AssertionError:
                pytest.skip(
                    f"postfix did not answer on {POSTFIX_HOST}:{each}: {server.maillog()[-500:]}"
                )
        # The probes' sessions have ended (and are logged): a test counting
        # sessions from here on sees only its own.
        probed = 1 + len(server.ports)
        wait_until(
            lambda: (
                (log := server.maillog()).count("disconnect from")
                == log.count("]: connect from")
                >= probed
            ),
            what="postfix to log the end of the probes' sessions",
        )
        yield server
    finally:
        subprocess.run([POSTFIX, "-c", str(etc), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
