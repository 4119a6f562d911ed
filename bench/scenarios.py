"""The named scenarios. Each takes a server class and options and returns rows:
one dict of figures per (server, concurrency level) for one round.

Every run starts the server fresh in its own temp dir, drives it, stops it,
and checks its Maildir; a row whose check failed (or that saw errors) has
`ok: False` and fails the command.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from . import mailboxes, messages
from .crash import TrialConfig, TrialResult, run_trial
from .driver import Outcome, Progress, Worker, nearest_rank, pump, run_jobs, split_load
from .servers import (
    HOST,
    SMTP_SOURCE,
    Geosmtp,
    RelaySink,
    Server,
    SmtpSinkNextHop,
    free_port,
    tree_sockets,
)
from .verify import Verdict, verify_bench_mail, verify_count

MB = 1024 * 1024


@dataclass
class Options:
    quick: bool = False
    workers: int = 1
    pipelining: bool = True
    client: str = "bench"  # or "smtp-source"
    fsync: bool = True
    time_limit: float = 600.0
    messages: int | None = None
    clients: int | None = None
    size: int | None = None
    keep: bool = False  # keep the server's temp dir
    mailboxes: int | None = None  # recipients are spread over this many (100); pop3: 1,000
    hash: str = "passwd"  # pop3: the users' argon2id hashes (bench.mailboxes.HASHES)
    trials: int | None = None  # crash: kill -9 trials (100)
    duration: float | None = None  # soak: seconds of traffic (1,800; --quick 120)
    # relay (issue 20):
    server_workers: int | None = None  # geosmtp's `workers:` (relay: 1 unless given)
    sink_delay: float = 0.0  # seconds the project sink waits before each reply
    sink: str = "sink"  # the next hop: the project sink, or Postfix's "smtp-sink"

    def pick(self, full: int, quick: int, override: int | None = None) -> int:
        if override is not None:
            return override
        return quick if self.quick else full


def new_run_id(scenario: str, server: str) -> str:
    return f"{scenario}-{server}-{uuid.uuid4().hex[:8]}"


CORES = os.cpu_count() or 1


def _server_figures(srv: dict, duration: float, client_cpu: float = 0.0) -> dict:
    """The server's CPU (its process tree: 100% = one core; `machine`: of all
    cores) and RSS growth; what other programs used meanwhile."""
    out: dict = {}
    if "cpu_s" in srv:
        d = max(duration, 1e-9)
        out["server_cpu_s"] = srv["cpu_s"]
        out["server_cpu_pct"] = 100 * srv["cpu_s"] / d
        out["server_machine_pct"] = 100 * srv["cpu_s"] / d / CORES
        out["rss_before_mb"] = srv["rss_before_kb"] / 1024
        out["rss_peak_mb"] = srv["rss_peak_kb"] / 1024
        out["rss_growth_mb"] = (srv["rss_peak_kb"] - srv["rss_before_kb"]) / 1024
        out["server_procs"] = srv.get("procs", 1)
        if "rss_growth_by_process_mb" in srv:
            out["rss_growth_by_process_mb"] = srv["rss_growth_by_process_mb"]
        if "machine_cpu_s" in srv:
            # Over the whole measured window (workers' start and end included).
            others = srv["machine_cpu_s"] - srv["cpu_s"] - client_cpu - srv["driver_cpu_s"]
            out["other_cpu_pct"] = 100 * max(0.0, others) / max(srv["window_s"], 1e-9)
    return out


def _spread(server: Server) -> dict:
    """How sessions and messages spread over the server's serving processes
    (after it stopped): per process, and the busiest one's share."""
    per = server.workers()
    if not per:
        return {}
    sessions = [w["sessions"] for w in per.values()]
    msgs = [w["messages"] for w in per.values()]
    return {
        "per_worker": per,
        "worker_procs": len(per),
        "busiest_sessions_share": max(sessions) / max(1, sum(sessions)),
        "busiest_msgs_share": max(msgs) / max(1, sum(msgs)),
    }


def _finish(server: Server, outcome: Outcome, run_id: str, opts: Options) -> Verdict:
    """Stop the server (after Postfix's queue drained) and check its Maildir."""
    deliveries = sum(len(r) for _s, r in outcome.acked.values())
    server.drain(deliveries)
    server.stop()
    if not server.stores:
        return Verdict(skipped="stores nothing")
    return verify_bench_mail(
        server.mail_dir,
        run_id,
        outcome.acked,
        outcome.refused,
        strict_headers=server.strict_headers,
    )


def _row(scenario: str, server: Server, outcome: Outcome, srv: dict, verdict: Verdict) -> dict:
    m = outcome.metrics()
    row = {
        "scenario": scenario,
        "server": server.name,
        **m,
        **_server_figures(srv, m["duration_s"], outcome.client_cpu),
        **_spread(server),
    }
    row["client_cpu_pct"] = 100 * outcome.client_cpu / m["duration_s"]
    row["verify"] = verdict.summary()
    row["verify_examples"] = verdict.examples
    row["ok"] = verdict.ok and not outcome.errors
    return row


