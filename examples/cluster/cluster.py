"""A geosmtp cluster on one machine, on loopback, run and checked (issue 22).

    examples/cluster/run [--messages 3000] [--quick] [--bench] [--no-proxy-protocol]

HAProxy (Debian's `haproxy`, TCP mode, round robin, SMTP health checks) in
front of two geosmtp instances (each its own ports, spool, queue, logs and
`workers: 2`), both handing local mail over LMTP to one private Dovecot
(`bench.peers.dovecot`, LMTP and POP3). The bench's load generator
(`bench.loadgen` through `bench.driver`) sends every message through HAProxy,
each with its unique `X-Bench-Id`. When part of the messages are
acknowledged, the first geosmtp instance (its master and workers: the
process group) gets SIGKILL; it is started again on the same spool and queue.
Once both queues are empty, every message in Dovecot is read back over
Dovecot's POP3 and counted by its id:

- every acknowledged message (the client read its `250`) is there (else lost);
- none is there twice (else duplicated). A message the killed instance had
  handed to Dovecot as the kill struck, before it could mark it delivered in
  its queue record, is sent again by the restart, as any MTA would (reported as
  `handed over at the kill`); Dovecot drops that second copy: a Sieve
  `duplicate` test on the Message-ID before every LMTP delivery
  (`bench.peers.dovecot`, `dedup=True`; reported as `dropped by Dovecot`);
- every message there is whole (its body's checksum) and was sent by this run;
- a message not acknowledged may or may not be there (counted, allowed).

It prints its verdict and exits 0 only when the check holds (1 when it does
not, 2 when it cannot run: what is missing is named). Everything it starts is
stopped at the end, on failure and on Ctrl-C too. `--bench`: no kill; the
throughput through HAProxy with one and with two front ends, as a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench import messages  # noqa: E402
from bench.driver import Outcome, Progress, Worker, pump, split_load  # noqa: E402
from bench.peers import dovecot as dovecot_peer  # noqa: E402
from bench.probe import free_port, free_udp_port, greets, wait_for  # noqa: E402

HOST = "127.0.0.1"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
PASSWORD = "cluster-pw"
BENCH_ID = re.compile(rb"^X-Bench-Id: (\S+)\r?$", re.MULTILINE)
BENCH_SUM = re.compile(rb"^X-Bench-Sum: sha256:([0-9a-f]+)\r?$", re.MULTILINE)
#: Deliveries at once per queue runner (one per worker) to Dovecot's LMTP.
LMTP_CONCURRENCY = 4


def say(text: str) -> None:
    """A progress line (stderr, flushed), with the time of day."""
    sys.stderr.write(f"[cluster {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def missing() -> list[str]:
    """The Debian packages this needs and does not find."""
    out = []
    if not os.access(HAPROXY, os.X_OK):
        out.append("haproxy")
    if not dovecot_peer.available():
        out.append("dovecot-pop3d")
    if not Path(dovecot_peer.LMTP_SERVER).exists():
        out.append("dovecot-lmtpd")
    if not Path(dovecot_peer.SIEVE_PLUGIN).exists():
        out.append("dovecot-sieve")
    return out


# ------------------------------------------------------------------ check


@dataclass
class Verdict:
    """The count of a run, by bench id; `ok` when nothing acknowledged was lost
    or duplicated and nothing stored was damaged or unknown."""

    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0  # distinct acknowledged ids found in Dovecot
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    handed_over: int = 0  # in the killed instance's queue and in Dovecot at the kill
    dropped: int = 0  # second copies Dovecot's Sieve discarded (its log)
    unacknowledged_arrived: int = 0
    damaged: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the run itself did not hold
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.damaged or self.unknown or self.problems)

    def line(self) -> str:
        return (
            f"verdict: {'PASS' if self.ok else 'FAIL'}: sent {self.sent}, "
            f"acknowledged {self.acknowledged}, delivered {self.delivered}, "
            f"lost {len(self.lost)}, duplicated {len(self.duplicated)}, "
            f"handed over at the kill {self.handed_over}, dropped by Dovecot {self.dropped}, "
            f"unacknowledged arrived {self.unacknowledged_arrived}, "
            f"damaged {len(self.damaged)}, unknown {len(self.unknown)}, "
            f"time {self.seconds:.1f}s"
        )

    def details(self) -> list[str]:
        out = []
        for name in ("problems", "lost", "duplicated", "damaged", "unknown"):
            ids = getattr(self, name)
            if ids:
                out.append(f"{name}: {' '.join(sorted(ids)[:20])}{' ...' if len(ids) > 20 else ''}")
        return out


def check(
    sent: Iterable[str],
    acknowledged: Iterable[str],
    found: Counter[str],
    damaged: Iterable[str] = (),
    dropped: int = 0,
    max_in_flight: int | None = None,
) -> Verdict:
    """The verdict on what Dovecot holds (`found`: copies by bench id): every
    acknowledged id exactly once, any other sent id at most once, no id that
    was not sent, nothing `damaged`; and no more copies `dropped` by
    Dovecot's duplicate test than deliveries could be in flight at the kill
    (`max_in_flight`): Dovecot hiding a front end that sends again what it
    had already delivered would be a fault the mailboxes do not show."""
    sent, acked = set(sent), set(acknowledged)
    v = Verdict(sent=len(sent), acknowledged=len(acked), dropped=dropped)
    v.lost = sorted(acked - set(found))
    v.delivered = len(acked & set(found))
    for bench_id, copies in found.items():
        if bench_id not in sent:
            v.unknown.append(bench_id)
        elif copies > 1:
            v.duplicated.append(bench_id)
        if bench_id in sent and bench_id not in acked:
            v.unacknowledged_arrived += 1
    v.damaged = sorted(set(damaged))
    if max_in_flight is not None and dropped > max_in_flight:
        v.problems.append(
            f"Dovecot dropped {dropped} second copies, more than the {max_in_flight} "
            "deliveries that could be in flight at the kill: a front end sent again "
            "what it had delivered"
        )
    if not acked:
        v.problems.append("nothing was acknowledged: nothing was checked")
    return v


#: Dovecot's log line for a delivery the Sieve script discarded (`dedup=True`).
DISCARDED = "discard action: Marked message to be discarded"


def dropped_copies(dovecot_log: str) -> int:
    """How many deliveries Dovecot discarded as duplicates, by its log."""
    return dovecot_log.count(DISCARDED)


def whole(run_id: str, n: int, size: int, rcpts: tuple[str, ...], body: bytes) -> bool:
    """Is `body` (LF line ends, unstuffed) the body of bench message `n`?"""
    expected = messages.build(run_id, n, size, rcpts).body_sum
    return hashlib.sha256(body).hexdigest()[:32] == expected


# --------------------------------------------------------------- HAProxy

HAPROXY_CONFIG = """\
global
    maxconn 4000
    log stderr format short local0 notice
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
frontend smtp
    bind {host}:{port}
    default_backend geosmtp
