"""kill -9 under load: one trial, shared by the CI test (tests/integration/
test_crash.py, 10 trials) and the bench scenario `crash` (100 by default).

A trial starts geosmtp (a master and `workers` forked workers, fsync on) on
loopback, with mailboxes u0..u9 for SMTP, p0..pN for POP3 (each pre-filled
with `pop3_box` messages) and a relay to a local sink (a smarthost that takes
`sink_delay` seconds over each end of data, so deliveries are in flight).
Then, at once:

- `sessions` SMTP sessions send `per_session` small messages each, every one
  with a unique token; some to several local mailboxes, some to a relayed
  recipient too. A message is *acknowledged* when its client read the 250;
- `pop3_sessions` POP3 sessions log in, DELE all but a few, and QUIT;

and the victim (the master, or one worker) gets SIGKILL: after a random
delay ("load"), or just after a POP3 client sent its QUIT ("update": the
worker serving that session, or the master). Victim, moment and delay come
from `random.Random(seed)`: a trial is replayed from its seed.

Afterwards the server is started again (the master was killed) or has
replaced its worker, and the trial checks, after a POP3 login to each pop
box (which finishes an UPDATE a kill cut short) and once the queue drained:

- every acknowledged message is in each local recipient's new/ or cur/
  exactly once, and at the sink for its relayed recipient (a message resent
  only when its delivery was in flight at the kill: at most
  `relay_concurrency` of them);
- no unacknowledged message is there twice;
- every file in new/ and cur/ (and every message at the sink) is whole: the
  bytes sent, after geosmtp's own header lines;
- a POP3 session's deletions are all or nothing, and all when it saw +OK.

Everything runs on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .probe import wait_for

HOST = "127.0.0.1"
POP3_PASSWORD = "crash-trial-pw"
LOCAL_BOXES = [f"u{i}" for i in range(10)]
RELAY_DOMAIN = "remote.example"
TOKEN = re.compile(rb"^X-Crash-Token: (\S+)\r?$", re.MULTILINE)


@dataclass
class TrialConfig:
    sessions: int = 100
    per_session: int = 2
    pop3_sessions: int = 3
    pop3_box: int = 300  # messages in each POP3 box (UPDATE takes a while)
    workers: int = 2
    relay_concurrency: int = 4
    sink_delay: float = 0.02
    max_delay: float = 1.5  # a "load" kill comes 0.05 s to this after the start
    time_limit: float = 60.0  # for each wait of the trial
    victim: str | None = None  # "master" or "worker"; None: from the seed


@dataclass
class TrialResult:
    seed: int
    victim: str = ""  # "master" or "worker"
    moment: str = ""  # "load" or "update"
    delay: float = 0.0  # seconds from the start of the load to the kill
    acked: int = 0  # messages whose 250 a client read
    unacked: int = 0  # messages sent whose 250 no client read
    acked_local: int = 0  # (message, local mailbox) pairs acknowledged
    found: int = 0  # of those, in the mailbox (once or more)
    duplicates: int = 0  # (message, mailbox) pairs there more than once
    partials: int = 0  # files in new/ or cur/ (or at the sink) not whole
    acked_relayed: int = 0  # acknowledged (message, relayed recipient) pairs
    relayed_found: int = 0  # of those, at the sink
    resent: int = 0  # extra copies at the sink (in flight at the kill)
    in_flight: int = 0  # deliveries the sink was taking in at the kill
    journals: int = 0  # POP3 UPDATEs the kill cut (a journal left), finished at the login
    unacked_found: int = 0  # unacknowledged pairs stored anyway (allowed, once)
    pop3: list[str] = field(default_factory=list)  # per session: what it saw, what was left
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds each step took
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return (
            f"seed {self.seed}: {self.victim} at {self.moment} +{self.delay:.2f}s: "
            f"acked {self.acked} ({self.acked_local} local, {self.acked_relayed} relayed), "
            f"found {self.found}+{self.relayed_found}, duplicates {self.duplicates}, "
            f"resent {self.resent} (in flight {self.in_flight}), partials {self.partials}, "
            f"pop3 {' '.join(self.pop3)} (journals finished {self.journals}); "
            f"{self.seconds:.1f}s" + ("" if self.ok else " · " + "; ".join(self.problems[:5]))
        )


# ------------------------------------------------------------------ sink


class Sink(socketserver.ThreadingTCPServer):
    """The next hop: takes every message, records (recipients, data); counts
    the messages it holds between their end of data and its 250."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, delay: float) -> None:
        super().__init__((HOST, 0), _SinkHandler)
        self.delay = delay
        self.lock = threading.Lock()
        self.received: list[tuple[list[str], bytes]] = []
        self.holding = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _SinkHandler(socketserver.StreamRequestHandler):
    server: Sink

    def handle(self) -> None:
        self.request.settimeout(30)
        try:
            self._session()
        except OSError:
            pass

    def _session(self) -> None:
        out, sink = self.wfile, self.server
        out.write(b"220 sink.remote.example ESMTP\r\n")
        rcpts: list[str] = []
        while line := self.rfile.readline(10000):
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.write(b"250-sink.remote.example\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                out.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                out.write(b"354 go on\r\n")
                data = self._data()
                if data is None:
                    return
                with sink.lock:
                    sink.holding += 1
                try:
                    time.sleep(sink.delay)  # the next hop's own pace
                    with sink.lock:
                        sink.received.append((rcpts, data))
                    out.write(b"250 2.0.0 queued\r\n")
                finally:
                    with sink.lock:
                        sink.holding -= 1
                rcpts = []
            elif verb == b"QUIT":
                out.write(b"221 2.0.0 bye\r\n")
                return
            elif verb == b"RSET":
                rcpts = []
                out.write(b"250 2.0.0 ok\r\n")
            else:  # HELO, MAIL, NOOP
                out.write(b"250 2.0.0 ok\r\n")

    def _data(self) -> bytes | None:
        lines = []
        while line := self.rfile.readline(10000):
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)
        return None  # the connection dropped: not taken