def load_once(
    scenario: str,
    server_cls: type[Server],
    opts: Options,
    clients: int,
    count: int,
    size: int,
    rcpts: int,
) -> dict:
    """Start a server, send `count` messages over `clients` sessions, check, stop."""
    server = server_cls(fsync=opts.fsync, max_size=64 * MB)
    label = f"{scenario}/{server.name} c={clients}"
    try:
        server.start()
        if opts.client == "smtp-source":
            return smtp_source_once(scenario, server, opts, clients, count, size, rcpts, label)
        run_id = new_run_id(scenario, server.name)
        spec = {
            "kind": "load",
            "host": HOST,
            "port": server.port,
            "run_id": run_id,
            "clients": clients,
            "ids": [0, count, 1],
            "size": size,
            "rcpts": rcpts,
            "pipelining": opts.pipelining,
            "deadline": opts.time_limit,
            "io_timeout": 120,
            "mailboxes": max(opts.mailboxes or messages.MAILBOXES, rcpts),
        }
        outcome, srv = run_jobs(
            split_load(spec, opts.workers), label, opts.time_limit + 60, server, total=count
        )
        verdict = _finish(server, outcome, run_id, opts)
        row = _row(scenario, server, outcome, srv, verdict)
        if outcome.ok != count:
            row["ok"] = False
        row.update(clients=clients, size=size, rcpts=rcpts, pipelining=opts.pipelining)
        row["client"] = f"bench ({opts.workers} proc)"
        return row
    finally:
        server.stop()
        if not opts.keep:
            server.cleanup()


def smtp_source_once(
    scenario: str,
    server: Server,
    opts: Options,
    clients: int,
    count: int,
    size: int,
    rcpts: int,
    label: str,
) -> dict:
    """The same load from Postfix's smtp-source (no pipelining, no latencies)."""
    cmd = [
        SMTP_SOURCE,
        "-d",  # many messages per connection, as the bench client does
        "-s",
        str(clients),
        "-m",
        str(count),
        "-l",
        str(size),
        "-r",
        str(rcpts),
        "-f",
        messages.SENDER,
        "-t",
        f"u000@{messages.DOMAIN}",
        "-M",
        "bench.test",
        f"{HOST}:{server.port}",
    ]
    cpu0 = server.cpu() if server.measurable else 0.0
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, timeout=opts.time_limit, check=False)
    t1 = time.time()
    server_cpu = server.cpu() - cpu0 if server.measurable else None
    server.drain(count * rcpts)
    server.stop()
    verdict = (
        verify_count(server.mail_dir, count * rcpts)
        if server.stores
        else Verdict(skipped="stores nothing")
    )
    d = t1 - t0
    Progress(label, count).show(count if proc.returncode == 0 else 0, proc.returncode, force=True)
    row = {
        "scenario": scenario,
        "server": server.name,
        "client": "smtp-source",
        "clients": clients,
        "size": size,
        "rcpts": rcpts,
        "messages": count,
        "msgs_per_s": count / d,
        "deliveries_per_s": count * rcpts / d,
        "mb_per_s": count * size / d / 1e6,
        "duration_s": d,
        "errors": {"smtp-source exit": proc.returncode} if proc.returncode else {},
        "error_examples": [proc.stderr.decode(errors="replace")[-300:]] if proc.returncode else [],
        "verify": verdict.summary(),
        "verify_examples": verdict.examples,
        "ok": verdict.ok and proc.returncode == 0,
    }
    if server_cpu is not None:
        row["server_cpu_s"] = server_cpu
        row["server_cpu_pct"] = 100 * server_cpu / d
        row["server_machine_pct"] = 100 * server_cpu / d / CORES
    row.update(_spread(server))
    return row


# ---------------------------------------------------------------- scenarios


def throughput(server_cls: type[Server], opts: Options) -> list[dict]:
    clients = opts.pick(100, 100, opts.clients)
    count = opts.pick(20000, 2000, opts.messages)
    size = opts.size or 1024
    return [load_once("throughput", server_cls, opts, clients, count, size, 1)]


def fanout(server_cls: type[Server], opts: Options) -> list[dict]:
    clients = opts.pick(100, 100, opts.clients)
    count = opts.pick(20000, 2000, opts.messages)
    size = opts.size or 1024
    return [load_once("fanout", server_cls, opts, clients, count, size, 5)]


SCALING_LEVELS = [10, 100, 1000, 5000]
SCALING_LEVELS_QUICK = [10, 100, 500]
POSTFIX_MAX_SESSIONS = 1000  # one smtpd process per session


def scaling(server_cls: type[Server], opts: Options) -> list[dict]:
    levels = SCALING_LEVELS_QUICK if opts.quick else SCALING_LEVELS
    if opts.clients:
        levels = [opts.clients]
    rows = []
    for level in levels:
        if server_cls.name == "postfix" and level > POSTFIX_MAX_SESSIONS:
            continue
        count = opts.pick(20000, 2000, opts.messages)
        count = max(count, 2 * level)
        rows.append(load_once("scaling", server_cls, opts, level, count, opts.size or 1024, 1))
    return rows


def large(server_cls: type[Server], opts: Options) -> list[dict]:
    clients = opts.pick(20, 5, opts.clients)
    size = opts.size or 25 * MB
    count = opts.messages or clients
    row = load_once("large", server_cls, opts, clients, count, size, 1)
    return [row]


