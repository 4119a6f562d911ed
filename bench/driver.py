"""Runs load generator processes, shows their progress, and sums up what they saw."""

from __future__ import annotations

import json
import math
import os
import selectors
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .servers import REPO, Server, machine_cpu, tree_by_process


class Worker:
    """One `python -m bench.loadgen` process."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.buf = b""
        self.ok = 0
        self.err = 0
        self.connected = 0
        self.sessions = 0  # pop3: sessions done
        self.ready = False
        self.result: dict | None = None
        self.send(json.dumps(spec))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def feed(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            t = msg.get("t")
            if t == "p":
                self.ok, self.err = msg["ok"], msg["err"]
                self.connected = msg.get("c", 0)
                self.sessions = msg.get("s", 0)
            elif t == "ready":
                self.ready = True
            elif t == "result":
                self.result = msg
                self.ok = msg["ok"]

    @property
    def done(self) -> bool:
        return self.result is not None or self.proc.poll() is not None

    def finish(self, timeout: float = 30) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Progress:
    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last_t = self.t0
        self.last_ok = 0
        self.last_print = 0.0

    def show(self, ok: int, err: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        every = 1.0 if self.tty else 5.0
        if not force and now - self.last_print < every:
            return
        rate = (ok - self.last_ok) / max(1e-6, now - self.last_t)
        self.last_t, self.last_ok, self.last_print = now, ok, now
        total = f"/{self.total}" if self.total else ""
        line = (
            f"  [{self.label}] {now - self.t0:6.1f}s  {ok}{total} msgs  {rate:7.0f}/s  "
            f"errors {err}{extra}"
        )
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
            if force:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def pump(
    workers: list[Worker],
    until: Callable[[], bool],
    timeout: float,
    progress: Progress | None = None,
    sample: Callable[[], None] | None = None,
) -> bool:
    """Read worker output until `until()` or `timeout`; call `sample` (the server's
    memory) meanwhile."""
    sel = selectors.DefaultSelector()
    for w in workers:
        if w.proc.stdout is not None and not w.done:
            os.set_blocking(w.proc.stdout.fileno(), False)
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
    deadline = time.monotonic() + timeout
    try:
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for key, _ in sel.select(timeout=min(0.25, left)):
                w = key.data
                try:
                    data = os.read(key.fd, 1 << 20)
                except BlockingIOError:
                    continue
                if data:
                    w.feed(data)
                else:
                    sel.unregister(key.fileobj)
            if sample is not None:
                sample()
            if progress is not None:
                conn = sum(w.connected for w in workers)
                extra = f"  connected {conn}" if conn else ""
                sessions = sum(w.sessions for w in workers)
                extra += f"  sessions {sessions}" if sessions else ""
                progress.show(sum(w.ok for w in workers), sum(w.err for w in workers), extra)
            if all(w.proc.poll() is not None for w in workers) and not sel.get_map():
                break
    finally:
        sel.close()
    return until()


@dataclass
class Outcome:
    """What a set of workers saw, summed."""

    ok: int = 0
    deliveries: int = 0
    bytes: int = 0
    start: float = 0.0
    end: float = 0.0
    latencies: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    acked: dict[int, tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    ack_times: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    connected: int = 0
    connect_retries: int = 0
    workers: int = 0
    sessions: int = 0  # pop3
    boxes_ok: int = 0  # pop3
    login_latencies: list[float] = field(default_factory=list)  # pop3
    not_logged_in: int = 0  # pop3: sessions the server did not log in (tried again)
    login_examples: list[str] = field(default_factory=list)  # pop3
    #: Seconds per session phase (`bench.loadgen.PHASES`), every worker's.
    phases: dict[str, list[float]] = field(default_factory=dict)
    #: load: messages acknowledged by each session.
    session_msgs: list[int] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return max(1e-9, self.end - self.start)

    def add(self, result: dict | None, spec: dict) -> None:
        from . import messages

        self.workers += 1
        if result is None:
            self.errors["worker died"] += 1
            return
        if self.start == 0.0 or result["start"] < self.start:
            self.start = result["start"]
        self.end = max(self.end, result["end"])
        self.ok += result["ok"]
        self.deliveries += result["deliveries"]
        self.bytes += result["bytes"]
        self.latencies.extend(result["latencies"])
        self.codes.update({int(k): v for k, v in result["codes"].items()})
        self.errors.update(result["errors"])
        self.examples.extend(result["examples"][: 10 - len(self.examples)])
        nr = int(spec.get("rcpts", 1))
        boxes = int(spec.get("mailboxes", messages.MAILBOXES))
        size = int(spec.get("size", 1024))
        for n in result["acked"]:
            self.acked[n] = (size, tuple(messages.recipients(n, nr, boxes)))
        self.refused.update(result["refused"])
        self.ack_times.extend(result.get("ack_times", []))
        self.client_cpu += result["cpu"]
        self.connected += result.get("connected", 0)
        self.connect_retries += result.get("connect_retries", 0)
        self.sessions += result.get("sessions", 0)
        self.boxes_ok += result.get("boxes_ok", 0)
        self.login_latencies.extend(result.get("login_latencies", []))
        self.not_logged_in += result.get("not_logged_in", 0)
        self.login_examples.extend(result.get("login_examples", [])[: 5 - len(self.login_examples)])
        for phase, seconds in result.get("phases", {}).items():
            self.phases.setdefault(phase, []).extend(seconds)
        self.session_msgs.extend(result.get("session_msgs", []))

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds."""
        return nearest_rank(self.latencies, q)

    def metrics(self) -> dict:
        d = self.duration
        return {
            "messages": self.ok,
            "msgs_per_s": self.ok / d,
            "deliveries_per_s": self.deliveries / d,
            "mb_per_s": self.bytes / d / 1e6,
            "duration_s": d,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "max_ms": max(self.latencies) * 1000 if self.latencies else float("nan"),
            "codes": dict(sorted(self.codes.items())),
            "errors": dict(self.errors),
            "error_examples": self.examples[:10],
            "client_cpu_s": self.client_cpu,
            "connect_retries": self.connect_retries,
            **self.fairness(),
        }

    def fairness(self) -> dict:
        """Per phase p50/p95/p99 (`dot_p99_ms`: end of DATA to 250, ...), and the
        messages each session got acknowledged: the slowest session's count
        against the mean shows a starved session, which percentiles over all
        messages hide (a starved session sends few messages, so few samples)."""
        out: dict = {}
        for phase, seconds in sorted(self.phases.items()):
            for q in (50, 95, 99):
                out[f"{phase}_p{q}_ms"] = nearest_rank(seconds, q)
            out[f"{phase}_max_ms"] = max(seconds) * 1000
        counts = self.session_msgs
        if counts:
            out["session_min_msgs"] = min(counts)
            out["session_mean_msgs"] = sum(counts) / len(counts)
            out["session_max_msgs"] = max(counts)
            out["sessions_counted"] = len(counts)
        return out