# -------------------------------------------------------------- messages


def message(token: str, rcpts: list[str]) -> bytes:
    body = "".join(f"line {i} of {token}\r\n" for i in range(8))
    return (
        f"From: sender@client.example\r\nTo: {', '.join(rcpts)}\r\n"
        f"Subject: crash trial {token}\r\nX-Crash-Token: {token}\r\n\r\n{body}"
    ).encode()


def recipients(rng: random.Random, n: int, token: str) -> list[str]:
    """One local mailbox mostly; several for some; a relayed one for some."""
    count = 3 if rng.random() < 0.2 else 1
    rcpts = [f"{box}@test.example" for box in rng.sample(LOCAL_BOXES, count)]
    if rng.random() < 0.2:
        rcpts.append(f"r{n}@{RELAY_DOMAIN}")
    return rcpts


def whole(stored: bytes, sent: bytes) -> bool:
    """`stored` (LF line ends, geosmtp's trace lines on top) holds all of `sent`."""
    return stored.replace(b"\r\n", b"\n").endswith(b"\n" + sent.replace(b"\r\n", b"\n"))


# ---------------------------------------------------------------- server


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_HASH: list[str] = []


def _password_hash() -> str:
    """A cheap argon2id hash (t=1, 1 MiB, as bench/mailboxes.py's `cheap`): a
    trial's logins cost a millisecond, not the CPU the load needs."""
    if not _HASH:
        from argon2 import PasswordHasher

        _HASH.append(
            PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(POP3_PASSWORD)
        )
    return _HASH[0]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