def idle(server_cls: type[Server], opts: Options) -> list[dict]:
    """N clients connect, EHLO and idle; memory per connection; a fresh client's time."""
    n = opts.pick(10000, 1000, opts.clients)
    probes = opts.pick(20, 5)
    server = server_cls(fsync=opts.fsync)
    run_id = new_run_id("idle", server.name)
    label = f"idle/{server.name} n={n}"
    base = {"host": HOST, "port": server.port, "run_id": run_id, "size": 1024, "rcpts": 1}
    base["deadline"] = opts.time_limit
    base["io_timeout"] = 120
    outcome = Outcome()
    idle_worker = None
    row: dict = {"scenario": "idle", "server": server.name, "clients": n}
    try:
        server.start()
        warm = {**base, "kind": "probe", "clients": 3, "ids": [0, 3, 1]}
        o, _ = run_jobs([warm], label + " warm-up", 60, server)
        outcome.acked.update(o.acked)
        time.sleep(0.5)
        mem0 = server.mem()
        socks0 = tree_sockets(server.pid) if server.measurable else {}
        spec = {**base, "kind": "idle", "clients": n, "ids": [0, 0, 1]}
        spec["connect_concurrency"] = 100
        idle_worker = Worker(spec)
        progress = Progress(label + " connecting", None)
        ready = pump([idle_worker], lambda: idle_worker.ready or idle_worker.done, 300, progress)
        row["all_connected"] = ready and not idle_worker.done
        time.sleep(1.0)
        mem1 = server.mem()
        if server.measurable:  # the idle clients' sockets by process: the spread
            socks1 = tree_sockets(server.pid)
            row["idle_by_process"] = {
                str(pid): n - socks0.get(pid, 0)
                for pid, n in socks1.items()
                if n > socks0.get(pid, 0)
            }
            row["server_procs"] = mem1.get("procs", 1)
        pspec = {**base, "kind": "probe", "clients": probes, "ids": [10, 10 + probes, 1]}
        probe, _ = run_jobs([pspec], label + " fresh client", 120, server)
        outcome.acked.update(probe.acked)
        mem2 = server.mem()
        idle_worker.send("stop")
        pump([idle_worker], lambda: idle_worker.done, 120)
        idle_worker.finish()
        idle_out = Outcome()
        idle_out.add(idle_worker.result, spec)
        verdict = _finish(server, outcome, run_id, opts)
        row["connected"] = idle_out.connected
        row["idle_errors"] = dict(idle_out.errors)
        row["error_examples"] = idle_out.examples + probe.examples
        if mem0:
            conns = max(1, idle_out.connected)
            row["rss_per_conn_kb"] = (mem1.get("Rss", 0) - mem0.get("Rss", 0)) / conns
            row["pss_per_conn_kb"] = (mem1.get("Pss", 0) - mem0.get("Pss", 0)) / conns
            row["rss_before_mb"] = mem0.get("Rss", 0) / 1024
            row["rss_idle_mb"] = mem1.get("Rss", 0) / 1024
            row["rss_after_probe_mb"] = mem2.get("Rss", 0) / 1024
            # Pages a worker shared with the master (copy-on-write since the fork)
            # and has since copied are in Pss growth, not in Rss growth.
            shared = ("Shared_Clean", "Shared_Dirty")
            row["shared_before_mb"] = sum(mem0.get(k, 0) for k in shared) / 1024
            row["shared_idle_mb"] = sum(mem1.get(k, 0) for k in shared) / 1024
            row["private_per_conn_kb"] = (
                sum(mem1.get(k, 0) - mem0.get(k, 0) for k in ("Private_Clean", "Private_Dirty"))
                / conns
            )
        lat = sorted(probe.latencies)
        row["probe_count"] = len(lat)
        row["probe_p50_ms"] = statistics.median(lat) * 1000 if lat else float("nan")
        row["probe_max_ms"] = lat[-1] * 1000 if lat else float("nan")
        row["verify"] = verdict.summary()
        row["errors"] = {**dict(idle_out.errors), **dict(probe.errors)}
        row["ok"] = (
            verdict.ok and idle_out.connected == n and not row["errors"] and len(lat) == probes
        )
        return [row]
    finally:
        if idle_worker is not None and not idle_worker.done:
            idle_worker.send("stop")
            idle_worker.finish()
        server.stop()
        if not opts.keep:
            server.cleanup()


