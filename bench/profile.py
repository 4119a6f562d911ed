"""`python -m bench profile`: where geosmtp spends its time under a load scenario.

With py-spy (default): geosmtp runs as in `run`, `py-spy record` samples it for
the whole load, and the collapsed stacks are summed into the top functions
by own time ("self": the function was running) and by total time ("total":
it was on the stack). With `--tool cprofile`, geosmtp runs under cProfile
instead (slower, and greenlet switches blur the totals; own times are fine).

Writes bench/results/profile.{raw|svg|json} and profile.md.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .driver import run_jobs, split_load
from .report import RESULTS
from .scenarios import Options, _finish, new_run_id
from .servers import HOST, Geosmtp


class ProfiledGeosmtp(Geosmtp):
    """geosmtp under cProfile (the profile is written when it stops on SIGTERM)."""

    out: Path = RESULTS / "profile.pstats"

    def command(self) -> list[str]:
        cmd = super().command()
        return [sys.executable, "-m", "cProfile", "-o", str(self.out), *cmd[1:]]


def _main_thread(raw: Path) -> str:
    """The thread whose stacks hold the sessions: gevent's hub thread."""
    hits: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        if "thread (" in line and "SMTPSession" in line:
            stack, _, count = line.rpartition(" ")
            hits[stack.split(";", 1)[0]] += int(count) if count.isdigit() else 0
    return hits.most_common(1)[0][0] if hits else ""


def _collapse(raw: Path) -> tuple[Counter, Counter, int, Counter, int]:
    """Own and total samples of the main thread (the hub, where every greenlet runs),
    and own samples of the other threads (gevent's threadpool: fsync)."""
    main = _main_thread(raw)
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    others: Counter[str] = Counter()
    samples = other_samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        # py-spy --subprocesses: `process PID:"cmd";...;thread (TID);...`
        pid = ""
        while frames and frames[0].startswith("process "):
            pid = frames.pop(0)[len("process ") :].partition(":")[0]
        thread = frames.pop(0) if frames and frames[0].startswith("thread (") else ""
        frames = [f for f in frames if not f.startswith("process ")]
        leaf = _short(frames[-1]) if frames else "(no Python frame: in C, e.g. the event loop)"
        # Several processes: each one's main thread (its hub) is main.
        if thread == main or (pid and thread == f"thread ({pid})"):
            samples += n
            own[leaf] += n
            for f in {_short(f) for f in frames}:
                total[f] += n
        else:
            other_samples += n
            others[leaf] += n
    return own, total, samples, others, other_samples


