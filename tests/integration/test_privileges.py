"""Started as root with `user: nobody`: the master keeps root, every serving
process runs as nobody with no capability, and mail still flows (delivery
through a filter program, POP3, the outbound queue). Root without `user:`
says so. These run only as root (CI does)."""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import smtplib
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import listeners, start_server, users, wait_until
from tests.integration.adminapi import admin_of, with_admin
from tests.integration.smtp_sink import Script, Sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

PASSWORD = "nobody-reads-this-1"


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A folder nobody may enter (pytest's own tmp_path is its owner's alone)."""
    path = Path(tempfile.mkdtemp(prefix="geosmtp-priv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_workers_serve_as_nobody_without_capabilities(open_root):
    nobody = pwd.getpwnam("nobody")
    with Sink(Script()) as sink:
        server = start_server(
            open_root / "srv",
            {
                "user": "nobody",
                "workers": 2,
                "listeners": listeners("mx", "pop3"),
                "users": users(alice=PASSWORD),
                "auth": {"allow_plaintext": True},
                "trusted_networks": ["127.0.0.0/8"],
                "filters": [{"name": "cat", "command": ["cat"]}],
                "relay": {"smarthost": f"{sink.address}:{sink.port}", "smarthost_tls": "none"},
                **with_admin(),
            },
        )
        try:
            api = admin_of(server)
            wait_until(lambda: "started as" in server.server_log(), what="every worker")
            workers = server.workers()
            assert len(workers) == 2
            assert status(server.process.pid)["Uid"].split()[0] == "0"  # the master binds
            for pid in workers:
                fields = status(pid)
                assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4  # real..filesystem
                assert fields["Gid"].split() == [str(nobody.pw_gid)] * 4
                assert fields["Groups"].strip() == ""
                assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
                assert fields["NoNewPrivs"].strip() == "1"
            stats = api.stats()
            assert stats["process"]["uid"] == nobody.pw_uid
            assert stats["process"]["user"] == "nobody"

            # Delivery through a filter program, local and relayed.
            with smtplib.SMTP(server.host, server.ports["mx"], timeout=30) as client:
                client.sendmail(
                    "carol@remote.example",
                    ["alice@test.example", "dave@remote.example"],
                    b"Subject: dropped\r\n\r\nprivileges\r\n",
                )
            (path,) = server.messages("alice")
            info = path.stat()
            assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)
            assert stat.S_IMODE(info.st_mode) == 0o640
            wait_until(lambda: "stages=cat:replace" in server.access_log(), what="access line")
            wait_until(lambda: sink.completed, what="the relayed copy")
            assert b"privileges" in sink.completed[0].data
            assert sink.completed[0].rcpts == ["dave@remote.example"]

            # POP3 as nobody: the password check, the maildrop lock, RETR, DELE.
            pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
            pop.user("alice")
            pop.pass_(PASSWORD)
            assert b"privileges" in b"\n".join(pop.retr(1)[1])
            pop.dele(1)
            pop.quit()
            assert server.messages("alice") == []
        finally:
            server.stop()


def test_root_without_user_warns_and_says_so(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    warnings = [
        line
        for line in server.server_log().splitlines()
        if "WARNING" in line and "running as root" in line
    ]
    assert len(warnings) == 1 and "'user:'" in warnings[0]
    assert api.stats()["process"]["uid"] == 0