def slow(server_cls: type[Server], opts: Options) -> list[dict]:
    """100 normal clients alone, then again while 1,000 clients trickle bytes."""
    n_slow = opts.pick(1000, 200)
    clients = opts.pick(100, 100, opts.clients)
    count = opts.pick(10000, 2000, opts.messages)
    base_row = load_once("slow-baseline", server_cls, opts, clients, count, 1024, 1)

    server = server_cls(fsync=opts.fsync)
    run_id = new_run_id("slow", server.name)
    label = f"slow/{server.name}"
    slow_worker = None
    try:
        server.start()
        common = {"host": HOST, "port": server.port, "run_id": run_id, "rcpts": 1}
        common.update(deadline=opts.time_limit, io_timeout=300)
        sspec = {
            **common,
            "kind": "slow",
            "clients": n_slow,
            "ids": [count, count + n_slow * 20, 1],
            "size": 1024,
            "chunk": 8,
            "interval": 1.0,
            "connect_concurrency": 100,
        }
        slow_worker = Worker(sspec)
        progress = Progress(label + " slow clients connecting", None)
        pump([slow_worker], lambda: slow_worker.ready or slow_worker.done, 120, progress)
        time.sleep(3.0)  # let the trickle get going
        spec = {
            **common,
            "kind": "load",
            "clients": clients,
            "ids": [0, count, 1],
            "size": 1024,
            "pipelining": opts.pipelining,
        }
        outcome, srv = run_jobs(
            split_load(spec, opts.workers), label + " normal", opts.time_limit + 60, server, count
        )
        slow_worker.send("stop")
        pump([slow_worker], lambda: slow_worker.done, 300)
        slow_worker.finish()
        slow_out = Outcome()
        slow_out.add(slow_worker.result, sspec)
        both = Outcome()
        both.acked = {**outcome.acked, **slow_out.acked}
        both.refused = outcome.refused | slow_out.refused
        verdict = _finish(server, both, run_id, opts)
        row = _row("slow", server, outcome, srv, verdict)
        row.update(clients=clients, slow_clients=n_slow)
        row["slow_connected"] = slow_out.connected
        row["slow_acked"] = slow_out.ok
        row["slow_errors"] = dict(slow_out.errors)
        row["slow_p50_ms"] = slow_out.percentile(50)
        row["baseline_msgs_per_s"] = base_row["msgs_per_s"]
        row["baseline_p99_ms"] = base_row.get("p99_ms")
        row["baseline_ok"] = base_row["ok"]
        row["ok"] = (
            row["ok"]
            and base_row["ok"]
            and outcome.ok == count
            and not slow_out.errors
            and slow_out.connected == n_slow
        )
        return [row]
    finally:
        if slow_worker is not None and not slow_worker.done:
            slow_worker.send("stop")
            slow_worker.finish()
        server.stop()
        if not opts.keep:
            server.cleanup()


# ------------------------------------------------------------ flood (issue 19)

#: The attackers' addresses: 750 loopback ones (127.0.1-3.2-251), so that a
#: limit per address (geosmtp's client_limits.max_connections, 50) alone
#: does not stop them; or all from one.
FLOOD_MANY = [f"127.0.{a}.{b}" for a in (1, 2, 3) for b in range(2, 252)]
FLOOD_ONE = ["127.0.0.2"]
#: The normal clients' addresses (127.0.4.2-251): a session each, as
#: different senders' MTAs.
FLOOD_NORMAL_NET = "127.0.4."
FLOOD_PHASES = (("quiet", None), ("many", FLOOD_MANY), ("one", FLOOD_ONE))


def flood(server_cls: type[Server], opts: Options) -> list[dict]:
    """100 normal sessions send alone (quiet), then while 1,000 clients trickle
    a byte of an unfinished command line every 1.5-4.5 s and 200 connect and
    drop in a loop, the attackers from 750 addresses (many), then from one
    (one). A fresh server each time, geosmtp with its client_limits as shipped."""
    n_slow = opts.pick(1000, 200)
    n_churn = opts.pick(200, 50)
    clients = opts.pick(100, 100, opts.clients)
    count = opts.pick(10000, 2000, opts.messages)
    row: dict = {"scenario": "flood", "clients": clients, "slow_clients": n_slow}
    row.update(churn_clients=n_churn, ok=True, verify=[])
    for phase, sources in FLOOD_PHASES:
        got = _flood_phase(server_cls, opts, phase, sources, n_slow, n_churn, clients, count)
        row["server"] = got.pop("server")
        row["ok"] = row["ok"] and got.pop("ok")
        row["verify"].append(f"{phase}: {got.pop('verify')}")
        row.update({f"{phase}_{k}": v for k, v in got.items()})
    quiet = row.get("quiet_msgs_per_s")
    for phase in ("many", "one"):
        got = row.get(f"{phase}_msgs_per_s")
        if quiet and got is not None:
            row[f"{phase}_held"] = got / quiet
    row["verify"] = "; ".join(row["verify"])
    row["msgs_per_s"] = row.get("many_msgs_per_s")
    row["p99_ms"] = row.get("many_p99_ms")
    return [row]


