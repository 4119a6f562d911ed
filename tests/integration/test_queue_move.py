"""A dead front end's queue moved into a running one, by the steps docs/scaling.md gives.

Front end A queues three messages it cannot hand on (its smarthost is a
port where nothing listens) and is killed with SIGKILL, master and worker.
The shell block of docs/scaling.md's "B. Merging into a running front end"
is then run as written by bash, with its three folders pointed at A's and
B's queues and `geosmtp` meaning this checkout's CLI with B's config, into
front end B (two workers, its smarthost a sink): after the reload and the
flush the sink has each of A's messages exactly once, and no queue holds
anything. The doc's commands are the test's, so the doc cannot drift from
what works.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port, listeners, wait_until
from tests.integration.adminapi import admin_section
from tests.integration.smtp_sink import Sink

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "scaling.md"
SECTION = "**B. Merging into a running front end.**"


def merge_steps() -> str:
    """The shell block after the doc's section B, its folders left to the caller
    (the three assignments) and `chown` left out (the test is not the workers' user)."""
    text = DOC.read_text()
    block = re.search(r"```sh\n(.*?)```", text[text.index(SECTION) :], re.S)
    assert block, "docs/scaling.md: no shell block after section B"
    lines = block.group(1).splitlines()
    assert [line.split("=")[0] for line in lines[:3]] == ["DEAD", "LIVE", "STAGE"], lines[:3]
    return "\n".join(line for line in lines[3:] if not line.startswith("chown "))


def relay_config(smarthost_port: int, workers: int) -> dict:
    return {
        "listeners": listeners("mx"),
        "workers": workers,
        "trusted_networks": ["127.0.0.0/8"],
        "relay": {
            "smarthost": f"127.0.0.1:{smarthost_port}",
            "smarthost_tls": "none",
            "retry_schedule": [3600],  # nothing is tried again unless flushed
        },
        **admin_section(),
    }


def queued(server) -> list[str]:  # type: ignore[no-untyped-def]
    """The ids of the entries in the server's queue folder."""
    return sorted(n.removesuffix(".json") for n in os.listdir(server.mail_dir / ".queue/records"))


def greets(server) -> bool:  # type: ignore[no-untyped-def]
    """The server answers 220 (it was started without waiting, beside another)."""
    assert server.process.poll() is None, server.stderr()[-2000:]
    try:
        with server.connect() as conn:
            return conn.recv(3) == b"220"
    except OSError:
        return False


def test_a_dead_front_ends_queue_merged_into_a_running_one_is_delivered_once(make_server):
    with Sink() as sink:
        # Both start at once: A's smarthost never answers, B's is the sink.
        dead = make_server(relay_config(free_port(), workers=1), wait=False)
        live = make_server(relay_config(sink.port, workers=2), wait=False)
        wait_until(lambda: greets(dead) and greets(live), timeout=20, what="both servers")
        with smtplib.SMTP("127.0.0.1", dead.ports["mx"], timeout=10) as client:
            for n in range(3):
                msg = f"Subject: moved {n}\r\nX-Moved: {n}\r\n\r\nbody {n}\r\n"
                client.sendmail("someone@elsewhere.test", [f"u{n}@remote.test"], msg)
        wait_until(lambda: dead.access_log().count("outcome=deferred") == 3, what="3 deferrals")
        ids = queued(dead)
        assert len(ids) == 3
        workers = dead.workers()
        dead.stop(signal.SIGKILL)
        for pid in workers:
            wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), what="the worker's end")
        assert queued(live) == []

        cli = f"{shlex.quote(sys.executable)} -m geosmtp"
        script = "\n".join(
            [
                "set -eu",
                f"DEAD={shlex.quote(str(dead.mail_dir / '.queue'))}",
                f"LIVE={shlex.quote(str(live.mail_dir / '.queue'))}",
                f"STAGE={shlex.quote(str(live.mail_dir / '.moving'))}",
                f'geosmtp() {{ {cli} "$1" -c {shlex.quote(str(live.config_path))} "${{@:2}}"; }}',
                merge_steps(),
            ]
        )
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=live.root
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "reloaded" in done.stdout
        assert "flushed 3 messages" in done.stdout, done.stdout

        wait_until(lambda: len(sink.completed) >= 3 and not queued(live), what="the delivery")
        moved = sorted(t.data.split(b"X-Moved: ")[1][:1].decode() for t in sink.completed)
        assert moved == ["0", "1", "2"]  # each of A's messages, once
        assert sorted(r for t in sink.completed for r in t.rcpts) == [
            "u0@remote.test",
            "u1@remote.test",
            "u2@remote.test",
        ]
    assert queued(live) == [] and os.listdir(live.mail_dir / ".queue" / "messages") == []
    # Delivered under A's ids (the access log is written in batches: polled).
    sent = [re.compile(rf"queue={queue_id} to=.* outcome=sent") for queue_id in ids]
    wait_until(lambda: all(p.search(live.access_log()) for p in sent), what="3 sent lines")
