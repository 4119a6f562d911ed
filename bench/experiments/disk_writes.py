"""Disk writes per accepted message: fsyncs, file operations and bytes.

    python bench/experiments/disk_writes.py [maildir|relay] [MESSAGES]

Starts geosmtp (`workers: 1`, `fsync: true`, the access log on) in a temp
dir, warms it with 20 messages, then traces its master and worker with
`strace -f -y` while 5 smtplib sessions send MESSAGES (500 by default) 1 KB
messages, one recipient each, and until the worker has finished with them:

- `maildir`: to a local mailbox (spool file, linked into `new/`);
- `relay`: to `remote.test`, queued and relayed to `bench/sink.py` on
  loopback (the outbound queue's whole life: the entry made, delivered,
  removed). A local recipient with `delivery.lmtp` goes through the same
  queue entry, so this is its disk work too.

Prints, per message: fsync/fdatasync calls by the folder they touch (the
file or the folder fsynced), write calls and bytes to files under the temp
dir (spool, Maildir, queue, logs), renames, links, unlinks and files
created, and the processes' `write_bytes` from /proc/PID/io (what they sent
towards the disk, page cache writeback included) over the same window.
strace slows the server down; the counts per message do not depend on it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from threading import Thread

REPO = Path(__file__).resolve().parents[2]
SESSIONS = 5
BODY = ("x" * 70 + "\r\n") * 13  # about 1 KB with the headers

CALLS = (
    "fsync,fdatasync,write,pwrite64,writev,rename,renameat,renameat2,"
    "link,linkat,unlink,unlinkat,openat"
)
LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")
UNFINISHED = re.compile(r"^(\d+)\s+(\w+)\((.*) <unfinished \.\.\.>$")
RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+)")
FD_PATH = re.compile(r"^-?\d+<([^>]*)>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False


def send(port: int, count: int, rcpt: str, start: int) -> None:
    """`count` messages over SESSIONS sessions at once, numbered from `start`."""

    def session(first: int, n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for i in range(first, first + n):
                msg = f"From: a@sender.test\r\nTo: {rcpt}\r\nX-Bench-Id: dw-{i}\r\n\r\n{BODY}"
                s.sendmail("a@sender.test", [rcpt], msg)

    per = count // SESSIONS
    threads = [Thread(target=session, args=(start + k * per, per)) for k in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def write_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                total += int(line.split()[1])
    return total


def where(path: str, root: str) -> str:
    """What a path is: `.spool`, `.queue/records`, `<mailbox>/new`, `logs`, with
    "(folder)" for a folder itself (an fsync of a folder makes its names durable)."""
    parts = os.path.relpath(path, root).split("/")
    if parts[0] == "mail":
        parts = parts[1:]
    folder = os.path.isdir(path)
    if not folder:
        parts = parts[:-1]
    if parts and parts[0] not in (".spool", ".queue", "logs"):
        parts = ["<mailbox>", *parts[1:]]  # a mailbox by name
    return "/".join(parts or ["mail"]) + (" (folder)" if folder else "")


def tally(trace: Path, root: str) -> tuple[Counter, Counter]:
    """(calls by kind, bytes by kind) for the calls that touch files under `root`."""
    calls: Counter = Counter()
    octets: Counter = Counter()
    started: dict[str, str] = {}  # a thread's call cut by another's: its arguments
    for line in trace.read_text(errors="replace").splitlines():
        if m := UNFINISHED.match(line):
            started[m.group(1)] = m.group(3)
            continue
        if m := RESUMED.match(line):
            name, args = m.group(2), started.pop(m.group(1), "") + m.group(3)
        elif m := LINE.match(line):
            name, args = m.group(2), m.group(3)
        else:
            continue
        result = int(m.group(4))
        if result < 0:
            continue
        fd = FD_PATH.match(args)
        path = fd.group(1) if fd else ""
        if name in ("fsync", "fdatasync") and path.startswith(root):
            calls[f"fsync {where(path, root)}"] += 1
        elif name in ("write", "pwrite64", "writev") and path.startswith(root):
            calls[f"write {where(path, root)}"] += 1
            octets[f"write {where(path, root)}"] += result
        elif name in ("rename", "renameat", "renameat2") and root in args:
            calls["rename"] += 1
        elif name in ("link", "linkat") and root in args:
            calls["link"] += 1
        elif name in ("unlink", "unlinkat") and root in args:
            calls["unlink"] += 1
        elif name == "openat" and "O_CREAT" in args and root in args:
            calls["file created (open O_CREAT)"] += 1
    return calls, octets


def config(mode: str, port: int, sink_port: int) -> str:
    lines = [
        "hostname: mx.dw.test",
        "domains: [local.test]",
        f"listeners: [{{address: 127.0.0.1, port: {port}, role: mx}}]",
        "workers: 1",
        "fsync: true",
        "mail_dir: mail",
        "max_clients: 1000",
        "admin: {enabled: false}",
        "tls: {self_signed: true}",
        "log: {dir: logs, level: WARNING}",
    ]
    if mode == "relay":
        lines += [
            'trusted_networks: ["127.0.0.0/8"]',
            f'relay: {{smarthost: "127.0.0.1:{sink_port}", smarthost_tls: none}}',
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "maildir"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    if mode not in ("maildir", "relay") or count % SESSIONS:
        raise SystemExit(__doc__)
    tmp = tempfile.mkdtemp(prefix="geosmtp-dw-")
    root = os.path.realpath(tmp)
    port, sink_port = free_port(), free_port()
    Path(tmp, "config.yaml").write_text(config(mode, port, sink_port))
    procs: list[subprocess.Popen] = []
    try:
        rcpt = "bob@local.test"
        if mode == "relay":
            rcpt = "bob@remote.test"
            sink = [sys.executable, str(REPO / "bench/sink.py"), "--port", str(sink_port)]
            procs.append(subprocess.Popen([*sink, "--out", f"{tmp}/sink.txt"]))
        server = subprocess.Popen(
            [sys.executable, "-m", "geosmtp", "-c", "config.yaml"],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(server)
        wait_for(lambda: greets(port), 30, "the server's greeting")
        worker = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
        records = Path(tmp, "mail/.queue/records")

        def finished(expected: int) -> bool:
            if mode == "maildir":
                return len(os.listdir(f"{tmp}/mail/bob/new")) >= expected
            sunk = Path(tmp, "sink.txt")
            done = sunk.exists() and len(sunk.read_text().splitlines()) >= expected
            return done and not os.listdir(records)

        send(port, 20, rcpt, 0)  # warm-up: imports, first files, connections
        wait_for(lambda: finished(20), 60, "the warm-up to be delivered")
        pids = [server.pid, worker]
        trace = Path(tmp, "strace.txt")
        before = write_bytes(pids)
        strace = subprocess.Popen(
            ["strace", "-f", "-y", "-s", "0", "-qq", "-e", f"trace={CALLS}", "-o", str(trace)]
            + [arg for pid in pids for arg in ("-p", str(pid))]
        )
        time.sleep(1)  # strace attaches
        began = time.monotonic()
        send(port, count, rcpt, 20)
        wait_for(lambda: finished(20 + count), 120, "the messages to be delivered")
        time.sleep(0.5)  # the access log's batch (every 100 ms) and the last unlinks
        elapsed = time.monotonic() - began
        strace.send_signal(signal.SIGINT)
        strace.wait(timeout=30)
        after = write_bytes(pids)
        calls, octets = tally(trace, root)
        print(f"mode {mode}: {count} messages in {elapsed:.1f} s (under strace), per message:")
        for kind in sorted(calls):
            extra = f", {octets[kind] / count:,.0f} bytes" if kind in octets else ""
            print(f"  {kind:40} {calls[kind] / count:6.2f}{extra}")
        fsyncs = sum(n for k, n in calls.items() if k.startswith("fsync"))
        written = sum(octets.values())
        print(f"  {'fsync + fdatasync, all':40} {fsyncs / count:6.2f}")
        print(f"  {'bytes written to files, all':40} {written / count:,.0f}")
        print(f"  {'/proc/PID/io write_bytes':40} {(after - before) / count:,.0f}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