def _flood_phase(
    server_cls: type[Server],
    opts: Options,
    phase: str,
    sources: list[str] | None,
    n_slow: int,
    n_churn: int,
    clients: int,
    count: int,
) -> dict:
    server = server_cls(fsync=opts.fsync)
    server.shipped_limits = True
    run_id = new_run_id("flood", server.name)
    label = f"flood/{server.name} {phase}"
    attack = None
    out: dict = {"server": server.name}
    try:
        server.start()
        common = {"host": HOST, "port": server.port, "run_id": run_id, "rcpts": 1}
        common.update(deadline=opts.time_limit, io_timeout=300)
        measurable = server.measurable
        rss0 = server.rss() if measurable else 0
        socks0 = sum(tree_sockets(server.pid).values()) if measurable else 0
        if sources:
            aspec = {**common, "kind": "flood", "clients": n_slow, "ids": [0, 0, 1]}
            aspec.update(sources=sources, churn=n_churn, churn_each=2000, interval=3.0)
            attack = Worker(aspec)
            progress = Progress(label + " attackers connecting", None)
            pump([attack], lambda: attack.ready or attack.done, 120, progress)
            time.sleep(3.0)  # the trickle and the churn get going
        if measurable:
            out["rss_attack_mb"] = server.rss() / 1024
            out["server_sockets_attack"] = sum(tree_sockets(server.pid).values())
        spec = {**common, "kind": "load", "clients": clients, "ids": [0, count, 1]}
        spec.update(size=1024, pipelining=opts.pipelining, source_net=FLOOD_NORMAL_NET)
        outcome, srv = run_jobs(
            split_load(spec, opts.workers), label, opts.time_limit + 60, server, count
        )
        if attack is not None:
            attack.send("stop")
            pump([attack], lambda: attack.done, 120)
            attack.finish()
            out.update(_flood_attackers(attack.result))
        if measurable:
            # The attackers' connections closed: the server's sockets back where they were.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                left = sum(tree_sockets(server.pid).values())
                if left <= socks0 + 2:
                    break
                time.sleep(0.2)
            out["server_sockets_after"] = sum(tree_sockets(server.pid).values()) - socks0
            out["rss_before_mb"] = rss0 / 1024
            out["rss_after_mb"] = server.rss() / 1024
        verdict = _finish(server, outcome, run_id, opts)
        row = _row("flood", server, outcome, srv, verdict)
        for key in ("msgs_per_s", "p50_ms", "p99_ms", "errors", "connect_retries"):
            out[key] = row[key]
        if "rss_peak_mb" in row:
            out["rss_peak_mb"] = row["rss_peak_mb"]
            out["server_cpu_pct"] = row["server_cpu_pct"]
            out["other_cpu_pct"] = row.get("other_cpu_pct")
        out["verify"] = row["verify"]
        out["ok"] = row["ok"] and outcome.ok == count
        return out
    finally:
        if attack is not None and not attack.done:
            attack.send("stop")
            attack.finish()
        server.stop()
        if not opts.keep:
            server.cleanup()


def _flood_attackers(result: dict | None) -> dict:
    """What the server did to the attackers: tricklers admitted, refused at
    once (by the reply's first 9 octets), cut later (likewise), how long
    the cut ones were held; connect-and-drop attempts."""
    f = (result or {}).get("flood") or {}
    held = sorted(f.get("held_s") or [])
    return {
        "admitted": f.get("admitted", 0),
        "refused": sum((f.get("refused") or {}).values()),
        "refused_by": f.get("refused") or {},
        "cut": sum((f.get("cut") or {}).values()),
        "cut_by": f.get("cut") or {},
        "held_max_s": held[-1] if held else float("nan"),
        "churned": f.get("churned", 0),
        "churn_failed": f.get("churn_failed", 0),
    }


RELAY_DOMAIN = "remote.test"
ACCEPT_TAIL = 250  # the acceptance rate is measured until the last 250


def relay(server_cls: type[Server], opts: Options) -> list[dict]:
    """100 sessions submit 10,000 messages for a remote domain; relayed to a local sink."""
    clients = opts.pick(100, 100, opts.clients)
    count = opts.pick(10000, 2000, opts.messages)
    size = opts.size or 1024
    sink: RelaySink | SmtpSinkNextHop = (
        SmtpSinkNextHop() if opts.sink == "smtp-sink" else RelaySink(delay=opts.sink_delay)
    )
    server = server_cls(fsync=opts.fsync, max_size=64 * MB)
    server.relay_port = sink.port
    if isinstance(server, Geosmtp) and server.worker_count is None and server.knows("workers"):
        server.worker_count = opts.server_workers or 1  # issue 20: one process
    label = f"relay/{server.name} c={clients}"
    try:
        sink.start()
        server.start()
        run_id = new_run_id("relay", server.name)
        sink_cpu0 = sink.cpu()
        server_cpu0 = server.cpu()
        if opts.client == "smtp-source":
            outcome, srv = _relay_smtp_source(server, opts, clients, count, size), {}
        else:
            spec = {
                "kind": "load",
                "host": HOST,
                "port": server.port,
                "run_id": run_id,
                "clients": clients,
                "ids": [0, count, 1],
                "size": size,
                "rcpts": 1,
                "pipelining": opts.pipelining,
                "deadline": opts.time_limit,
                "io_timeout": 120,
                "mailboxes": opts.mailboxes or messages.MAILBOXES,
                "domain": RELAY_DOMAIN,
            }
            outcome, srv = run_jobs(
                split_load(spec, opts.workers), label, opts.time_limit + 60, server, total=count
            )
        # Delivery: until the sink has every acknowledged message and the queue is empty.
        # A queue that stays empty while the sink lacks messages has lost them: stop then.
        acked = len(outcome.acked)
        progress = Progress(label + " delivering", acked)
        deadline = time.monotonic() + opts.time_limit
        empty_since: float | None = None
        queue_empty_at = float("nan")
        while time.monotonic() < deadline:
            got = sink.received()
            queued = server.queued()
            progress.show(got, 0, f"  queued {queued}")
            if queued == 0:
                if empty_since is None:
                    empty_since = time.monotonic()
                    queue_empty_at = time.time()
                if got >= acked or time.monotonic() - empty_since > 10:
                    break
            else:
                empty_since = None
                queue_empty_at = float("nan")
            time.sleep(0.05 if sink.counted else 0.1)  # counted: the last one's time by polling
        progress.show(sink.received(), 0, f"  queued {server.queued()}", force=True)
        still_queued = server.queued()
        sink_cpu = sink.cpu() - sink_cpu0
        server_cpu = server.cpu() - server_cpu0
        server.stop()
        sink.stop()
        if sink.counted or opts.client == "smtp-source":
            row = _relay_counted_row(server, outcome, srv, sink, still_queued)
        else:
            assert isinstance(sink, RelaySink)
            row = _relay_row(server, outcome, srv, sink.records(), run_id, still_queued)
        row.update(_spread(server))
        row["queue_empty_s"] = queue_empty_at - outcome.start
        row["sink_cpu_pct"] = 100 * sink_cpu / max(1e-9, row["delivery_s"])
        if server.measurable:  # over acceptance and delivery both
            row["server_cpu_s"] = server_cpu
            row["server_cpu_pct"] = 100 * server_cpu / max(1e-9, row["delivery_s"])
            row["server_machine_pct"] = row["server_cpu_pct"] / CORES
            delivered = row["sink_received"] - row.get("foreign", 0)
            row["cpu_ms_per_msg"] = 1000 * server_cpu / max(1, delivered)
        row.update(_sink_connections(sink.connections()))
        row["ok"] = row["ok"] and outcome.ok == count and still_queued == 0
        row.update(clients=clients, size=size, rcpts=1, pipelining=opts.pipelining)
        smtp_source = opts.client == "smtp-source"
        row["client"] = "smtp-source" if smtp_source else f"bench ({opts.workers} proc)"
        row.update(
            sink=opts.sink, sink_delay=opts.sink_delay, server_workers=server_workers(server)
        )
        return [row]
    finally:
        server.stop()
        sink.stop()
        if not opts.keep:
            server.cleanup()
            sink.cleanup()