backend geosmtp
    balance roundrobin
    option smtpchk EHLO haproxy.cluster.test
{servers}
"""


class HAProxy:
    """A private HAProxy in the foreground (`-db`), its config in `root`."""

    def __init__(self, root: Path, backends: list[int], proxy_protocol: bool) -> None:
        self.root = root
        self.port = free_port(HOST)
        root.mkdir(parents=True, exist_ok=True)
        send = " send-proxy-v2 check-send-proxy" if proxy_protocol else ""
        servers = "\n".join(
            f"    server fe{i + 1} {HOST}:{port} check inter 500ms fall 2 rise 2{send}"
            for i, port in enumerate(backends)
        )
        self.config = root / "haproxy.cfg"
        self.config.write_text(HAPROXY_CONFIG.format(host=HOST, port=self.port, servers=servers))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        with open(self.root / "haproxy.out", "ab") as out:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.proc.returncode}: {self.log()}")
            return greets(HOST, self.port, b"220", timeout=1.0)

        wait_for(up, timeout, "HAProxy to pass a greeting through")

    def log(self) -> str:
        try:
            return (self.root / "haproxy.out").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# ----------------------------------------------------------------- geosmtp


class FrontEnd:
    """One geosmtp instance (a master and its workers, a process group of
    their own) in `root`: its config, spool and queue (`mail_dir`), logs."""

    def __init__(
        self, name: str, root: Path, lmtp: str, workers: int, proxy_protocol: bool
    ) -> None:
        self.name = name
        self.root = root
        self.port = free_port(HOST)
        self.admin_port = free_port(HOST)
        self.workers = workers
        self.proxy_protocol = proxy_protocol
        self.read_token = f"read-{name}-{os.urandom(8).hex()}"
        self.mail_dir = root / "mail_dir"
        root.mkdir(parents=True, exist_ok=True)
        listener: dict = {"address": HOST, "port": self.port, "role": "mx"}
        if proxy_protocol:  # the PROXY protocol (issue 22): HAProxy's header, from loopback only
            listener.update(proxy_protocol=True, proxy_trusted=["127.0.0.0/8"])
        config = {
            "hostname": f"{name}.cluster.test",
            "domains": [messages.DOMAIN],
            "listeners": [listener],
            "mail_dir": "mail_dir",
            "unknown_recipients": "accept",
            "fsync": True,
            "workers": workers,
            "max_clients": 20000,
            "log": {"dir": "logs", "level": "INFO"},
            "delivery": {"lmtp": lmtp},
            "relay": {"retry_schedule": [1], "concurrency": LMTP_CONCURRENCY},
            # Every client comes through HAProxy from 127.0.0.1: the limits out of reach.
            "client_limits": {
                "max_connections": 1_000_000,
                "connection_rate": 1_000_000,
                "message_rate": 1_000_000,
                "recipient_rate": 1_000_000,
                "max_errors": 1_000_000,
            },
            "admin": {
                "enabled": True,
                "address": HOST,
                "port": self.admin_port,
                "token": f"write-{name}-{os.urandom(8).hex()}",
                "read_token": self.read_token,
            },
            # Nothing answers there: no DNS question leaves the machine.
            "dns": {"nameservers": [f"{HOST}:{free_udp_port(HOST)}"], "timeout": 1},
        }
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.root / "stderr.txt", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "geosmtp", "-c", str(self.config_path)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # its own process group: kill -9 reaches all of it
            )
        wait_for(self.serving, timeout, f"{self.name} to serve")

    def serving(self) -> bool:
        """The master runs, all its workers too, and the port greets (directly:
        a PROXY-protocol listener would close it, so that case asks the admin API)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.root / "stderr.txt").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {tail}")
        if len(self.group()) < self.workers + 1:
            return False
        if not self.proxy_protocol and not greets(HOST, self.port, b"220", timeout=1.0):
            return False
        try:
            self.scrape()
        except OSError:
            return False
        return True

    def group(self) -> list[int]:
        """The live processes of its process group."""
        if self.proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                except OSError:
                    continue
                if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                    pids.append(int(entry))
        return pids

    def kill9(self) -> int:
        """SIGKILL to the whole process group (the master and its workers);
        returns how many processes it had; waits until none is left."""
        assert self.proc is not None
        count = len(self.group())
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        wait_for(lambda: not self.group(), 10, f"{self.name}'s workers to end", 0.02)
        return count

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            try:  # anything of its group still there (a worker the master lost)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def queued(self) -> int:
        records = self.mail_dir / ".queue" / "records"
        names = os.listdir(records) if records.is_dir() else []
        return sum(not name.startswith(".") for name in names)

    def queued_ids(self) -> set[str]:
        """The bench ids of the messages with a queue record (not all delivered)."""
        out: set[str] = set()
        queue = self.mail_dir / ".queue"
        records = queue / "records"
        for name in os.listdir(records) if records.is_dir() else []:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                head = (queue / "messages" / name[: -len(".json")]).read_bytes()[:4096]
            except OSError:
                continue
            out.update(m.decode() for m in BENCH_ID.findall(head))
        return out

    def scrape(self) -> str:
        """Its Prometheus `/metrics` (all workers added up), with the read token."""
        request = urllib.request.Request(
            f"http://{HOST}:{self.admin_port}/metrics",
            headers={"Authorization": f"Bearer {self.read_token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.read().decode()


def series(text: str, name: str) -> float:
    """The sum of a metric's samples named `name` in a Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


KEY_SERIES = (
    "geosmtp_messages_accepted_total",
    "geosmtp_connections_total",
    "geosmtp_relay_deliveries_total",
    "geosmtp_queue_entries",
)


# ------------------------------------------------------------------ Dovecot


def maildir_ids(mail_dir: Path) -> set[str]:
    """The bench ids in Dovecot's Maildirs now (a quick look at the files)."""
    out: set[str] = set()
    for path in mail_dir.glob("*/*/*"):
        if path.parent.name in ("new", "cur"):
            try:
                head = path.read_bytes()[:4096]
            except OSError:
                continue
            out.update(m.decode() for m in BENCH_ID.findall(head))
    return out


def read_over_pop3(
    dc: dovecot_peer.Dovecot, users: list[str], spec: dict
) -> tuple[Counter[str], list[str]]:
    """Every message in every user's INBOX, through Dovecot's POP3: copies by
    bench id, and the ids whose body is not the one sent."""
    found: Counter[str] = Counter()
    damaged = []
    run_id, size = spec["run_id"], int(spec["size"])
    nrcpt, boxes = int(spec["rcpts"]), int(spec["mailboxes"])
    for user in users:
        client = poplib.POP3(dc.host, dc.port, timeout=30)
        try:
            client.user(user)
            client.pass_(PASSWORD)
            count, _ = client.stat()
            for number in range(1, count + 1):
                lines = client.retr(number)[1]
                text = b"\n".join(lines) + b"\n"
                head, _, body = text.partition(b"\n\n")
                ids = BENCH_ID.findall(head)
                bench_id = ids[0].decode() if ids else f"{user}:{number}:no-id"
                found[bench_id] += 1
                prefix, _, n = bench_id.rpartition(".")
                if prefix != run_id or not n.isdigit():
                    continue
                rcpts = tuple(messages.recipients(int(n), nrcpt, boxes))
                if not whole(run_id, int(n), size, rcpts, body):
                    damaged.append(bench_id)
        finally:
            client.quit()
    return found, damaged


# -------------------------------------------------------------------- run


@dataclass
class Options:
    messages: int = 3000
    clients: int = 40
    size: int = 1024
    mailboxes: int = 10
    workers: int = 2
    rounds: int = 4  # of new SMTP sessions (HAProxy balances connections, not messages)
    kill_at: float = 0.3  # the share of messages acknowledged when the kill comes
    time_limit: float = 540.0  # for the whole run
    proxy_protocol: bool = True
    keep: Path | None = None


class Cluster:
    """The topology: Dovecot, `fronts` geosmtp instances, HAProxy in front."""

    def __init__(self, root: Path, opts: Options, fronts: int = 2) -> None:
        self.root = root
        self.opts = opts
        self.users = [messages.mailbox(i, opts.mailboxes) for i in range(opts.mailboxes)]
        # Dovecot's files in the run's folder too (kept with the rest on a failure);
        # its mail user (nobody, when run as root) must reach the Maildirs there.
        os.chmod(root, 0o755)
        self.dovecot = dovecot_peer.Dovecot(
            None,
            dict.fromkeys(self.users, PASSWORD),
            root=root / "dovecot",
            lmtp=True,
            dedup=True,  # drops the second copy of a message resent after the kill
            performance=True,
        )
        lmtp = f"{HOST}:{self.dovecot.lmtp_port}"
        self.fronts = [
            FrontEnd(f"fe{i + 1}", root / f"fe{i + 1}", lmtp, opts.workers, opts.proxy_protocol)
            for i in range(fronts)
        ]
        self.haproxy = HAProxy(root / "haproxy", [f.port for f in self.fronts], opts.proxy_protocol)

    def start(self) -> None:
        say(f"starting Dovecot (LMTP {self.dovecot.lmtp_port}, POP3 {self.dovecot.port})")
        self.dovecot.start()
        for fe in self.fronts:
            say(f"starting {fe.name} (SMTP {fe.port}, metrics {fe.admin_port}, {fe.root})")
            fe.start()
        say(f"starting HAProxy on {HOST}:{self.haproxy.port}")
        self.haproxy.start()

    def stop(self) -> None:
        for step in (self.haproxy.stop, *(fe.stop for fe in self.fronts), self.dovecot.cleanup):
            try:
                step()
            except Exception as exc:
                say(f"while stopping: {exc!r}")

    def drained(self) -> bool:
        return all(fe.queued() == 0 for fe in self.fronts)


def load_spec(opts: Options, port: int, run_id: str) -> dict:
    return {
        "kind": "load",
        "host": HOST,
        "port": port,
        "run_id": run_id,
        "ids": [0, opts.messages],
        "clients": opts.clients,
        "size": opts.size,
        "rcpts": 1,
        "mailboxes": opts.mailboxes,
        "io_timeout": 30,
        "deadline": opts.time_limit,
    }


def traffic(
    spec: dict,
    timeout: float,
    rounds: int = 1,
    at: float | None = None,
    action: Callable[[], None] | None = None,
) -> Outcome:
    """The bench's load generator (two processes a round) through HAProxy.

    The messages go in `rounds` rounds, each with new SMTP sessions (HAProxy
    spreads new connections only: a restarted front end gets its share from
    the next round on); `action()` once `at` of all the messages are
    acknowledged."""
    first, total = spec["ids"]
    outcome = Outcome()
    deadline = time.monotonic() + timeout
    pending = action if at is not None else None
    goal = int(total * (at or 0))
    for r in range(rounds):
        part = dict(spec, ids=[first + total * r // rounds, first + total * (r + 1) // rounds])
        specs = split_load(part, 2)
        workers = [Worker(s) for s in specs]
        progress = Progress(f"round {r + 1}/{rounds}", part["ids"][1] - part["ids"][0])
        try:
            if pending is not None:
                left = goal - outcome.ok  # acknowledgements this round until the action
                pump(
                    workers,
                    partial(acked_or_ended, workers, left),
                    deadline - time.monotonic(),
                    progress,
                )
                if acked(workers, left):
                    pending()
                    pending = None
            pump(workers, partial(ended, workers), deadline - time.monotonic(), progress)
            progress.show(sum(w.ok for w in workers), sum(w.err for w in workers), force=True)
        finally:
            for w in workers:
                w.finish(timeout=10)
                drain(w)
        for w, s in zip(workers, specs, strict=True):
            outcome.add(w.result, s)
    return outcome


def acked(workers: list[Worker], goal: int) -> bool:
    return sum(w.ok for w in workers) >= goal


def ended(workers: list[Worker]) -> bool:
    return all(w.done for w in workers)


def acked_or_ended(workers: list[Worker], goal: int) -> bool:
    return acked(workers, goal) or ended(workers)


def drain(worker: Worker) -> None:
    """Read what an ended load generator left in its pipe (its result line
    may still be there when `pump` saw it exit)."""
    out = worker.proc.stdout
    if out is None or worker.result is not None:
        return
    os.set_blocking(out.fileno(), True)
    worker.feed(out.read())


def run_check(opts: Options) -> int:
    """The run with a kill in the middle and its check; the exit code."""
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="geosmtp-cluster-"))
    cluster = Cluster(root, opts)
    run_id = f"cluster{os.getpid()}"
    spec = load_spec(opts, cluster.haproxy.port, run_id)
    victim = cluster.fronts[0]
    handed_over: set[str] = set()
    verdict = None
    interrupted = False
    try:
        cluster.start()

        killed: list[int] = []

        def kill() -> None:
            count = victim.kill9()
            killed.append(count)
            # Handed to Dovecot, its queue record still unmarked: the restart sends them again.
            handed_over.update(victim.queued_ids() & maildir_ids(cluster.dovecot.mail_dir))
            say(f"kill -9 {victim.name}: {count} processes; restarting it on the same spool")
            victim.start()
            say(f"{victim.name} is back")

        say(f"sending {opts.messages} messages with {opts.clients} clients through HAProxy")
        outcome = traffic(spec, opts.time_limit, opts.rounds, opts.kill_at, kill)
        left = max(10.0, opts.time_limit - (time.monotonic() - t0))
        say(f"acknowledged {outcome.ok}; waiting for both queues to empty")
        wait_for(cluster.drained, left, "both queues to empty", 0.2)
        metrics = report_metrics(cluster, root)
        say("reading every mailbox over Dovecot's POP3")
        found, damaged = read_over_pop3(cluster.dovecot, cluster.users, spec)
        sent = [f"{run_id}.{n}" for n in range(opts.messages)]
        acked = [f"{run_id}.{n}" for n in outcome.acked]
        # Each message has one recipient: one LMTP transaction each, at most
        # relay.concurrency of them at once per front end (its workers share it).
        verdict = check(
            sent, acked, found, damaged, dropped_copies(cluster.dovecot.log()), LMTP_CONCURRENCY
        )
        verdict.handed_over = len(handed_over)
        if outcome.errors["worker died"]:
            verdict.problems.append(
                "a load generator gave no result: its acknowledgements are unknown"
            )
        if not killed:
            verdict.problems.append("the traffic ended before the kill")
        verdict.seconds = time.monotonic() - t0
        if outcome.errors:
            say(f"client errors (cut sessions are expected): {dict(outcome.errors)}")
        say("accepted by instance (Prometheus, since its last start): " + metrics)
    except (TimeoutError, RuntimeError, OSError) as exc:
        say(f"the run failed: {exc}")
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        interrupted = True
    finally:
        cluster.stop()
    keep = verdict is None or not verdict.ok or opts.keep is not None
    if keep and opts.keep is not None:
        # Dovecot's run/ holds its sockets and pipes, which cannot be copied.
        shutil.copytree(
            root, opts.keep, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns("run")
        )
    if keep:
        say(f"logs kept in {opts.keep or root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        print("verdict: FAIL: interrupted; everything it started is stopped")
        return 130
    if verdict is None:
        print(f"verdict: FAIL: the run did not finish, time {time.monotonic() - t0:.1f}s")
        return 1
    for line in verdict.details():
        print(f"  {line}")
    print(verdict.line(), flush=True)
    return 0 if verdict.ok else 1


def report_metrics(cluster: Cluster, root: Path) -> str:
    """Scrape each front end's /metrics; save it; print the key series."""
    parts = []
    for fe in cluster.fronts:
        text = fe.scrape()
        (root / f"metrics-{fe.name}.prom").write_text(text)
        figures = ", ".join(f"{name} {series(text, name):g}" for name in KEY_SERIES)
        say(f"metrics {fe.name}: {figures}")
        parts.append(f"{fe.name} {series(text, 'geosmtp_messages_accepted_total'):g}")
    return ", ".join(parts)


BENCH_SETUPS = ((1, "direct"), (1, "HAProxy"), (2, "HAProxy"))


def bench_cluster(root: Path, opts: Options, fronts: int, path: str) -> Cluster:
    """The topology of one bench setup: for the `direct` path the clients
    reach the front end without HAProxy, so its listener takes no PROXY
    header (it would close every connection that sends none)."""
    if path == "direct":
        opts = replace(opts, proxy_protocol=False)
    return Cluster(root, opts, fronts)


def bench_once(opts: Options, fronts: int, path: str) -> dict:
    """One load (no kill) on a fresh topology; its figures."""
    root = Path(tempfile.mkdtemp(prefix="geosmtp-cluster-bench-"))
    cluster = bench_cluster(root, opts, fronts, path)
    port = cluster.haproxy.port if path == "HAProxy" else cluster.fronts[0].port
    spec = load_spec(opts, port, f"clusterbench{fronts}{path}{os.getpid()}")
    try:
        cluster.start()
        say(f"{fronts} front end(s), {path}: {opts.messages} messages, {opts.clients} clients")
        outcome = traffic(spec, opts.time_limit)
        wait_for(cluster.drained, opts.time_limit, "the queues to empty", 0.2)
        accepted = [series(fe.scrape(), "geosmtp_messages_accepted_total") for fe in cluster.fronts]
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    m = outcome.metrics()
    return {
        "front_ends": fronts,
        "path": path,
        "workers_each": opts.workers,
        "messages": m["messages"],
        "msgs_per_s": round(m["msgs_per_s"], 1),
        "p50_ms": round(m["p50_ms"], 1),
        "p99_ms": round(m["p99_ms"], 1),
        "accepted_by_instance": accepted,
        "errors": m["errors"],
    }


def run_bench(opts: Options, out: Path | None, repeat: int = 1) -> int:
    """Throughput through HAProxy with one and with two front ends (no kill),
    and with one front end without HAProxy (what HAProxy costs); the setups
    alternate `repeat` times, the table shows each one's median round."""
    runs: dict[tuple[int, str], list[dict]] = {setup: [] for setup in BENCH_SETUPS}
    for r in range(repeat):
        for fronts, path in BENCH_SETUPS:
            say(f"round {r + 1}/{repeat}")
            runs[fronts, path].append(bench_once(opts, fronts, path))
    rows = []
    for setup_runs in runs.values():
        ranked = sorted(setup_runs, key=lambda row: row["msgs_per_s"])
        median = dict(ranked[len(ranked) // 2])
        median["rounds_msgs_per_s"] = [row["msgs_per_s"] for row in setup_runs]
        rows.append(median)
    table = bench_table(rows, opts)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cluster-haproxy.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "cluster-haproxy.md").write_text(table + "\n")
        bench_plot(rows, out / "cluster-haproxy.png")
        say(f"written: {out}/cluster-haproxy.{{md,json,png}}")
    return 0 if all(r["messages"] == opts.messages for rs in runs.values() for r in rs) else 1


def bench_table(rows: list[dict], opts: Options) -> str:
    lines = [
        f"{opts.messages} messages of {opts.size} octets, {opts.clients} SMTP sessions, "
        f"through HAProxy (TCP, round robin) or straight to the one front end; each front "
        f"end `workers: {opts.workers}`, fsync on, LMTP to one Dovecot; {os.cpu_count()} CPUs.",
        "",
        "| front ends | path | msgs/s (median) | each round | p50 ms | p99 ms "
        "| accepted by instance (Prometheus) |",
        "|---:|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        acc = " / ".join(f"{a:g}" for a in r["accepted_by_instance"])
        lines.append(
            f"| {r['front_ends']} | {r['path']} | {r['msgs_per_s']:,.0f} | "
            f"{' / '.join(f'{x:,.0f}' for x in r['rounds_msgs_per_s'])} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {acc} |"
        )
    return "\n".join(lines)


def bench_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"{r['front_ends']}, {r['path']}" for r in rows]
    ax.bar(labels, [r["msgs_per_s"] for r in rows], color="tab:blue")
    ax.set_xlabel("geosmtp front ends, path")
    ax.set_ylabel("messages/s (250 received)")
    ax.set_title(f"SMTP into one machine, {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="examples/cluster/run", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=None, help="messages to send (default 3000)")
    p.add_argument("--clients", type=int, default=None, help="SMTP sessions at once (default 40)")
    p.add_argument("--quick", action="store_true", help="a short run: 300 messages, 20 clients")
    p.add_argument(
        "--proxy-protocol",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HAProxy sends PROXY v2 headers, so the front ends see each client (default: on)",
    )
    p.add_argument("--workers", type=int, default=2, help="workers of each geosmtp (default 2)")
    p.add_argument("--keep", type=Path, help="copy the run's files (logs, metrics) here")
    p.add_argument("--bench", action="store_true", help="throughput with 1 and 2 front ends")
    p.add_argument("--out", type=Path, help="--bench: write the table, JSON and plot here")
    p.add_argument("--repeat", type=int, default=1, help="--bench: rounds of every setup")
    args = p.parse_args(argv)
    lacking = missing()
    if lacking:
        print(f"cannot run: missing {', '.join(lacking)} (apt-get install {' '.join(lacking)})")
        return 2
    opts = Options(workers=args.workers, proxy_protocol=args.proxy_protocol, keep=args.keep)
    if args.quick:
        opts.messages, opts.clients = 300, 20
    if args.messages is not None:
        opts.messages = args.messages
    if args.clients is not None:
        opts.clients = args.clients

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        return run_bench(opts, args.out, args.repeat) if args.bench else run_check(opts)
    except KeyboardInterrupt:
        print("verdict: FAIL: interrupted; everything started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
