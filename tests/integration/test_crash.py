"""kill -9 under load, and in the middle of a POP3 UPDATE.

The trials are `bench/crash.py`'s (the bench scenario `crash` runs 100 of
them): 100 SMTP sessions sending (some messages to several mailboxes, some
relayed to a local sink that keeps deliveries in flight) and POP3 sessions
deleting, while the master or a worker is SIGKILLed at a random moment or
just after a POP3 QUIT. Each trial's seed is printed and in its failure;
`CRASH_SEED=<n>` replays a run (trial i has seed n + i; the victims, half
the master and half a worker, are shuffled by n).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import socket
import time

import pytest

from bench.crash import TrialConfig, run_trial
from tests.conftest import free_port, users, wait_until

TRIALS = 10
BASE_SEED = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
#: Half the trials kill the master, half a worker, in an order the seed shuffles.
VICTIMS = random.Random(BASE_SEED).sample(["master", "worker"] * (TRIALS // 2), TRIALS)
#: The bench's trial made lighter for CI's time: still 100 sessions at once,
#: one message each, 150 messages in each POP3 box, the kill within 1 s.
CI_TRIAL = TrialConfig(per_session=1, pop3_box=150, max_delay=1.0, time_limit=30)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_under_load_loses_duplicates_and_truncates_nothing(trial, tmp_path):
    seed = BASE_SEED + trial
    print(f"crash trial {trial}: seed {seed} (CRASH_SEED={BASE_SEED} replays the run)")
    result = run_trial(
        seed, dataclasses.replace(CI_TRIAL, victim=VICTIMS[trial]), tmp_path / "trial"
    )
    print(result.line())
    assert result.ok, result.line()
    # Every acknowledged delivery was looked for and found (result.ok says
    # so too; these name the figures in a failure).
    assert result.acked_local == result.found
    assert result.acked_relayed == result.relayed_found
    assert result.duplicates == 0 and result.partials == 0


# ------------------------------------------------- a kill in UPDATE


PASSWORD = "update-crash-pw"
BIG = 4000  # messages in the maildrop: UPDATE's unlinks take tens of ms


def fill(box_dir, count: int) -> list[str]:
    cur = box_dir / "cur"
    for sub in ("tmp", "new", "cur"):
        (box_dir / sub).mkdir(parents=True, exist_ok=True)
    keys = []
    for n in range(count):
        key = f"{1700000000 + n}.M{n}P7Q1.filled,S=12,W=13"
        (cur / f"{key}:2,S").write_bytes(b"Subject: x\n\n")
        keys.append(key)
    return keys


def left(box_dir) -> set[str]:
    return {
        name.partition(":")[0]
        for sub in ("new", "cur")
        for name in os.listdir(box_dir / sub)
        if not name.startswith(".")
    }


def delete_and_quit(port: int, keep: set[int], count: int) -> socket.socket:
    """Log in, DELE every message but `keep` (numbers from 1), send QUIT."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"+OK")
    sock.sendall(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    assert f.readline().startswith(b"+OK")
    assert f.readline().startswith(b"+OK"), "login"
    doomed = [n for n in range(1, count + 1) if n not in keep]
    sock.sendall(b"".join(f"DELE {n}\r\n".encode() for n in doomed))
    for _ in doomed:
        assert f.readline().startswith(b"+OK")
    sock.sendall(b"QUIT\r\n")
    return sock


def test_a_kill_9_in_update_deletes_all_or_nothing(make_server):
    """The worker is killed once UPDATE's first files are gone and before it
    ended (the kill leaves some deleted and some not); after the
    replacement worker's next login every deleted message is gone and every
    other one is there. Without the journal this fails: the kill leaves some
    deleted and some not, for good."""
    pop3 = free_port()
    server = make_server(
        {
            "workers": 1,
            "listeners": [
                {"address": "127.0.0.1", "port": free_port()},
                {"address": "127.0.0.1", "port": pop3, "role": "pop3"},
            ],
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
            "log": {"level": "INFO"},
        }
    )
    box = server.mail_dir / "alice"
    journal = box / "geosmtp-pop3.expunge"
    cut = None
    for attempt in range(6):  # a kill that lands after UPDATE ended is tried again
        keys = fill(box, BIG)
        keep = {1, BIG // 2, BIG}
        kept = {keys[n - 1] for n in keep}
        worker = server.worker
        sock = delete_and_quit(pop3, keep, BIG)
        try:
            # Watch, as another process would, for the first files to go; then kill.
            deadline = time.monotonic() + 10
            while len(os.listdir(box / "cur")) == BIG:
                assert time.monotonic() < deadline, "UPDATE did not begin"
            os.kill(worker, signal.SIGKILL)
        finally:
            sock.close()
        wait_until(lambda w=worker: server.workers() and w not in server.workers())
        remaining = left(box)
        if kept < remaining:  # some deleted messages gone, some not
            cut = (attempt, len(remaining), journal.exists())
            break
        # UPDATE was over before the kill: empty the box and try again.
        for name in os.listdir(box / "cur"):
            os.unlink(box / "cur" / name)
    assert cut is not None, "no kill landed inside UPDATE"
    print(f"killed in UPDATE (attempt, files left, journal): {cut}")

    # The next login finishes the UPDATE before it lists the maildrop.
    wait_until(lambda: server.workers(), what="the replacement worker")
    with socket.create_connection(("127.0.0.1", pop3), timeout=30) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"+OK")
        sock.sendall(f"USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode())
        assert f.readline().startswith(b"+OK")
        assert f.readline().startswith(b"+OK"), "login"
        assert f.readline().split()[:2] == [b"+OK", str(len(keep)).encode()]
    assert left(box) == kept
    assert not journal.exists()
    assert not (box / "geosmtp-pop3.expunge.tmp").exists()


def test_an_update_that_cannot_journal_answers_err_and_deletes_nothing(make_server):
    """RFC 1939 §6: an error in UPDATE gets "-ERR" and removes no message
    not marked; here none at all (the journal could not be written: its
    name is taken by a folder), and the next session finds them all."""
    pop3 = free_port()
    server = make_server(
        {
            "listeners": [
                {"address": "127.0.0.1", "port": free_port()},
                {"address": "127.0.0.1", "port": pop3, "role": "pop3"},
            ],
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
        }
    )
    box = server.mail_dir / "alice"
    keys = set(fill(box, 5))
    (box / "geosmtp-pop3.expunge.tmp").mkdir()
    sock = delete_and_quit(pop3, {1}, 5)
    with sock:
        reply = sock.makefile("rb").readline()
    assert reply == b"-ERR [SYS/TEMP] Could not remove 4 of 4 deleted messages.\r\n"
    assert left(box) == keys
    server.logged("cannot journal the deletions")