def server_workers(server: Server) -> int | None:
    """geosmtp's `workers:` in this run (None: one per CPU, or not geosmtp)."""
    return server.worker_count if isinstance(server, Geosmtp) else None


def _relay_smtp_source(
    server: Server, opts: Options, clients: int, count: int, size: int
) -> Outcome:
    """Submit the relay load with Postfix's smtp-source (many messages per
    session, no pipelining, no per-message replies: all or nothing by its
    exit status)."""
    cmd = [
        SMTP_SOURCE,
        "-d",
        "-s",
        str(clients),
        "-m",
        str(count),
        "-l",
        str(size),
        "-f",
        messages.SENDER,
        "-t",
        f"u000@{RELAY_DOMAIN}",
        "-M",
        "bench.test",
        f"{HOST}:{server.port}",
    ]
    progress = Progress(f"relay/{server.name} smtp-source", count)
    outcome = Outcome(start=time.time())
    proc = subprocess.run(cmd, capture_output=True, timeout=opts.time_limit, check=False)
    outcome.end = time.time()
    progress.show(count if proc.returncode == 0 else 0, proc.returncode, force=True)
    if proc.returncode == 0:
        outcome.ok = outcome.deliveries = count
        outcome.bytes = count * size
        outcome.acked = {n: (size, (f"u000@{RELAY_DOMAIN}",)) for n in range(count)}
    else:
        outcome.errors["smtp-source exit"] = proc.returncode
        outcome.examples.append(proc.stderr.decode(errors="replace")[-300:])
    return outcome


def _relay_counted_row(
    server: Server, outcome: Outcome, srv: dict, sink: Server, still_queued: int
) -> dict:
    """Rates and a check by count, where the messages carry no X-Bench-Id
    (smtp-source) or the sink tells none (smtp-sink): loss and duplicates
    n/a; the check fails when the sink has fewer or more than were acknowledged."""
    m = outcome.metrics()
    acks = sorted(outcome.ack_times)
    if len(acks) > ACCEPT_TAIL:
        accept_rate = (len(acks) - ACCEPT_TAIL) / max(1e-9, acks[-ACCEPT_TAIL - 1] - outcome.start)
    else:
        accept_rate = m["msgs_per_s"]  # smtp-source: all messages over its whole run
    received = sink.received()  # type: ignore[attr-defined]
    delivery_s = sink.last_time() - outcome.start  # type: ignore[attr-defined]
    acked = len(outcome.acked)
    row = {
        "scenario": "relay",
        "server": server.name,
        **m,
        **_server_figures(srv, m["duration_s"], outcome.client_cpu),
        "accept_per_s": accept_rate,
        "accept_all_per_s": m["msgs_per_s"],
        "delivery_s": delivery_s,
        "delivery_per_s": received / max(1e-9, delivery_s),
        "sink_received": received,
        "missing": None,
        "duplicates": None,
        "counted": True,
        "still_queued": still_queued,
    }
    if outcome.ack_times:
        row["client_cpu_pct"] = 100 * outcome.client_cpu / m["duration_s"]
    problems = []
    if received != acked:
        problems.append(f"{received} at the sink for {acked} acknowledged")
    return _checked(
        row,
        problems,
        still_queued,
        outcome,
        f"sink (counted, no ids): {received} of {acked} acknowledged",
        "sink (counted): ",
    )


def _checked(  # type: ignore[no-untyped-def]
    row: dict, problems: list[str], still_queued: int, outcome, ok: str, failed: str
) -> dict:
    """A relay row's check: `ok` when no problem (a queue left with entries is
    one), else `failed` and the problems; errors in the load fail it too."""
    if still_queued:
        problems.append(f"{still_queued} still queued")
    row["verify"] = ok if not problems else failed + "; ".join(problems)
    row["verify_examples"] = problems
    row["ok"] = not problems and not outcome.errors
    return row