class Server:
    """geosmtp through its CLI on a config in `root`; started again after a kill."""

    def __init__(self, root: Path, cfg: TrialConfig, sink_port: int) -> None:
        self.root = root
        self.cfg = cfg
        self.smtp_port = _free_port()
        self.pop3_port = _free_port()
        self.mail_dir = root / "mail_dir"
        pop_users = {f"p{i}": {"password": _password_hash()} for i in range(cfg.pop3_sessions)}
        config = {
            "hostname": "mx.test.example",
            "domains": ["test.example"],
            "listeners": [
                {"address": HOST, "port": self.smtp_port, "role": "mx"},
                {"address": HOST, "port": self.pop3_port, "role": "pop3"},
            ],
            "mail_dir": "mail_dir",
            "log": {"dir": "logs", "level": "INFO"},
            "fsync": True,
            "workers": cfg.workers,
            "trusted_networks": ["127.0.0.0/8"],  # may relay; no per-client limits
            "users": {**{box: {} for box in LOCAL_BOXES}, **pop_users},
            "auth": {"allow_plaintext": True, "max_failures": 1000},
            "relay": {
                "smarthost": f"{HOST}:{sink_port}",
                "smarthost_tls": "none",
                "concurrency": cfg.relay_concurrency,
                "retry_schedule": [1],
            },
            # Nothing answers there: no DNS question leaves the machine.
            "dns": {"nameservers": [f"{HOST}:{_free_port(socket.SOCK_DGRAM)}"], "timeout": 1},
        }
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.root / "stderr.txt", "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "geosmtp", "-c", str(self.config_path)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_for(self.serving, self.cfg.time_limit, "geosmtp to serve")

    def serving(self) -> bool:
        """Every worker runs and the SMTP port greets."""
        assert self.process is not None
        if self.process.poll() is not None:
            tail = (self.root / "stderr.txt").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"geosmtp exited {self.process.returncode}: {tail}")
        if len(self.workers()) != self.cfg.workers:
            return False
        try:
            with socket.create_connection((HOST, self.smtp_port), timeout=2) as s:
                return s.recv(100).startswith(b"220")
        except OSError:
            return False

    def workers(self) -> list[int]:
        assert self.process is not None
        return children(self.process.pid)

    def kill_master(self) -> None:
        assert self.process is not None
        pids = self.workers()
        self.process.kill()
        self.process.wait(timeout=10)
        wait_for(lambda: not any(children_alive(pids)), 10, "the workers to end")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def queued(self) -> int:
        """Queue records; not a `.<id>.tmp` a killed worker left half written
        (never acknowledged: the next start of the master removes it)."""
        records = self.mail_dir / ".queue" / "records"
        names = os.listdir(records) if records.is_dir() else []
        return sum(not name.startswith(".") for name in names)