def nearest_rank(seconds: list[float], q: float) -> float:
    """Nearest-rank percentile q of durations in seconds, in milliseconds."""
    if not seconds:
        return float("nan")
    xs = sorted(seconds)
    k = min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))
    return xs[k] * 1000


def split_load(spec: dict, workers: int, key: str = "ids") -> list[dict]:
    """Share clients and the numbers in `spec[key]` (messages; pop3: mailboxes)
    among `workers` processes."""
    start, stop = spec[key][0], spec[key][1]
    clients = int(spec["clients"])
    workers = max(1, min(workers, clients))
    out = []
    for w in range(workers):
        part = dict(spec)
        part["clients"] = clients // workers + (1 if w < clients % workers else 0)
        part[key] = [start + w, stop, workers]
        out.append(part)
    return out


def run_jobs(
    specs: list[dict],
    label: str,
    timeout: float,
    server: Server | None = None,
    total: int | None = None,
    tree: bool = False,
) -> tuple[Outcome, dict]:
    """Run workers to completion; return their summed outcome and server figures.

    The server's CPU and RSS are always its process tree's (geosmtp's master
    and workers). `tree`: PSS peaks too (Dovecot forks one per session;
    PSS, so the pages they share count once: `tree_*` figures), sampled
    every half second, or less
    often when a sample is costly (reading PSS of hundreds of processes):
    the sampling takes at most 5% of a core. The whole
    machine's busy CPU time is taken too, and the driver's own, so that what
    other programs took meanwhile can be told (`machine_cpu_s`, `driver_cpu_s`).
    """
    srv: dict = {}
    samples: list[int] = []
    sample = None
    measured = server is not None and server.measurable
    if measured and tree:
        assert server is not None
        first = server.tree_mem()
        srv["tree_pss_before_kb"] = first["pss"]
        peak = dict(first)
        due = [0.0]

        def sample() -> None:
            now = time.monotonic()
            if now < due[0]:
                return
            m = server.tree_mem()
            for k in peak:
                peak[k] = max(peak[k], m[k])
            took = time.monotonic() - now
            due[0] = now + max(0.5, 20 * took)

        cpu0 = server.tree_cpu()
        machine0, driver0, window0 = machine_cpu(), _own_cpu(), time.monotonic()
    elif measured:
        assert server is not None
        srv["rss_before_kb"] = server.rss()
        rss0 = tree_by_process(server.pid, "VmRSS")
        srv["peak_reset"] = _reset(server)
        due = [0.0]

        def sample() -> None:
            now = time.monotonic()
            if now < due[0]:
                return
            rss = server.rss()
            if rss:
                samples.append(rss)
            due[0] = now + max(0.25, 20 * (time.monotonic() - now))

        cpu0 = server.cpu()
        machine0, driver0, window0 = machine_cpu(), _own_cpu(), time.monotonic()
    workers = [Worker(s) for s in specs]
    progress = Progress(label, total)
    try:
        pump(workers, lambda: all(w.done for w in workers), timeout, progress, sample)
        progress.show(sum(w.ok for w in workers), sum(w.err for w in workers), force=True)
    finally:
        for w in workers:
            w.finish(timeout=10)
    outcome = Outcome()
    for w, s in zip(workers, specs, strict=True):
        outcome.add(w.result, s)
    if measured and tree:
        assert server is not None
        srv["cpu_s"] = server.tree_cpu() - cpu0
        srv["machine_cpu_s"] = machine_cpu() - machine0
        srv["driver_cpu_s"] = _own_cpu() - driver0
        srv["window_s"] = time.monotonic() - window0
        srv["tree_pss_peak_kb"] = peak["pss"]
        srv["tree_rss_peak_kb"] = peak["rss"]
        srv["tree_procs_peak"] = peak["procs"]
    elif measured:
        assert server is not None
        srv["cpu_s"] = server.cpu() - cpu0
        srv["machine_cpu_s"] = machine_cpu() - machine0
        srv["driver_cpu_s"] = _own_cpu() - driver0
        srv["window_s"] = time.monotonic() - window0
        m = server.mem()
        srv["rss_after_kb"] = m.get("VmRSS", 0)
        # The sum of each process's peak (at least the tree's peak), or the
        # largest sampled sum.
        srv["rss_peak_kb"] = max([m.get("VmHWM", 0) if srv["peak_reset"] else 0, *samples])
        srv["procs"] = m.get("procs", 1)
        # Which process grew (MB, peak - before; a new process: its peak).
        srv["rss_growth_by_process_mb"] = {
            str(p): round((hwm - rss0.get(p, 0)) / 1024, 1)
            for p, hwm in tree_by_process(server.pid, "VmHWM").items()
        }
    return outcome, srv


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _reset(server: Server) -> bool:
    from .servers import reset_peak

    return reset_peak(server.pid)