def _sink_connections(stats: dict) -> dict:
    """The connections the servers opened to the sink, and messages per connection."""
    if not stats:
        return {}
    out = {"sink_connections": stats["connections"]}
    out["msgs_per_connection"] = stats["messages"] / max(1, stats["connections"])
    if "per_connection" in stats:
        per = stats["per_connection"]
        out["sink_per_connection"] = {str(n): k for n, k in sorted(per.items())}
        out["max_msgs_per_connection"] = max(per, default=0)
    return out


def _relay_row(
    server: Server,
    outcome: Outcome,
    srv: dict,
    received: list[tuple[str, float]],
    run_id: str,
    still_queued: int,
) -> dict:
    """Acceptance and delivery rates; the sink's ids against the acknowledged ones."""
    m = outcome.metrics()
    prefix = run_id + "."
    seen: dict[int, int] = {}
    foreign = 0
    for ident, _t in received:
        if ident.startswith(prefix) and ident[len(prefix) :].isdigit():
            n = int(ident[len(prefix) :])
            seen[n] = seen.get(n, 0) + 1
        else:
            foreign += 1
    sent = set(outcome.acked)
    missing = sorted(sent - set(seen))
    duplicates = sorted(n for n, k in seen.items() if k > 1)
    unacked = sorted(set(seen) - sent)  # delivered, though the client saw no 250
    # Acceptance: acked messages up to the last 250 but the last ACCEPT_TAIL.
    acks = sorted(outcome.ack_times) if outcome.ack_times else []
    if len(acks) > ACCEPT_TAIL:
        accept_rate = (len(acks) - ACCEPT_TAIL) / max(1e-9, acks[-ACCEPT_TAIL - 1] - outcome.start)
    else:
        accept_rate = m["msgs_per_s"]
    last = max((t for _i, t in received), default=float("nan"))
    delivery_s = last - outcome.start
    row = {
        "scenario": "relay",
        "server": server.name,
        **m,
        **_server_figures(srv, m["duration_s"], outcome.client_cpu),
        "accept_per_s": accept_rate,
        "accept_all_per_s": m["msgs_per_s"],
        "delivery_s": delivery_s,
        "delivery_per_s": len(seen) / max(1e-9, delivery_s),
        "sink_received": len(received),
        "missing": len(missing),
        "duplicates": len(duplicates),
        "unacked_delivered": len(unacked),
        "foreign": foreign,
        "still_queued": still_queued,
    }
    row["client_cpu_pct"] = 100 * outcome.client_cpu / m["duration_s"]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (lost), e.g. {missing[:5]}")
    if duplicates:
        problems.append(f"{len(duplicates)} duplicated, e.g. {duplicates[:5]}")
    if unacked:
        problems.append(f"{len(unacked)} delivered without a 250, e.g. {unacked[:5]}")
    if foreign:
        problems.append(f"{foreign} messages without this run's X-Bench-Id")
    return _checked(
        row,
        problems,
        still_queued,
        outcome,
        f"sink: {len(seen)} of {len(sent)} acknowledged, no loss, no duplicate",
        "sink: ",
    )