def children_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def serving_process(pids: list[int], server_port: int, client_port: int) -> int | None:
    """Which of `pids` holds the server side of the connection 127.0.0.1:client_port
    -> server_port (its socket's inode in /proc/net/tcp, then the fds)."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split()
            if cols[1] == local and cols[2] == remote:
                inode = cols[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


# ------------------------------------------------------------------ POP3


def fill_pop3_box(mail_dir: Path, box: str, count: int) -> None:
    """`count` seen messages in cur/, as a reader leaves them."""
    for sub in ("tmp", "new", "cur"):
        (mail_dir / box / sub).mkdir(parents=True, exist_ok=True)
    cur = mail_dir / box / "cur"
    for n in range(count):
        data = f"Subject: kept {box} {n}\n\nbody {n}\n".encode()
        vsize = len(data) + data.count(b"\n")
        (cur / f"{1700000000 + n}.M{n}P1Q1.prefill,S={len(data)},W={vsize}:2,S").write_bytes(data)


@dataclass
class Pop3Outcome:
    box: str
    doomed: set[str] = field(default_factory=set)  # keys (UIDLs) marked deleted
    kept: set[str] = field(default_factory=set)
    reply: str = "none"  # "ok" (+OK to QUIT), "err", "cut" (no reply), "no-login"


def pop3_session(
    port: int, box: str, rng: random.Random, quit_sent: threading.Event, where: list
) -> Pop3Outcome:
    """Log in, DELE all but a few (pipelined), QUIT; what the client saw."""
    out = Pop3Outcome(box)
    try:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(f"USER {box}\r\nPASS {POP3_PASSWORD}\r\n".encode())
            f.readline()
            if not f.readline().startswith(b"+OK"):
                out.reply = "no-login"
                return out
            out.reply = "cut"  # from here on, an error is a cut session
            sock.sendall(b"UIDL\r\n")
            f.readline()
            uidls = []
            while (line := f.readline()) not in (b".\r\n", b""):
                uidls.append(line.split()[1].decode())
            keep = set(rng.sample(range(len(uidls)), min(3, len(uidls))))
            doomed = [i for i in range(len(uidls)) if i not in keep]
            out.kept = {uidls[i] for i in keep}
            out.doomed = {uidls[i] for i in doomed}
            sock.sendall(b"".join(f"DELE {i + 1}\r\n".encode() for i in doomed))
            for _ in doomed:
                if not f.readline().startswith(b"+OK"):
                    out.reply = "cut"
                    return out
            sock.sendall(b"QUIT\r\n")
            where.append(sock.getsockname()[1])
            quit_sent.set()
            line = f.readline()
            if line.startswith(b"+OK"):
                out.reply = "ok"
            elif line.startswith(b"-ERR"):
                out.reply = "err"
    except OSError:
        if out.reply == "none":
            out.reply = "no-login"
    return out


def pop3_open(port: int, box: str) -> bool:
    """A login (which finishes a cut UPDATE) and QUIT without deleting."""
    try:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(f"USER {box}\r\nPASS {POP3_PASSWORD}\r\nQUIT\r\n".encode())
            f.readline()
            return f.readline().startswith(b"+OK")
    except OSError:
        return False


def box_keys(mail_dir: Path, box: str) -> set[str]:
    out = set()
    for sub in ("new", "cur"):
        folder = mail_dir / box / sub
        if folder.is_dir():
            out.update(name.partition(":")[0] for name in os.listdir(folder))
    return out


# ------------------------------------------------------------------- SMTP


class Senders:
    """`sessions` threads, each one SMTP session sending its messages."""

    def __init__(self, cfg: TrialConfig, port: int, rng: random.Random, seed: int) -> None:
        self.cfg = cfg
        self.port = port
        self.lock = threading.Lock()
        self.sent: dict[str, tuple[list[str], bytes]] = {}
        self.acked: dict[str, list[str]] = {}  # token -> the recipients accepted
        self.plans = []
        for s in range(cfg.sessions):
            plan = []
            for k in range(cfg.per_session):
                n = s * cfg.per_session + k
                token = f"{seed}-{n}"
                rcpts = recipients(rng, n, token)
                plan.append((token, rcpts, message(token, rcpts)))
                self.sent[token] = (rcpts, plan[-1][2])
            self.plans.append(plan)
        self.threads = [
            threading.Thread(target=self._session, args=(plan,), daemon=True) for plan in self.plans
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _session(self, plan: list) -> None:
        try:
            with smtplib.SMTP(HOST, self.port, timeout=30) as client:
                for token, rcpts, data in plan:
                    refused = client.sendmail("sender@client.example", rcpts, data)
                    with self.lock:
                        self.acked[token] = [r for r in rcpts if r not in refused]
        except (OSError, smtplib.SMTPException):
            pass  # the kill cut this session: what it saw acknowledged is recorded


# ------------------------------------------------------------------ trial


def run_trial(seed: int, cfg: TrialConfig | None = None, root: Path | None = None) -> TrialResult:
    """One trial from its seed; `root` (kept) or a temporary folder (removed)."""
    cfg = cfg or TrialConfig()
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="crash-")) if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    result = TrialResult(seed)
    t0 = time.monotonic()
    sink = Sink(cfg.sink_delay)
    server = Server(root, cfg, sink.port)
    try:
        _trial(seed, cfg, server, sink, result)
    except (TimeoutError, RuntimeError) as exc:
        result.problems.append(f"server: {exc}")
    finally:
        server.stop()
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
        sink.close()
        result.seconds = time.monotonic() - t0
        if own and result.ok:
            shutil.rmtree(root, ignore_errors=True)
        elif own:
            result.problems.append(f"kept in {root}")
    return result


def _trial(seed: int, cfg: TrialConfig, server: Server, sink: Sink, result: TrialResult) -> None:
    rng = random.Random(seed)
    result.victim = rng.choice(["master", "worker"])
    if cfg.victim is not None:
        result.victim = cfg.victim
    result.moment = rng.choice(["load", "load", "update"]) if cfg.pop3_sessions else "load"
    delay = rng.uniform(0.05, cfg.max_delay)
    update_delay = rng.uniform(0.0, 0.01)
    pop_boxes = [f"p{i}" for i in range(cfg.pop3_sessions)]
    clock = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        result.phases[name] = round(now - clock[0], 2)
        clock[0] = now

    for box in pop_boxes:
        fill_pop3_box(server.mail_dir, box, cfg.pop3_box)
    server.start()
    phase("start")

    senders = Senders(cfg, server.smtp_port, rng, seed)
    quit_sent = threading.Event()
    where: list[int] = []
    pop_results: list[Pop3Outcome] = []
    pop_rngs = [random.Random(rng.random()) for _ in pop_boxes]

    def pop(i: int) -> None:
        pop_results.append(
            pop3_session(server.pop3_port, pop_boxes[i], pop_rngs[i], quit_sent, where)
        )

    pop_threads = [
        threading.Thread(target=pop, args=(i,), daemon=True) for i in range(len(pop_boxes))
    ]
    start = time.monotonic()
    senders.start()
    for t in pop_threads:
        t.start()

    # The moment.
    if result.moment == "update" and quit_sent.wait(cfg.max_delay * 3):
        time.sleep(update_delay)
    else:
        result.moment = "load"
        time.sleep(max(0.0, start + delay - time.monotonic()))
    workers = server.workers()
    if result.victim == "master":
        victim = server.process.pid  # type: ignore[union-attr]
    elif result.moment == "update":
        victim = serving_process(workers, server.pop3_port, where[0]) or rng.choice(workers)
    else:
        victim = rng.choice(workers)
    with sink.lock:
        result.in_flight = sink.holding
    result.delay = time.monotonic() - start
    os.kill(victim, signal.SIGKILL)
    phase("load")

    # Back up: started again, or the worker replaced.
    if result.victim == "master":
        server.process.wait(timeout=10)  # type: ignore[union-attr]
        wait_for(lambda: not children_alive(workers), 10, "the workers to end")
        senders.join(cfg.time_limit)
        for t in pop_threads:
            t.join(cfg.time_limit)
        server.start()
    else:
        wait_for(
            lambda: victim not in (w := server.workers()) and len(w) == cfg.workers,
            cfg.time_limit,
            "the worker to be replaced",
        )
        senders.join(cfg.time_limit)
        for t in pop_threads:
            t.join(cfg.time_limit)
        wait_for(server.serving, cfg.time_limit, "geosmtp to serve")
    if not senders.join(0) or any(t.is_alive() for t in pop_threads):
        result.problems.append("a client did not end")

    phase("back")
    result.journals = sum(
        (server.mail_dir / box / "geosmtp-pop3.expunge").exists() for box in pop_boxes
    )
    # A login to each POP3 box finishes an UPDATE the kill cut short.
    for box in pop_boxes:
        if not wait_for(lambda b=box: pop3_open(server.pop3_port, b), 20, f"a login to {box}"):
            result.problems.append(f"cannot log in to {box}")
    _check_pop3(server, pop_results, result)
    phase("pop3")

    # The queue drains to the sink.
    relayed = {(t, r) for t, rs in senders.acked.items() for r in rs if r.endswith(RELAY_DOMAIN)}

    def drained() -> bool:
        with sink.lock:
            got = {(t.decode(), r) for rs, d in sink.received for t in TOKEN.findall(d) for r in rs}
        return server.queued() == 0 and relayed <= got

    try:
        wait_for(drained, cfg.time_limit, "the queue to drain", interval=0.1)
    except TimeoutError:
        result.problems.append(f"queue not drained: {server.queued()} left")
    phase("drain")
    server.stop()
    phase("stop")
    _check_mail(server, senders, sink, result, cfg)


def _check_pop3(server: Server, outcomes: list[Pop3Outcome], result: TrialResult) -> None:
    for out in outcomes:
        left = box_keys(server.mail_dir, out.box)
        doomed_left = out.doomed & left
        state = "none" if not out.doomed else ("all" if not doomed_left else "kept")
        if doomed_left and doomed_left != out.doomed:
            state = "PART"
            result.problems.append(
                f"{out.box}: {len(out.doomed) - len(doomed_left)} of {len(out.doomed)} "
                "deleted: not all or nothing"
            )
        if out.reply == "ok" and doomed_left:
            result.problems.append(f"{out.box}: +OK to QUIT but {len(doomed_left)} not deleted")
        if not out.kept <= left:
            result.problems.append(f"{out.box}: a message not marked deleted is gone")
        if any(n.startswith("geosmtp-pop3.expunge") for n in os.listdir(server.mail_dir / out.box)):
            result.problems.append(f"{out.box}: a journal is left after a login")
        result.pop3.append(f"{out.reply}/{'deleted' if state == 'all' else state}")


def _check_mail(
    server: Server, senders: Senders, sink: Sink, result: TrialResult, cfg: TrialConfig
) -> None:
    stored: Counter = Counter()  # (token, box) -> copies
    for box in LOCAL_BOXES:
        for sub in ("new", "cur"):
            folder = server.mail_dir / box / sub
            if not folder.is_dir():
                continue
            for name in os.listdir(folder):
                data = (folder / name).read_bytes()
                tokens = TOKEN.findall(data.replace(b"\r\n", b"\n"))
                token = tokens[0].decode() if tokens else None
                if token not in senders.sent or not whole(data, senders.sent[token][1]):
                    result.partials += 1
                    result.problems.append(f"{box}/{sub}/{name}: not a whole message sent")
                    continue
                stored[(token, box)] += 1
    at_sink: Counter = Counter()
    for rcpts, data in sink.received:
        tokens = TOKEN.findall(data)
        token = tokens[0].decode() if tokens else None
        if token not in senders.sent or not whole(data, senders.sent[token][1]):
            result.partials += 1
            result.problems.append(f"the sink got a message not whole: {data[:80]!r}")
            continue
        for r in rcpts:
            at_sink[(token, r)] += 1

    result.acked = len(senders.acked)
    result.unacked = len(senders.sent) - result.acked
    for token, rcpts in senders.acked.items():
        for r in rcpts:
            local, _, domain = r.partition("@")
            if domain == RELAY_DOMAIN:
                result.acked_relayed += 1
                if at_sink[(token, r)]:
                    result.relayed_found += 1
                else:
                    result.problems.append(f"lost: {token} for {r} (acknowledged)")
                continue
            result.acked_local += 1
            copies = stored[(token, local)]
            if copies:
                result.found += 1
            else:
                result.problems.append(f"lost: {token} for {r} (acknowledged)")
    for (token, box), copies in stored.items():
        if copies > 1:
            result.duplicates += 1
            result.problems.append(f"{token} is in {box} {copies} times")
        if token not in senders.acked or f"{box}@test.example" not in senders.acked[token]:
            result.unacked_found += 1
    result.resent = sum(c - 1 for c in at_sink.values() if c > 1)
    resent_messages = {t for (t, _r), c in at_sink.items() if c > 1}
    if len(resent_messages) > cfg.relay_concurrency:
        result.problems.append(
            f"{len(resent_messages)} messages resent to the sink, more than could be in flight "
            f"({cfg.relay_concurrency})"
        )
