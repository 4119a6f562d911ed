"""The soak scenario: geosmtp under steady mixed traffic for a long while; nothing may grow.

`python -m bench run soak --server geosmtp --duration 1800` (`--quick`: 2 minutes).

geosmtp runs as in the other scenarios (its workers: the default, one per
CPU), with a POP3 listener, the relay queue delivering to the local sink
(`bench/sink.py`) and the admin listener on. The traffic
(`bench/soak_traffic.py`, one gevent process) sends SMTP at a fixed rate,
half to local POP3 users and half relayed, while POP3 clients empty the
Maildirs, idle clients sit connected and hostile ones misbehave.

Every `interval` seconds the driver samples each worker's RSS, descriptors
and greenlets (`GET /api/v1/runtime`), the master's RSS (/proc), the queue
(`GET /api/v1/stats` → `queue.entries`) and the machine's load average; the
traffic reports the SMTP transaction (MAIL to the 250 after the dot) and
POP3 session (connect to QUIT's +OK) latencies of each window.

At the end (after the queue drained): every acknowledged message delivered
exactly once (to its Maildir, then retrieved by POP3 or still there, or to
the sink), nothing refused or cut off delivered, the same worker processes
as at the start; and every series **flat after warm-up**: the first third of
the run is warm-up; over the remaining two thirds, a least-squares line
through the series (in `FIT_BUCKETS` medians, so a single spike weighs
little) may rise by at most its bound (`BOUNDS`) from the first to the last
bucket. Results: `bench/results/soak[-quick][-TAG].{json,md,png}`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import selectors
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from . import mailboxes, messages
from .driver import nearest_rank
from .servers import HOST, REPO, RelaySink, Server, free_port, machine, source_version
from .soak_traffic import HOSTILE_BASE, rcpt_of, size_of

RESULTS = REPO / "bench" / "results"
MB = 1024 * 1024
#: How many medians the series is cut into for the fit, after warm-up.
FIT_BUCKETS = 20
#: Series name -> (absolute bound, bound as a fraction of the series' median):
#: the fitted rise over the two thirds after warm-up may be at most the larger.
BOUNDS: dict[str, tuple[float, float]] = {
    "rss_mb": (2.0, 0.05),
    "descriptors": (10.0, 0.05),
    "greenlets": (10.0, 0.05),
    "queue_entries": (50.0, 0.25),
    "smtp_p50_ms": (20.0, 0.5),
    "smtp_p99_ms": (50.0, 0.5),
    "pop3_p50_ms": (50.0, 0.5),
}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Traffic:
    """The `python -m bench.soak_traffic` process: its window lines and result."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.soak_traffic"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        self.proc.stdin.flush()
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.windows: list[dict] = []
        self.result: dict | None = None

    def pump(self, seconds: float) -> None:
        """Read what it says for up to `seconds`."""
        end = time.monotonic() + seconds
        while self.result is None:
            left = end - time.monotonic()
            if left <= 0:
                return
            if not self.sel.select(left):
                continue
            assert self.proc.stdout is not None
            try:
                data = os.read(self.proc.stdout.fileno(), 1 << 20)
            except BlockingIOError:
                continue
            if not data:
                if self.proc.poll() is not None:
                    return
                continue
            self.buf += data
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg["t"] == "w":
                    self.windows.append(msg)
                elif msg["t"] == "result":
                    self.result = msg

    @property
    def done(self) -> bool:
        return self.result is not None or self.proc.poll() is not None

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Admin:
    """geosmtp's admin API with the token it wrote at start."""

    def __init__(self, port: int, token_file: Path) -> None:
        self.base = f"http://{HOST}:{port}"
        self.token = token_file.read_text().strip()

    def get(self, path: str) -> dict:
        req = urllib.request.Request(
            self.base + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            return json.loads(resp.read())


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return float("nan")


def sample(server: Server, admin: Admin, t0: float, errors: Counter) -> dict:
    s: dict = {"t": time.time() - t0, "master_rss_mb": rss_kb(server.pid) / 1024}
    s["load1"] = loadavg()
    try:
        runtime = admin.get("/api/v1/runtime")
        s["workers"] = sorted(runtime["workers"], key=lambda w: w["pid"])
    except (OSError, ValueError, KeyError) as exc:
        errors[f"admin runtime: {type(exc).__name__}"] += 1
        s["workers"] = []
    try:
        s["queue_entries"] = admin.get("/api/v1/stats")["queue"]["entries"]
    except (OSError, ValueError, KeyError) as exc:
        errors[f"admin stats: {type(exc).__name__}"] += 1
        s["queue_entries"] = None
    return s


def _wait_workers(admin: Admin, configured: int | None) -> list[int]:
    """The workers' pids once all have started (`workers:`, or one per CPU)."""
    want = configured or os.cpu_count() or 1
    pids: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            pids = sorted(w["pid"] for w in admin.get("/api/v1/runtime")["workers"])
        except (OSError, ValueError, KeyError):
            pids = []
        if len(pids) >= want:
            break
        time.sleep(0.2)
    return pids


def _ms(values: list[float], q: float) -> float | None:
    return nearest_rank(values, q) if values else None


def soak(server_cls: type[Server], opts) -> list[dict]:  # type: ignore[no-untyped-def]
    """Mixed traffic for 30 minutes (SMTP in, relay out, POP3, idle, hostile); nothing grows."""
    duration = opts.duration or (120.0 if opts.quick else 1800.0)
    interval = 2.0 if duration <= 300 else 5.0
    users = opts.mailboxes or (20 if opts.quick else 50)
    rate = float(opts.messages or 60)  # messages per second
    idle = opts.clients if opts.clients is not None else (100 if opts.quick else 300)
    sink = RelaySink()
    server = server_cls(fsync=opts.fsync)
    server.relay_port = sink.port
    server.pop3_port = free_port()
    server.admin_port = free_port()
    server.pop3_users = mailboxes.hashes(users, opts.hash, say=_say)
    run_id = f"soak-{server.name}-{uuid.uuid4().hex[:8]}"
    traffic = None
    errors: Counter[str] = Counter()
    try:
        sink.start()
        server.start()
        admin = Admin(server.admin_port, server.root / "admin.token")
        start_workers = _wait_workers(admin, getattr(server, "worker_count", None))
        spec = {
            "host": HOST,
            "port": server.port,
            "pop3_port": server.pop3_port,
            "run_id": run_id,
            "users": users,
            "rate": rate,
            "duration": duration,
            "window": interval,
            "senders": 10,
            "per_session": 20,
            "pop3_clients": 10,
            "pop3_pause": 3.0,
            "idle": idle,
            "hostile": 4,
            "io_timeout": 60,
        }
        config = {k: spec[k] for k in ("rate", "users", "senders", "pop3_clients", "idle")}
        config.update(hostile=spec["hostile"], duration_s=duration, sample_s=interval)
        _say(
            f"soak/{server.name}: {duration / 60:.0f} min, {rate:.0f} msgs/s (half relayed), "
            f"{users} POP3 users, {idle} idle, {spec['hostile']} hostile; sample every "
            f"{interval:.0f} s"
        )
        t0 = time.time()
        samples: list[dict] = []
        traffic = Traffic(spec)
        next_sample = time.monotonic()
        next_line = time.monotonic() + (60 if duration > 300 else 20)
        while not traffic.done:
            traffic.pump(max(0.0, next_sample - time.monotonic()))
            if traffic.done:
                break
            next_sample += interval
            s = sample(server, admin, t0, errors)
            samples.append(s)
            if time.monotonic() >= next_line:
                next_line += 60 if duration > 300 else 20
                _say(_progress(s, traffic.windows, interval))
        traffic.pump(30)
        # After the traffic: the queue drains (bounded), then a last sample.
        drain_end = time.monotonic() + 300
        while time.monotonic() < drain_end and server.queued():
            time.sleep(0.5)
        final = sample(server, admin, t0, errors)
        traffic.finish()
        result = traffic.result or {"errors": {"traffic process died": 1}}
        still_queued = server.queued()
        alive = server.proc is not None and server.proc.poll() is None
        server.stop()
        sink.stop()
        series = _series(samples, traffic.windows, t0)
        check = _check(server.mail_dir, run_id, users, result, sink.records(), still_queued)
        end_workers = [w["pid"] for w in final["workers"]]
        if not alive:
            check["problems"].append("the server was not running at the end")
        if start_workers != end_workers:
            check["problems"].append(f"worker pids changed: {start_workers} -> {end_workers}")
        errors.update(result.get("errors", {}))
        flat = _flatness(series, duration)
        row = {
            "scenario": "soak",
            "server": server.name,
            "run_id": run_id,
            "config": config,
            "workers": len(end_workers),
            "samples": samples,
            "final": final,
            "windows": [
                {k: w[k] for k in ("time", "acked", "idle", "errors", "pop3_sessions")}
                for w in traffic.windows
            ],
            "series": series,
            "flatness": flat,
            "check": check,
            "errors": dict(errors),
            "error_examples": result.get("examples", []),
            "hostile": result.get("hostile", {}),
            "idle_reconnects": result.get("idle_reconnects"),
            "smtp_sessions": result.get("smtp_sessions"),
            "pop3_sessions": result.get("pop3_sessions"),
            "acked": len(result.get("acked", [])),
            "duration_s": duration,
            "clients": idle,
            "msgs_per_s": len(result.get("acked", [])) / duration,
            "p99_ms": _ms([x for w in traffic.windows for x in w["smtp"]], 99),
        }
        row["summary"] = _blocks(row, traffic.windows, t0, 30.0 if opts.quick else 300.0)
        row["flat"] = all(f["flat"] for f in flat.values())
        row["ok"] = not check["problems"] and not errors and row["flat"]
        row["verify"] = check["summary"]
        row["verify_examples"] = check["problems"][:10]
        _say(_verdict_text(row))
        return [row]
    finally:
        if traffic is not None and not traffic.done:
            traffic.stop()
            traffic.finish()
        server.stop()
        sink.stop()
        if not opts.keep:
            server.cleanup()
            sink.cleanup()


def _progress(s: dict, windows: list[dict], interval: float) -> str:
    recent = windows[-max(1, int(60 / interval)) :]
    lat = [x for w in recent for x in w["smtp"]]
    pop = [x for w in recent for x in w["pop3"]]
    acked = windows[-1]["acked"] if windows else 0
    ws = s["workers"]
    return (
        f"  {s['t'] / 60:5.1f} min: {acked:,} acked, smtp p50/p99 "
        f"{_fmt(_ms(lat, 50))}/{_fmt(_ms(lat, 99))} ms, pop3 p50 {_fmt(_ms(pop, 50))} ms, "
        f"queue {s['queue_entries']}, RSS master {s['master_rss_mb']:.1f} MB workers "
        + "/".join(f"{w['rss_bytes'] / MB:.1f}" for w in ws)
        + " MB, fds "
        + "/".join(str(w["descriptors"]) for w in ws)
        + ", greenlets "
        + "/".join(str(w["greenlets"]) for w in ws)
        + f", idle {windows[-1]['idle'] if windows else 0}, errors "
        f"{windows[-1]['errors'] if windows else 0}, load {s['load1']:.1f}"
    )


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


# ------------------------------------------------------------ series and flatness


def _series(samples: list[dict], windows: list[dict], t0: float) -> dict[str, list]:
    """Name -> [[t, value], ...] for the plot and the flatness check."""
    out: dict[str, list] = {"master rss_mb": [[s["t"], s["master_rss_mb"]] for s in samples]}
    for s in samples:
        for i, w in enumerate(s["workers"]):
            out.setdefault(f"worker{i + 1} rss_mb", []).append([s["t"], w["rss_bytes"] / MB])
            out.setdefault(f"worker{i + 1} descriptors", []).append([s["t"], w["descriptors"]])
            out.setdefault(f"worker{i + 1} greenlets", []).append([s["t"], w["greenlets"]])
            out.setdefault(f"worker{i + 1} sessions", []).append([s["t"], w["sessions"]])
    out["queue_entries"] = [
        [s["t"], s["queue_entries"]] for s in samples if s["queue_entries"] is not None
    ]
    out["load1"] = [[s["t"], s["load1"]] for s in samples]
    for w in windows:
        t = w["time"] - t0
        if w["smtp"]:
            out.setdefault("smtp_p50_ms", []).append([t, nearest_rank(w["smtp"], 50)])
            out.setdefault("smtp_p99_ms", []).append([t, nearest_rank(w["smtp"], 99)])
        if w["pop3"]:
            out.setdefault("pop3_p50_ms", []).append([t, nearest_rank(w["pop3"], 50)])
    return out


def _bound_key(name: str) -> str | None:
    last = name.split()[-1]
    return last if last in BOUNDS else None


def _flatness(series: dict[str, list], duration: float) -> dict[str, dict]:
    """Per series: the fitted rise over the run after warm-up (its first third),
    against its bound."""
    warm = duration / 3
    out: dict[str, dict] = {}
    for name, points in series.items():
        key = _bound_key(name)
        if key is None:
            continue
        after = [(t, v) for t, v in points if t >= warm]
        if len(after) < 4:
            out[name] = {"flat": False, "why": f"only {len(after)} samples after warm-up"}
            continue
        # Medians of FIT_BUCKETS equal stretches of time: a spike weighs one bucket's worth.
        span = (duration - warm) / FIT_BUCKETS
        buckets: dict[int, list[float]] = {}
        for t, v in after:
            buckets.setdefault(min(FIT_BUCKETS - 1, int((t - warm) / span)), []).append(v)
        xs = [warm + (b + 0.5) * span for b in sorted(buckets)]
        ys = [statistics.median(buckets[b]) for b in sorted(buckets)]
        slope = _slope(xs, ys)
        rise = slope * (xs[-1] - xs[0])
        level = statistics.median(v for _t, v in after)
        absolute, fraction = BOUNDS[key]
        bound = max(absolute, fraction * abs(level))
        out[name] = {
            "median": level,
            "first": ys[0],
            "last": ys[-1],
            "slope_per_min": slope * 60,
            "rise": rise,
            "bound": bound,
            "flat": rise <= bound,
        }
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


# ------------------------------------------------------------ the check


def _check(
    mail_dir: Path,
    run_id: str,
    users: int,
    result: dict,
    sink_records: list[tuple[str, float]],
    still_queued: int,
) -> dict:
    """Every acknowledged message exactly once where it belongs; nothing else."""
    problems: list[str] = []
    counts: Counter[str] = Counter()

    def fail(kind: str, example: str) -> None:
        counts[kind] += 1
        if counts[kind] <= 3:
            problems.append(f"{kind}: {example}")

    where: dict[int, list[str]] = {}  # n -> places it was delivered to
    prefix = run_id + "."
    for ident, _t in sink_records:
        num = ident[len(prefix) :] if ident.startswith(prefix) else ""
        if not num.isdigit():
            fail("foreign message at the sink", ident)
            continue
        where.setdefault(int(num), []).append("sink")
    for box, n in result.get("retrieved", []):
        where.setdefault(n, []).append(f"pop3:{box}")
    left = 0
    for box_dir in sorted(mail_dir.iterdir()) if mail_dir.is_dir() else []:
        if box_dir.name.startswith("."):
            continue  # .queue
        for path in (box_dir / "tmp").iterdir() if (box_dir / "tmp").is_dir() else []:
            fail("left in tmp/", str(path))
        for sub in ("new", "cur"):
            for path in (box_dir / sub).iterdir() if (box_dir / sub).is_dir() else []:
                left += 1
                n = _stored_id(path.read_bytes(), run_id, box_dir.name)
                if n is None:
                    fail("not this run's message, or not intact", str(path))
                    continue
                where.setdefault(n, []).append(f"maildir:{box_dir.name}")
    uncommitted = {n for _b, n in result.get("uncommitted", [])}
    acked = set(result.get("acked", []))
    refused = set(result.get("refused", []))
    unknown = set(result.get("unknown", []))
    for n in acked:
        places = where.get(n, [])
        if not places and n in uncommitted:
            continue  # retrieved, and its deletion done, though QUIT's +OK was lost
        box, domain = rcpt_of(n, users)
        if domain == messages.DOMAIN:
            right = places[:1] and places[0].split(":", 1)[1:] == [box]
        else:
            right = places[:1] == ["sink"]
        if not places:
            fail("lost (acknowledged, delivered nowhere)", str(n))
        elif len(places) > 1:
            fail("duplicated", f"{n}: {places}")
        elif not right:
            fail("delivered to the wrong place", f"{n}: {places}")
    for n, places in where.items():
        if n in acked:
            continue
        if n >= HOSTILE_BASE:
            fail("a cut-off message was delivered", f"{n}: {places}")
        elif n in refused:
            fail("delivered although refused", f"{n}: {places}")
        elif n not in unknown:
            fail("delivered, never sent", f"{n}: {places}")
        elif len(places) > 1:
            fail("duplicated (fate unknown)", f"{n}: {places}")
    if still_queued:
        fail("still queued after the drain", str(still_queued))
    to_sink = sum(1 for p in where.values() for x in p if x == "sink")
    retrieved = len(result.get("retrieved", []))
    summary = (
        f"{len(acked):,} acknowledged: {to_sink:,} at the sink, {retrieved:,} retrieved by "
        f"POP3, {left:,} still in Maildirs; "
        + (
            "each exactly once, nothing else"
            if not problems
            else "FAILED: " + "; ".join(f"{k} {v}" for k, v in counts.items())
        )
    )
    return {
        "summary": summary,
        "problems": problems,
        "counts": dict(counts),
        "acked": len(acked),
        "refused": len(refused),
        "unknown": len(unknown),
        "sink": to_sink,
        "retrieved": retrieved,
        "left_in_maildirs": left,
    }


def _stored_id(data: bytes, run_id: str, box: str) -> int | None:
    """The number of a stored bench message, if it is this run's and intact."""
    at = data.find(b"X-Bench-Id: ")
    if at < 0:
        return None
    eol = data.find(b"\n", at)
    run, _, num = data[at + 12 : eol].decode("ascii", "replace").rpartition(".")
    if run != run_id or not num.isdigit():
        return None
    n = int(num)
    if n >= HOSTILE_BASE:
        return n  # reported as delivered although cut off
    msg = messages.build(run_id, n, size_of(n), (box,))
    return n if data[at:] == msg.header_lf + b"".join(msg.canonical_body_chunks()) else None


# ------------------------------------------------------------ report


def _blocks(row: dict, windows: list[dict], t0: float, block: float) -> list[dict]:
    """Per `block` seconds: traffic, latencies and the resources at its end."""
    out = []
    n_blocks = max(1, round(row["duration_s"] / block))
    for b in range(n_blocks):
        lo, hi = b * block, (b + 1) * block
        ws = [w for w in windows if lo <= w["time"] - t0 < hi]
        ss = [s for s in row["samples"] if lo <= s["t"] < hi]
        smtp = [x for w in ws for x in w["smtp"]]
        pop = [x for w in ws for x in w["pop3"]]
        last = ss[-1] if ss else None
        queue = [s["queue_entries"] for s in ss if s["queue_entries"] is not None]
        out.append(
            {
                "from_min": lo / 60,
                "to_min": hi / 60,
                "acked": len(smtp),
                "msgs_per_s": len(smtp) / block,
                "smtp_p50_ms": _ms(smtp, 50),
                "smtp_p99_ms": _ms(smtp, 99),
                "pop3_sessions": len(pop),
                "pop3_p50_ms": _ms(pop, 50),
                "pop3_p99_ms": _ms(pop, 99),
                "queue_mean": statistics.fmean(queue) if queue else None,
                "queue_max": max(queue) if queue else None,
                "master_rss_mb": last["master_rss_mb"] if last else None,
                "worker_rss_mb": [w["rss_bytes"] / MB for w in last["workers"]] if last else [],
                "descriptors": [w["descriptors"] for w in last["workers"]] if last else [],
                "greenlets": [w["greenlets"] for w in last["workers"]] if last else [],
                "load1": statistics.fmean(s["load1"] for s in ss) if ss else None,
            }
        )
    return out


def _verdict_text(row: dict) -> str:
    lines = [f"soak/{row['server']}: {row['verify']}"]
    for name, f in row["flatness"].items():
        if "rise" not in f:
            lines.append(f"  {name:24} NOT FLAT: {f['why']}")
            continue
        lines.append(
            f"  {name:24} median {f['median']:9.1f}  rise after warm-up {f['rise']:+8.2f} "
            f"(bound {f['bound']:.1f}): {'flat' if f['flat'] else 'GROWS'}"
        )
    if row["errors"]:
        lines.append(f"  errors: {row['errors']}")
        lines += [f"    {e}" for e in row["error_examples"][:5]]
    for p in row["verify_examples"]:
        lines.append(f"  {p}")
    lines.append(
        f"  verdict: {'flat after warm-up' if row['flat'] else 'NOT flat'}, "
        f"check {'ok' if not row['check']['problems'] else 'FAILED'}"
        f"{'' if not row['errors'] else ', errors'}: {'ok' if row['ok'] else 'FAILED'}"
    )
    return "\n".join(lines)


def table(row: dict) -> str:
    per = "5-minute" if row["duration_s"] > 300 else "30-second"
    out = [
        f"Per {per} block (latencies over the block; resources at its end, worker 1/worker 2):",
        "",
        "| minutes | msgs/s | SMTP p50 / p99 ms | POP3 sessions | POP3 p50 / p99 ms "
        "| queue mean / max | master RSS MB | workers RSS MB | descriptors | greenlets | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in row["summary"]:
        out.append(
            f"| {b['from_min']:.1f}-{b['to_min']:.1f} | {b['msgs_per_s']:.1f} "
            f"| {_fmt(b['smtp_p50_ms'])} / {_fmt(b['smtp_p99_ms'])} | {b['pop3_sessions']} "
            f"| {_fmt(b['pop3_p50_ms'])} / {_fmt(b['pop3_p99_ms'])} "
            f"| {_fmt(b['queue_mean'])} / {_fmt(b['queue_max'], 0)} "
            f"| {_fmt(b['master_rss_mb'])} | {' / '.join(f'{x:.1f}' for x in b['worker_rss_mb'])} "
            f"| {' / '.join(map(str, b['descriptors']))} | {' / '.join(map(str, b['greenlets']))} "
            f"| {_fmt(b['load1'])} |"
        )
    out += [
        "",
        "Flat after warm-up (the first third): the least-squares rise over the rest, "
        f"through {FIT_BUCKETS} medians, against its bound:",
        "",
        "| series | median | rise | bound | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for name, f in row["flatness"].items():
        if "rise" not in f:
            out.append(f"| {name} | - | - | - | NOT FLAT ({f['why']}) |")
            continue
        out.append(
            f"| {name} | {f['median']:.1f} | {f['rise']:+.2f} | {f['bound']:.1f} "
            f"| {'flat' if f['flat'] else '**grows**'} |"
        )
    c = row["check"]
    out += [
        "",
        f"Check: {c['summary']} ({c['refused']} refused, {c['unknown']} of unknown fate).",
        f"Hostile clients: {row['hostile']}; idle reconnects: {row['idle_reconnects']}; "
        f"SMTP sessions {row['smtp_sessions']:,}, POP3 sessions {row['pop3_sessions']:,}; "
        f"errors: {row['errors'] or 'none'}.",
        "",
        f"Verdict: {'**ok**' if row['ok'] else '**FAILED**'}",
    ]
    return "\n".join(out) + "\n"


def plot(row: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = row["series"]
    panels = [
        ("RSS (MB)", [n for n in series if n.endswith("rss_mb")]),
        ("descriptors", [n for n in series if n.endswith("descriptors")]),
        ("greenlets", [n for n in series if n.endswith("greenlets")]),
        ("queue entries", ["queue_entries"]),
        ("SMTP transaction (ms)", ["smtp_p50_ms", "smtp_p99_ms"]),
        ("POP3 session p50 (ms)", ["pop3_p50_ms"]),
        ("load average (1 min)", ["load1"]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.0 * len(panels)), sharex=True)
    warm = row["duration_s"] / 3 / 60
    for ax, (title, names) in zip(axes, panels, strict=True):
        for n in names:
            pts = series.get(n, [])
            ax.plot([t / 60 for t, _v in pts], [v for _t, v in pts], label=n, lw=1)
        ax.axvspan(0, warm, color="0.9", zorder=0)
        ax.set_ylabel(title, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7, loc="lower right")
    axes[-1].set_xlabel("minutes (grey: warm-up)")
    fig.suptitle(
        f"soak, {row['server']}: {row['config']['rate']:.0f} msgs/s, {row['config']['idle']} idle, "
        f"{row['config']['hostile']} hostile, {row['duration_s'] / 60:.0f} min: "
        f"{'flat' if row['flat'] else 'NOT flat'}, "
        f"check {'ok' if not row['check']['problems'] else 'FAILED'}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save(name: str, rows: list[dict], argv: list[str]) -> tuple[Path, Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    row = rows[0]
    meta = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench " + shlex.join(argv),
        "machine": machine(),
        "geosmtp_commit": source_version(),
    }
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    png_path = RESULTS / f"{name}.png"
    plot(row, png_path)
    md_path = RESULTS / f"{name}.md"
    md_path.write_text(
        f"## {name}\n\n{meta['when']} · command: `{meta['command']}`\n\n"
        f"machine: {meta['machine']}\n\ngeosmtp commit: {meta['geosmtp_commit']}; "
        f"workers: {row['workers']}\n\n![soak]({png_path.name})\n\n" + table(row)
    )
    return json_path, md_path, png_path