def pop3(server_cls: type[Server], opts: Options) -> list[dict]:
    """1,000 full mailboxes emptied by 200 concurrent POP3 sessions."""
    boxes = opts.pick(1000, 100, opts.mailboxes)
    per_box = opts.messages or mailboxes.PER_BOX
    clients = min(boxes, opts.pick(200, 50, opts.clients))
    server = server_cls(fsync=opts.fsync)
    run_id = new_run_id("pop3", server.name)
    label = f"pop3/{server.name} c={clients}"
    row: dict = {"scenario": "pop3", "server": server.name, "clients": clients}
    row.update(mailboxes=boxes, per_box=per_box, hash=opts.hash, size=opts.size)
    row["client"] = f"bench ({opts.workers} proc)"
    try:
        server.pop3_port = free_port()
        server.pop3_users = mailboxes.hashes(boxes, opts.hash, say=_say)
        progress = Progress(label + " filling Maildirs", boxes * per_box)
        files, octets = mailboxes.populate(
            server.mail_dir,
            run_id,
            boxes,
            per_box,
            opts.size,
            lambda done: progress.show(done * per_box, 0),
        )
        progress.show(files, 0, f"  {octets / 1e6:,.0f} MB", force=True)
        row.update(stored_messages=files, stored_mb=octets / 1e6)
        try:
            server.start()
        except RuntimeError as exc:  # e.g. a geosmtp without POP3: its row fails, others run
            row.update(ok=False, verify=f"could not start: {str(exc).strip()[-300:]}")
            row["errors"] = {"server did not start": 1}
            return [row]
        spec = {
            "kind": "pop3",
            "host": HOST,
            "port": server.pop3_port,
            "run_id": run_id,
            "clients": clients,
            "boxes": [0, boxes, 1],
            "per_box": per_box,
            "fixed_size": opts.size,
            "deadline": opts.time_limit,
            "io_timeout": 120,
        }
        specs = split_load(spec, opts.workers, key="boxes")
        outcome, srv = run_jobs(specs, label, opts.time_limit + 60, server, total=files, tree=True)
        server.stop()
        emptied = mailboxes.check_emptied(server.mail_dir, boxes)
        row.update(_pop3_figures(outcome, srv))
        row.update(_spread(server))
        row["verify"] = (
            f"{outcome.boxes_ok:,} of {boxes:,} mailboxes retrieved whole and byte-exact; "
            + emptied.summary()
        )
        if outcome.not_logged_in:
            row["verify"] += f"; {outcome.not_logged_in:,} sessions not logged in (tried again)"
        row["verify_examples"] = emptied.examples
        row["ok"] = (
            emptied.ok
            and not outcome.errors
            and outcome.boxes_ok == boxes
            and outcome.sessions == boxes
            and outcome.ok == files
        )
        return [row]
    finally:
        server.stop()
        if not opts.keep:
            server.cleanup()


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _pop3_figures(outcome: Outcome, srv: dict) -> dict:
    d = outcome.duration
    out = outcome.metrics()  # messages, msgs/s, MB/s, session latencies (connect to QUIT)
    del out["deliveries_per_s"]
    out.update(
        sessions=outcome.sessions,
        sessions_per_s=outcome.sessions / d,
        login_p50_ms=nearest_rank(outcome.login_latencies, 50),
        login_p99_ms=nearest_rank(outcome.login_latencies, 99),
        not_logged_in=outcome.not_logged_in,
        login_examples=outcome.login_examples,
        client_cpu_pct=100 * outcome.client_cpu / d,
    )
    if "cpu_s" in srv:
        out["server_cpu_s"] = srv["cpu_s"]
        out["server_cpu_pct"] = 100 * srv["cpu_s"] / d
        out["server_machine_pct"] = 100 * srv["cpu_s"] / d / CORES
        out["pss_before_mb"] = srv["tree_pss_before_kb"] / 1024
        out["pss_peak_mb"] = srv["tree_pss_peak_kb"] / 1024
        out["rss_sum_peak_mb"] = srv["tree_rss_peak_kb"] / 1024
        out["procs_peak"] = srv["tree_procs_peak"]
        # What neither the server, the load generator nor the driver used: other programs.
        others = srv["machine_cpu_s"] - srv["cpu_s"] - outcome.client_cpu - srv["driver_cpu_s"]
        out["driver_cpu_pct"] = 100 * srv["driver_cpu_s"] / d
        out["other_cpu_pct"] = 100 * max(0.0, others) / d
    return out


def crash(server_cls: type[Server], opts: Options) -> list[dict]:
    """kill -9 under load: per trial, 100 sessions send while the master or a worker is killed."""
    if server_cls.name != "geosmtp":
        raise RuntimeError("crash: geosmtp only (it kills geosmtp's master and workers)")
    trials = opts.trials or opts.pick(100, 10)
    cfg = TrialConfig(sessions=opts.clients or 100, time_limit=min(opts.time_limit, 60.0))
    base = int.from_bytes(os.urandom(4), "big") >> 2
    _say(f"crash: {trials} trials, seeds {base}..{base + trials - 1}")
    results = []
    for i in range(trials):
        result = run_trial(base + i, cfg)
        results.append(result)
        state = "ok" if result.ok else "FAILED"
        _say(f"   trial {i + 1}/{trials} {state}: {result.line()}")
    return [_crash_row(results, cfg)]


def _crash_row(results: list[TrialResult], cfg: TrialConfig) -> dict:
    """The trials' sums, overall and per victim (master / worker, and when)."""
    keys = ("acked", "acked_local", "found", "acked_relayed", "relayed_found", "duplicates")
    keys += ("partials", "resent", "in_flight", "journals", "unacked", "unacked_found")

    def sums(rs: list[TrialResult]) -> dict:
        out = {k: sum(getattr(r, k) for r in rs) for k in keys}
        out["trials"] = len(rs)
        out["failed"] = sum(not r.ok for r in rs)
        return out

    by_victim = {
        f"{v}/{m}": sums([r for r in results if (r.victim, r.moment) == (v, m)])
        for v in ("master", "worker")
        for m in ("load", "update")
    }
    pop3 = Counter(outcome for r in results for outcome in r.pop3)
    failed = [r for r in results if not r.ok]
    total = sums(results)
    row = {
        "scenario": "crash",
        "server": "geosmtp",
        "clients": cfg.sessions,
        **total,
        "by_victim": by_victim,
        "pop3_outcomes": dict(pop3),
        "trial_lines": [r.line() for r in results],
        "seconds_per_trial": statistics.mean(r.seconds for r in results) if results else 0,
    }
    row["verify"] = (
        f"{total['trials']} trials: {total['found']} of {total['acked_local']} acknowledged "
        f"local deliveries found, {total['relayed_found']} of {total['acked_relayed']} relayed; "
        f"{total['duplicates']} duplicates, {total['partials']} partial files, "
        f"{total['resent']} resent to the sink; {total['failed']} trials failed"
    )
    row["verify_examples"] = [r.line() for r in failed[:5]]
    row["ok"] = not failed
    return row


SCENARIOS = {
    "throughput": throughput,
    "fanout": fanout,
    "scaling": scaling,
    "idle": idle,
    "large": large,
    "slow": slow,
    "flood": flood,
    "relay": relay,
    "pop3": pop3,
    "crash": crash,
}

# The soak (issue 19): its own module, its own results (bench/soak.py).
from .soak import soak  # noqa: E402

SCENARIOS["soak"] = soak