def _short(frame: str) -> str:
    """`func (/long/path/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    for anchor in ("site-packages", "lib", "work"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            parts = parts[idx + 1 :]
            break
    return f"{name} ({'/'.join(parts[-3:])})"


def _table(title: str, counts: Counter, samples: int, top: int = 25) -> str:
    lines = [f"### {title}", "", "| share | samples | function |", "|---:|---:|---|"]
    for name, n in counts.most_common(top):
        lines.append(f"| {100 * n / samples:5.1f}% | {n} | `{name}` |")
    return "\n".join(lines) + "\n"


def _spy_command(pid: int, out: Path, args: argparse.Namespace, idle: bool = True) -> list[str]:
    """`py-spy record` of geosmtp's processes (the master and its workers);
    `idle`: waiting threads are sampled too (shares of wall time, not CPU)."""
    return [
        "py-spy",
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        *([] if args.native else ["--nonblocking"]),
        "--threads",
        *(["--idle"] if idle else []),
        "--subprocesses",  # the workers: the master serves no client
        *(["--native"] if args.native else []),
        "--format",
        args.format,
        "--output",
        str(out),
    ]


def profile(args: argparse.Namespace, opts: Options) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    clients = opts.pick(100, 100, opts.clients)
    count = opts.pick(20000, 2000, opts.messages)
    rcpts = 5 if args.scenario == "fanout" else 1
    if args.scenario == "relay":
        return profile_relay(args, opts)
    if args.scenario not in ("throughput", "fanout"):
        print("profile: throughput, fanout or relay", file=sys.stderr)
        return 2
    tool = args.tool
    if tool == "py-spy" and not shutil.which("py-spy"):
        print("py-spy not found (pip install py-spy); using cProfile", file=sys.stderr)
        tool = "cprofile"
    server = ProfiledGeosmtp(fsync=opts.fsync) if tool == "cprofile" else Geosmtp(fsync=opts.fsync)
    ext = {"raw": "raw", "flamegraph": "svg", "speedscope": "json"}[args.format]
    out = RESULTS / (f"profile-{args.tag}.{ext}" if args.tag else f"profile.{ext}")
    spy = None
    try:
        server.start()
        out.unlink(missing_ok=True)
        if tool == "py-spy":
            spy = subprocess.Popen(
                _spy_command(server.pid, out, args),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)
        run_id = new_run_id("profile", server.name)
        spec = {
            "kind": "load",
            "host": HOST,
            "port": server.port,
            "run_id": run_id,
            "clients": clients,
            "ids": [0, count, 1],
            "size": opts.size or 1024,
            "rcpts": rcpts,
            "pipelining": opts.pipelining,
            "deadline": opts.time_limit,
            "io_timeout": 120,
        }
        outcome, srv = run_jobs(
            split_load(spec, opts.workers), f"profile/{tool}", opts.time_limit + 60, server, count
        )
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            _out, err = spy.communicate(timeout=60)
            if not out.exists():
                print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
                return 1
        verdict = _finish(server, outcome, run_id, opts)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        server.stop()
        server.cleanup()
    m = outcome.metrics()
    head = (
        f"## geosmtp profile: {args.scenario}, {clients} sessions, {count} messages, "
        f"{rcpts} recipient(s), {tool}\n\n"
        f"{m['msgs_per_s']:,.0f} msgs/s under the profiler, p99 {m['p99_ms']:.1f} ms, server CPU "
        f"{srv.get('cpu_s', 0):.1f}s over {m['duration_s']:.1f}s; Maildir: {verdict.summary()}\n\n"
    )
    if tool == "cprofile":
        stats = pstats.Stats(str(ProfiledGeosmtp.out))
        total_tt = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:30]  # type: ignore[attr-defined]
        body = "| own time | share | calls | function |\n|---:|---:|---:|---|\n"
        for (file, line, fn), (_cc, nc, tt, _ct, _callers) in rows:
            where = "/".join(Path(file).parts[-3:])
            body += f"| {tt:.2f}s | {100 * tt / total_tt:.1f}% | {nc} | `{fn} ({where}:{line})` |\n"
        text = head + body
    elif args.format == "raw":
        own, total, samples, others, other_samples = _collapse(out)
        text = (
            head + f"py-spy --idle --threads: {samples} samples of the main thread (the gevent hub,"
            " where every session runs; idle and blocking time included, so the shares are"
            f" of wall time) and {other_samples} of the other threads.\n\n"
            + _table("Main thread, own time (the function itself was running)", own, samples)
            + "\n"
            + _table("Main thread, total time (the function was on the stack)", total, samples)
            + "\n"
            + _table("Other threads (gevent's threadpool), own time", others, other_samples, 10)
        )
    else:
        text = head + f"flame graph: {out.name}\n"
    tag = f"-{args.tag}" if args.tag else ""  # keeps earlier profiles
    md = RESULTS / (
        f"profile{tag}.md" if args.format == "raw" else f"profile-{args.format}{tag}.md"
    )
    md.write_text(text)
    print(text)
    print(f"written: {out}, {md}")
    return 0 if verdict.ok and not outcome.errors else 1


#: Where a relayed message's time goes: the first group (in this order) one
#: of whose patterns is in a sample's stack of the main thread. Cross-cutting
#: work (logging, metrics) first, then the queue's store, the outbound
#: client, the SMTP receive path, the runner's own bookkeeping.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("master process (log pipe, supervision)", ("geosmtp/server/master.py",)),
    ("logging (loguru, access log)", ("loguru/", "geosmtp/logs.py", "server/logpipe.py")),
    ("metrics", ("geosmtp/metrics.py", "prometheus_client/")),
    ("queue store: add (link, record, fsyncs)", ("add (geosmtp/queue/store.py",)),
    ("queue store: save a record", ("save (geosmtp/queue/store.py",)),
    ("queue store: remove", ("remove (geosmtp/queue/store.py",)),
    ("outbound client (relay/)", ("geosmtp/relay/",)),
    ("runner: attempt bookkeeping", ("geosmtp/queue/",)),
    ("pipeline stages (router, queue destination)", ("geosmtp/pipeline/",)),
    ("SMTP receive (session, parser, spool)", ("geosmtp/smtp/", "server/smtp.py", "storage/")),
    ("gevent (hub, sockets, threadpool switch)", ("gevent/",)),
]


def _group(stack: str) -> str:
    for name, patterns in GROUPS:
        if any(p in stack for p in patterns):
            return name
    return "other"


def _groups(raw: Path) -> tuple[Counter, int]:
    """Samples of the main threads by `GROUPS`, idle ones (the hub waiting:
    no Python frame below its loop) apart."""
    main = _main_thread(raw)
    groups: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        pid = ""
        while frames and frames[0].startswith("process "):
            pid = frames.pop(0)[len("process ") :].partition(":")[0]
        thread = frames.pop(0) if frames and frames[0].startswith("thread (") else ""
        if not (thread == main or (pid and thread == f"thread ({pid})")):
            continue
        n = int(count)
        samples += n
        short = ";".join(_short(f) for f in frames)
        leaf = frames[-1] if frames else ""
        idle = not frames or leaf.startswith(("run (gevent/hub.py", "wait (")) or "(idle)" in leaf
        groups[
            "(idle: the hub waiting)" if idle and "geosmtp/" not in short else _group(short)
        ] += n
    return groups, samples


class _SpiedGeosmtp(Geosmtp):
    """geosmtp sampled by py-spy from its start to its (first) stop."""

    out: Path = RESULTS / "profile-relay.raw"
    args: argparse.Namespace
    spy: subprocess.Popen | None = None
    spy_error = ""

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)
        self.out.unlink(missing_ok=True)
        self.spy = subprocess.Popen(
            _spy_command(self.pid, self.out, self.args, idle=self.args.idle),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)

    def stop(self) -> None:
        spy, self.spy = self.spy, None
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                self.spy_error = spy.communicate(timeout=60)[1].decode(errors="replace")[-500:]
            except subprocess.TimeoutExpired:
                spy.kill()
        super().stop()


def profile_relay(args: argparse.Namespace, opts: Options) -> int:
    """The relay scenario (bench -> geosmtp at `workers: 1` -> the sink) under
    py-spy: the top functions, and a message's time by `GROUPS`."""
    if args.tool != "py-spy" or args.format != "raw":
        print("profile relay: py-spy with --format raw", file=sys.stderr)
        return 2
    tag = f"-{args.tag}" if args.tag else ""
    spied = type(
        "SpiedGeosmtp",
        (_SpiedGeosmtp,),
        {"args": args, "out": RESULTS / f"profile-relay{tag}.raw"},
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    from .scenarios import relay

    [row] = relay(spied, opts)
    out = spied.out
    if not out.exists():
        print(f"py-spy failed: {spied.spy_error}", file=sys.stderr)
        return 1
    delivered = max(1, row.get("sink_received", 0))
    own, total, samples, others, other_samples = _collapse(out)
    groups, main_samples = _groups(out)
    rate = 250.0
    lines = [
        "### A relayed message's time by group (main threads)",
        "",
        "| group | share of busy | samples | ms per delivered message |",
        "|---|---:|---:|---:|",
    ]
    busy = main_samples - groups.get("(idle: the hub waiting)", 0)
    for name, n in groups.most_common():
        share = "" if name.startswith("(idle") else f"{100 * n / max(1, busy):5.1f}%"
        lines.append(f"| {name} | {share} | {n} | {1000 * n / rate / delivered:.3f} |")
    head = (
        f"## geosmtp profile: relay, {row.get('clients')} sessions, {delivered} delivered, "
        f"py-spy{'' if args.idle else ' --no-idle (CPU samples only)'}\n\n"
        f"{row.get('accept_per_s', 0):,.0f} accepted / "
        f"{row.get('delivery_per_s', 0):,.0f} delivered msgs/s under the profiler, "
        f"{row.get('cpu_ms_per_msg', float('nan')):.2f} ms CPU per message (the profiler's "
        f"own reading of the processes included), lost {row.get('missing', '?')}, "
        f"duplicated {row.get('duplicates', '?')}\n\n"
    )
    text = (
        head
        + "\n".join(lines)
        + "\n\n"
        + _table("Main thread, own time (the function itself was running)", own, samples)
        + "\n"
        + _table("Main thread, total time (the function was on the stack)", total, samples)
        + "\n"
        + _table("Other threads (gevent's threadpool), own time", others, other_samples, 10)
    )
    md = RESULTS / f"profile-relay{tag}.md"
    md.write_text(text)
    print(text)
    print(f"written: {out}, {md}")
    return 0 if row.get("ok") else 1


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
