"""Medians over rounds, the Markdown table with ratios, the PNG plot."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from .servers import BENCH_DIR

CORES = os.cpu_count() or 1

RESULTS = BENCH_DIR / "results"
REFERENCE = "geosmtp"
PEER = "aiosmtpd"

# Targets from the issue: (scenario, label, check(medians) -> (met, text)).
NUMERIC_SKIP = {"round", "clients", "size", "rcpts", "slow_clients", "churn_clients"}


def _num(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def aggregate(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(server, clients) -> medians of every numeric field, plus counts and checks."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["server"], int(r.get("clients") or 0))].append(r)
    out = {}
    for key, rs in groups.items():
        agg: dict = {"server": key[0], "clients": key[1], "rounds": len(rs)}
        fields = {k for r in rs for k, v in r.items() if _num(v) and k not in NUMERIC_SKIP}
        for f in sorted(fields):
            vals = [r[f] for r in rs if _num(r.get(f))]
            if vals:
                agg[f] = statistics.median(vals)
                agg[f + "_all"] = vals
        for f in ("per_worker", "idle_by_process"):
            every = [r[f] for r in rs if r.get(f)]
            if every:
                agg[f + "_all"] = every
        agg["ok"] = all(r.get("ok") for r in rs)
        agg["verify"] = "; ".join(sorted({r.get("verify", "") for r in rs}))[:300]
        agg["client"] = rs[0].get("client", "bench")
        if "sink" in rs[0]:
            agg["sink_name"] = rs[0]["sink"]
        errs: dict[str, int] = defaultdict(int)
        for r in rs:
            for k, v in (r.get("errors") or {}).items():
                errs[k] += v
        agg["errors"] = dict(errs)
        out[key] = agg
    return out


def _f(x: object, digits: int = 0) -> str:
    if not _num(x):
        return "-"
    return f"{x:,.{digits}f}"


def _g(x: object) -> str:
    """A rate: whole numbers, unless it is small."""
    return _f(x, 1 if _num(x) and abs(x) < 100 else 0)  # type: ignore[arg-type]


def _ratio(a: object, b: object) -> str:
    if not (_num(a) and _num(b)) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _versus(agg: dict, figures: list[tuple[str, str]]) -> list[str]:
    """`- geosmtp / OTHER: label 1.23x, ...` for each other server, one figure per pair."""
    ref = next((a for (s, _c), a in agg.items() if s == REFERENCE), None)
    if ref is None:
        return []
    return [
        f"- geosmtp / {s}: "
        + ", ".join(f"{label} {_ratio(ref.get(key), a.get(key))}" for label, key in figures)
        for (s, _c), a in sorted(agg.items())
        if s != REFERENCE
    ]


def _checked(agg: dict) -> str:
    if "not checked" in agg.get("verify", ""):
        return "n/a (stores nothing)"
    return "ok" if agg["ok"] else "**FAILED**"


SERVER_ORDER = ["geosmtp", "aiosmtpd", "postfix", "smtp-sink", "dovecot", "dovecot-perf"]


def _rank(server: str) -> tuple[int, str]:
    """geosmtp first, its variants (`geosmtp+w1`, `geosmtp@REV`) next, then the peers."""
    if server in SERVER_ORDER:
        return SERVER_ORDER.index(server), ""
    if server.startswith("geosmtp"):
        return 0, server
    return 99, server


def _order(servers: list[str]) -> list[str]:
    return sorted(servers, key=_rank)


def table(scenario: str, rows: list[dict]) -> str:
    agg = aggregate(rows)
    base = scenario.split("-")[0]
    if base in ("throughput", "fanout", "large", "scaling"):
        return _load_table(scenario, agg)
    if base == "idle":
        return _idle_table(agg)
    if base == "slow":
        return _slow_table(agg)
    if base == "flood":
        return _flood_table(agg)
    if base == "relay":
        return _relay_table(agg)
    if base == "pop3":
        return _pop3_table(agg)
    if base == "crash":
        return _crash_table(rows)
    raise ValueError(scenario)


CRASH_COLUMNS = ("trials", "acked", "acked_local", "found", "acked_relayed", "relayed_found")
CRASH_COLUMNS += ("duplicates", "partials", "resent", "in_flight", "journals", "failed")


def _crash_table(rows: list[dict]) -> str:
    """kill -9 trials: the sums by victim (and moment), then overall."""
    head = ["victim", "trials", "messages acked", "local deliveries acked", "found"]
    head += ["relayed acked", "at the sink", "duplicates", "partial files"]
    head += ["resent to the sink", "deliveries in flight at the kill"]
    head += ["UPDATEs cut (journal finished at login)", "trials failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kinds = [*r.get("by_victim", {}).items(), ("all", r)]
        for kind, sums in kinds:
            if sums.get("trials"):
                lines.append(
                    f"| {kind} | " + " | ".join(_f(sums.get(k)) for k in CRASH_COLUMNS) + " |"
                )
        lines.append("")
        lines.append(
            f"POP3 sessions (QUIT reply / deletions after restart): {r.get('pop3_outcomes')}"
        )
        lines.append("")
        lines.append(f"check: {r.get('verify')}")
    return "\n".join(lines) + "\n"


def _pop3_table(agg: dict) -> str:
    lines = [
        "| server | mailboxes | sessions at once | rounds | sessions/s | MB/s | login p50 ms "
        "| login p99 ms | not logged in | session p50 ms | session p99 ms | server CPU "
        "| client CPU | other CPU | server peak PSS MB | processes | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(agg, key=lambda k: _rank(k[0])):
        a = agg[key]
        lines.append(
            f"| {a['server']} | {_f(a.get('mailboxes'))} | {a['clients']:,} | {a['rounds']} "
            f"| {_f(a.get('sessions_per_s'), 1)} | {_f(a.get('mb_per_s'), 1)} "
            f"| {_f(a.get('login_p50_ms'), 1)} | {_f(a.get('login_p99_ms'), 1)} "
            f"| {_f(a.get('not_logged_in'))} | {_f(a.get('p50_ms'), 1)} | {_f(a.get('p99_ms'), 1)} "
            f"| {_f(a.get('server_cpu_pct'))}% | {_f(a.get('client_cpu_pct'))}% "
            f"| {_f(a.get('other_cpu_pct'))}% "
            f"| {_f(a.get('pss_peak_mb'), 1)} | {_f(a.get('procs_peak'))} | {_checked(a)} |"
        )
    lines.append("")
    lines += _versus(agg, [("sessions/s", "sessions_per_s"), ("peak PSS", "pss_peak_mb")])
    for a in agg.values():
        if not a["ok"]:
            lines.append(f"- {a['server']}: {a['verify']}")
    lines.append("")
    lines.append(
        "sessions/s: sessions (login, STAT, LIST, UIDL, RETR and DELE of every message, QUIT) "
        "/ time from the start of the load to the last QUIT's +OK; MB/s: the stored octets of "
        "the messages retrieved, per second; login: PASS to its +OK; not logged in: sessions "
        "the server refused or dropped before PASS had its +OK (each tried again a second later, "
        "up to 5 times, as a mail program polls again); session: from the first connect to "
        "QUIT's +OK; server CPU and peak PSS: summed over the server's processes (sampled "
        "every 0.5 s, less often when that is costly); other CPU: what the rest of the machine "
        "used meanwhile (all busy CPU but the server's, the load generator's and the bench "
        "driver's; 200% = both cores): a run with much of it was disturbed; processes: the "
        "most seen at once; check: every message came back once, byte-exact, and every "
        "Maildir is empty."
    )
    return "\n".join(lines) + "\n\n" + targets("pop3", agg)


def _relay_table(agg: dict) -> str:
    lines = [
        "| server | workers | next hop | client | sessions | rounds | accepted msgs/s "
        "| delivered msgs/s | delivery time s | queue empty s | accept p99 ms | lost | duplicated "
        "| server CPU | CPU ms per msg | sink connections | msgs per connection | sink CPU "
        "| check |",
        "|---|---:|---|---|" + "---:|" * 14 + "---|",
    ]
    for key in sorted(agg, key=lambda k: _rank(k[0])):
        a = agg[key]
        if "missing_all" in a:
            lost = f"{sum(a['missing_all']):,}"
            dups = f"{sum(a.get('duplicates_all', [])):,}"
        else:  # no X-Bench-Ids to check: the sink counted
            lost = dups = "n/a (counted)"
        lines.append(
            f"| {a['server']} | {_f(a.get('server_workers'))} | {_next_hop(a)} | {a['client']} "
            f"| {a['clients']:,} | {a['rounds']} "
            f"| {_g(a.get('accept_per_s'))} | {_g(a.get('delivery_per_s'))} "
            f"| {_f(a.get('delivery_s'), 1)} | {_f(a.get('queue_empty_s'), 1)} "
            f"| {_f(a.get('p99_ms'), 1)} | {lost} | {dups} "
            f"| {_f(a.get('server_cpu_pct'))}% | {_f(a.get('cpu_ms_per_msg'), 2)} "
            f"| {_f(a.get('sink_connections'))} | {_f(a.get('msgs_per_connection'), 1)} "
            f"| {_f(a.get('sink_cpu_pct'))}% | {_checked(a)} |"
        )
    lines.append("")
    lines += _versus(
        agg,
        [
            ("acceptance", "accept_per_s"),
            ("delivery", "delivery_per_s"),
            ("CPU per message", "cpu_ms_per_msg"),
        ],
    )
    lines.append("")
    lines.append(
        "accepted msgs/s: acknowledged messages but the last 250 / time from the start "
        "of the load to the 250 before them (smtp-source: all / its run time); delivered "
        "msgs/s: messages the sink received / time from the start of the load to the sink's "
        "last one; lost and duplicated: summed over the rounds (the sink's X-Bench-Ids "
        "against the acknowledged ones; n/a where the messages carry none or the sink tells "
        "none, and the check compares counts); workers: geosmtp's serving processes; server "
        "CPU: its processes' user+system time from the start of the load until the queue was "
        "empty (geosmtp: master and workers; Postfix: master and every daemon it started, the "
        "ended ones too), 100% = one core of the delivery time; CPU ms per msg: that time / "
        "messages delivered; sink connections: connections the server opened to the next hop "
        "(the bench's readiness probe left out); msgs per connection: their mean."
    )
    return "\n".join(lines) + "\n\n" + targets("relay", agg)


def _next_hop(a: dict) -> str:
    """`sink`, `sink +50 ms`, `smtp-sink`: the next hop of a relay row."""
    hop = a.get("sink_name") or "sink"
    delay = a.get("sink_delay")
    return f"{hop} +{delay * 1000:g} ms" if _num(delay) and delay else hop


def _load_table(scenario: str, agg: dict) -> str:
    lines = [
        "| server | sessions | client | rounds | msgs/s | deliveries/s | MB/s | p50 ms | p95 ms "
        "| p99 ms | max ms | server CPU | of machine | client CPU | other CPU "
        "| server RSS growth MB | Maildir check |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    keys = sorted(agg, key=lambda k: (k[1], _rank(k[0])))
    for key in keys:
        a = agg[key]
        lines.append(
            f"| {a['server']} | {a['clients']:,} | {a['client']} | {a['rounds']} "
            f"| {_g(a.get('msgs_per_s'))} | {_g(a.get('deliveries_per_s'))} "
            f"| {_f(a.get('mb_per_s'), 2)} | {_f(a.get('p50_ms'), 1)} | {_f(a.get('p95_ms'), 1)} "
            f"| {_f(a.get('p99_ms'), 1)} | {_f(a.get('max_ms'), 1)} "
            f"| {_f(a.get('server_cpu_pct'))}% | {_f(a.get('server_machine_pct'))}% "
            f"| {_f(a.get('client_cpu_pct'))}% | {_f(a.get('other_cpu_pct'))}% "
            f"| {_f(a.get('rss_growth_mb'), 1)} | {_checked(a)} |"
        )
    lines.append("")
    lines.append(
        "server CPU: the server's processes (geosmtp: master and workers), 100% = one core; "
        f"of machine: the same as a share of all {CORES} cores; other CPU: what the rest of the "
        "machine used meanwhile (all busy CPU but the server's, the load generator's and the "
        "bench driver's; 100% = one core): much of it means a disturbed run."
    )
    lines.append("")
    levels = sorted({c for _s, c in agg})
    for level in levels:
        ref = agg.get((REFERENCE, level))
        if ref is None:
            continue
        for (server, c), other in sorted(agg.items()):
            if c != level or server == REFERENCE:
                continue
            lines.append(
                f"- geosmtp / {server} at {level:,} sessions: throughput "
                f"{_ratio(ref.get('msgs_per_s'), other.get('msgs_per_s'))}, "
                f"p99 latency {_ratio(ref.get('p99_ms'), other.get('p99_ms'))}"
            )
    lines += _phase_table(agg, keys)
    lines += _spread_lines(rows_by_key=agg)
    return "\n".join(lines) + "\n" + targets(scenario, agg)


def _spread_lines(rows_by_key: dict) -> list[str]:
    """Sessions and messages per serving process, for the servers that tell."""
    keys = [k for k in sorted(rows_by_key, key=lambda k: (k[1], _rank(k[0])))]
    keys = [k for k in keys if rows_by_key[k].get("per_worker_all")]
    if not keys:
        return []
    out = [
        "",
        "Spread over the serving processes (from the access log; each round: sessions "
        "and accepted messages per process; busiest: the largest process's share, median "
        "of the rounds):",
        "",
        "| server | sessions | processes | sessions per process | messages per process "
        "| busiest: sessions | busiest: messages |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for key in keys:
        a = rows_by_key[key]
        rounds = a["per_worker_all"]
        sess = " · ".join("/".join(f"{w['sessions']:,}" for w in r.values()) for r in rounds)
        msgs = " · ".join("/".join(f"{w['messages']:,}" for w in r.values()) for r in rounds)
        out.append(
            f"| {a['server']} | {a['clients']:,} | {_f(a.get('worker_procs'))} | {sess} | {msgs} "
            f"| {_f(100 * a.get('busiest_sessions_share', math.nan))}% "
            f"| {_f(100 * a.get('busiest_msgs_share', math.nan))}% |"
        )
    return out


#: The phases the bench's client times (bench.loadgen.PHASES), as the table names them.
PHASE_NAMES = {
    "greeting": "connect → 220",
    "ehlo": "EHLO → 250",
    "mail": "MAIL → 250",
    "rcpt": "RCPT → 250",
    "data": "DATA → 354",
    "envelope": "MAIL+RCPT+DATA → 354",
    "dot": "end of DATA → 250",
}


def _phase_table(agg: dict, keys: list) -> list[str]:
    """Latency per phase (p50 / p95 / p99 ms) and messages per session (slowest /
    mean / most): where a session waits, and whether some wait far more."""
    phases = [p for p in PHASE_NAMES if any(_num(agg[k].get(f"{p}_p99_ms")) for k in keys)]
    if not phases:
        return []
    lines = [
        "",
        "Latency per phase, ms (p50 / p95 / p99), and messages per session:",
        "",
        "| server | sessions | "
        + " | ".join(PHASE_NAMES[p] for p in phases)
        + " | msgs per session: slowest / mean / most |",
        "|---|---:|" + "---:|" * (len(phases) + 1),
    ]
    for key in keys:
        a = agg[key]
        cells = [" / ".join(_f(a.get(f"{p}_p{q}_ms"), 1) for q in (50, 95, 99)) for p in phases]
        counts = " / ".join(
            _f(a.get(f"session_{w}_msgs"), 1 if w == "mean" else 0) for w in ("min", "mean", "max")
        )
        row = " | ".join(cells)
        lines.append(f"| {a['server']} | {a['clients']:,} | {row} | {counts} |")
    lines.append("")
    lines.append(
        "Each figure is the median over the rounds. The phases are timed by the client: "
        "from the start of the connect to the greeting, each command (or pipelined group) "
        "to its reply, the final dot to its 250; msgs per session: how many messages each "
        "session had acknowledged (sessions take the next message from one shared list, "
        "so a session the server serves slowly sends fewer)."
    )
    return lines


def _idle_table(agg: dict) -> str:
    lines = [
        "| server | idle connections | rounds | processes | idle connections per process "
        "| RSS per conn KB | PSS per conn KB "
        "| fresh client p50 ms | fresh client max ms | RSS before MB | RSS idle MB | check |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(agg, key=lambda k: _rank(k[0])):
        a = agg[key]
        lines.append(
            f"| {a['server']} | {_f(a.get('connected'))} | {a['rounds']} "
            f"| {_f(a.get('server_procs'))} | {_idle_spread(a)} "
            f"| {_f(a.get('rss_per_conn_kb'), 1)} | {_f(a.get('pss_per_conn_kb'), 1)} "
            f"| {_f(a.get('probe_p50_ms'), 1)} | {_f(a.get('probe_max_ms'), 1)} "
            f"| {_f(a.get('rss_before_mb'), 1)} | {_f(a.get('rss_idle_mb'), 1)} | {_checked(a)} |"
        )
    lines.append("")
    lines += _versus(agg, [("memory per connection (PSS)", "pss_per_conn_kb")])
    lines.append(
        "Memory is summed over the server's processes (geosmtp: master and workers; "
        "PSS, so the pages they share count once); idle connections per process: the "
        "sockets each process gained (one group per round)."
    )
    return "\n".join(lines) + "\n" + targets("idle", agg)


def _idle_spread(a: dict) -> str:
    rounds = a.get("idle_by_process_all") or []
    return " · ".join("/".join(f"{n:,}" for n in r.values()) for r in rounds) or "-"


def _slow_table(agg: dict) -> str:
    lines = [
        "| server | normal sessions | slow sessions | rounds | msgs/s alone | msgs/s with slow "
        "| held | p99 ms alone | p99 ms with slow | slow msgs done | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(agg, key=lambda k: _rank(k[0])):
        a = agg[key]
        lines.append(
            f"| {a['server']} | {a['clients']} | {_f(a.get('slow_connected'))} | {a['rounds']} "
            f"| {_f(a.get('baseline_msgs_per_s'))} | {_f(a.get('msgs_per_s'))} "
            f"| {_ratio(a.get('msgs_per_s'), a.get('baseline_msgs_per_s'))} "
            f"| {_f(a.get('baseline_p99_ms'), 1)} | {_f(a.get('p99_ms'), 1)} "
            f"| {_f(a.get('slow_acked'))} | {_checked(a)} |"
        )
    return "\n".join(lines) + "\n\n" + targets("slow", agg)


def _flood_table(agg: dict) -> str:
    """Normal clients quiet / under attack from many addresses / from one;
    memory; what the server did to the attackers (medians of the rounds)."""
    lines = [
        "| server | rounds | msgs/s quiet | msgs/s attack (many) | held | msgs/s attack (one) "
        "| held | p99 ms quiet / many / one | RSS MB before / with attackers / peak / after (many) "
        "| tricklers admitted / refused / cut (many) | admitted / refused / cut (one) "
        "| churned (many) | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---|",
    ]
    for key in sorted(agg, key=lambda k: _rank(k[0])):
        a = agg[key]
        p99 = " / ".join(_f(a.get(f"{p}_p99_ms"), 1) for p in ("quiet", "many", "one"))
        rss = " / ".join(
            _f(a.get(f"many_{k}"), 1)
            for k in ("rss_before_mb", "rss_attack_mb", "rss_peak_mb", "rss_after_mb")
        )
        fate = {
            p: " / ".join(_f(a.get(f"{p}_{k}")) for k in ("admitted", "refused", "cut"))
            for p in ("many", "one")
        }
        quiet, many, one = (a.get(f"{p}_msgs_per_s") for p in ("quiet", "many", "one"))
        lines.append(
            f"| {a['server']} | {a['rounds']} | {_f(quiet)} "
            f"| {_f(many)} | {_ratio(many, quiet)} | {_f(one)} | {_ratio(one, quiet)} "
            f"| {p99} | {rss} | {fate['many']} | {fate['one']} | {_f(a.get('many_churned'))} "
            f"| {_checked(a)} |"
        )
    return "\n".join(lines) + "\n\n" + targets("flood", agg)


def targets(scenario: str, agg: dict) -> str:
    """The issue's targets for this scenario, met or missed, from the medians."""
    ref = agg.get((REFERENCE, 100)) or next(
        (a for (s, _c), a in agg.items() if s == REFERENCE), None
    )
    peer = agg.get((PEER, 100)) or next((a for (s, _c), a in agg.items() if s == PEER), None)
    out = []

    def line(ok: bool | None, text: str) -> None:
        mark = "met" if ok else ("MISSED" if ok is not None else "not measured")
        out.append(f"- target: {text}: **{mark}**")

    base = scenario.split("-")[0]
    if ref is None:
        return ""
    if base in ("throughput", "fanout") and peer is not None:
        want = 2.5 if base == "throughput" else 3.0
        r = ref.get("msgs_per_s", 0) / max(1e-9, peer.get("msgs_per_s", 0))
        line(r >= want, f"geosmtp ≥ {want}x aiosmtpd msgs/s (measured {r:.2f}x)")
    if base == "idle":
        kb = ref.get("pss_per_conn_kb")
        n = ref.get("connected", 0)
        line(
            _num(kb) and kb <= 8 and n >= 10000,
            f"≤ 8 KB per connection at 10,000 (measured {_f(kb, 1)} KB PSS at {_f(n)})",
        )
        p = ref.get("probe_max_ms")
        line(_num(p) and p < 100, f"fresh client served in < 100 ms (max {_f(p, 1)} ms)")
    if base == "large":
        g = ref.get("rss_growth_mb")
        line(_num(g) and g < 64, f"peak RSS growth < 64 MB for 20 x 25 MB (measured {_f(g, 1)} MB)")
    if base == "relay":
        pf = next((a for (s, _c), a in agg.items() if s == "postfix"), None)
        if "missing_all" in ref:
            lost = sum(ref["missing_all"]) + sum(ref.get("duplicates_all", []))
            line(lost == 0 and ref["ok"], f"geosmtp: no message lost or duplicated ({lost} were)")
        else:
            line(ref["ok"], "geosmtp: as many messages at the sink as acknowledged (counted)")
        if pf is not None:
            r = ref.get("delivery_per_s", 0) / max(1e-9, pf.get("delivery_per_s", 0))
            line(r >= 1, f"geosmtp delivery rate ≥ Postfix's (measured {r:.2f}x)")
        else:
            line(None, "geosmtp delivery rate ≥ Postfix's")
    if base == "pop3":
        dc = next((a for (s, _c), a in agg.items() if s == "dovecot"), None)
        ran = _num(ref.get("sessions")) and ref["sessions"] > 0
        line(
            ref["ok"] if ran else None,
            "geosmtp: every message retrieved byte-exact, nothing left behind"
            + ("" if ran else " (geosmtp did not run)"),
        )
        if dc is not None and ran:
            r = ref["sessions_per_s"] / max(1e-9, dc.get("sessions_per_s", 0))
            line(r >= 1, f"geosmtp sessions/s ≥ Dovecot's (measured {r:.2f}x)")
        else:
            line(None, "geosmtp sessions/s ≥ Dovecot's")
    if base == "slow":
        a, b = ref.get("msgs_per_s"), ref.get("baseline_msgs_per_s")
        held = a / b if _num(a) and _num(b) and b else float("nan")
        line(
            _num(held) and held >= 0.8,
            f"normal throughput within 20% with slow clients (held {held:.0%})",
        )
    if base == "flood":
        a, b = ref.get("many_msgs_per_s"), ref.get("quiet_msgs_per_s")
        held = a / b if _num(a) and _num(b) and b else float("nan")
        line(
            _num(held) and held >= 0.8,
            f"normal throughput within 20% under tricklers and droppers (held {held:.0%})",
        )
    out += _issue17(base, agg)
    out += _issue20(base, agg)
    return "\n".join(out) + ("\n" if out else "")


BEFORE = "geosmtp@b6216a9"  # the commit before the process model (issue 17)


def _issue17(base: str, agg: dict) -> list[str]:
    """Issue 17's targets (every core), where the run has the rows they compare."""
    out = []

    def at(server: str, level: int | None = None) -> dict | None:
        if level is not None:
            return agg.get((server, level))
        return next((a for (s, _c), a in agg.items() if s == server), None)

    def line(ok: bool, text: str) -> None:
        out.append(f"- issue 17: {text}: **{'met' if ok else 'MISSED'}**")

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        if a is None or b is None or not (_num(a.get(key)) and _num(b.get(key))) or not b[key]:
            return None
        return a[key] / b[key]

    geo = at(REFERENCE)
    if base in ("throughput", "fanout"):
        want = 1.6 if base == "throughput" else 1.8
        for peer in ("aiosmtpd", "postfix"):
            r = ratio(geo, at(peer), "msgs_per_s")
            if r is not None:
                line(r >= want, f"geosmtp ≥ {want}x {peer} msgs/s (measured {r:.2f}x)")
        r = ratio(at("geosmtp+w1"), at(BEFORE), "msgs_per_s")
        if r is not None:
            line(r >= 1, f"geosmtp+w1 no slower than {BEFORE} (measured {r:.2f}x)")
    if base == "pop3":
        r = ratio(geo, at("dovecot-perf"), "sessions_per_s")
        if r is not None:
            line(r >= 1, f"geosmtp sessions/s ≥ dovecot-perf's (measured {r:.2f}x)")
        p = geo.get("login_p99_ms") if geo else None
        if _num(p):
            line(p < 200, f"login p99 < 200 ms at {geo['clients']} sessions ({_f(p, 1)} ms)")
    if base == "relay":
        r = ratio(geo, at(BEFORE), "delivery_per_s")
        if r is not None:
            line(r >= 1.5, f"delivery rate ≥ 1.5x {BEFORE}'s (measured {r:.2f}x)")
    if base == "scaling":
        g, p = at(REFERENCE, 100), at(PEER, 100)
        r = ratio(g, p, "p99_ms")
        if r is not None:
            line(r <= 1, f"p99 at 100 sessions ≤ aiosmtpd's (measured {r:.2f}x)")
        g5 = at(REFERENCE, 5000)
        if g5 is not None and _num(g5.get("p99_ms")):
            line(g5["p99_ms"] < 1000, f"p99 < 1 s at 5,000 sessions ({_f(g5['p99_ms'])} ms)")
    if base == "idle":
        r = ratio(geo, at(BEFORE), "pss_per_conn_kb")
        if r is not None:
            line(r <= 1, f"memory per connection ≤ {BEFORE}'s (measured {r:.2f}x, PSS)")
    return out


def _issue20(base: str, agg: dict) -> list[str]:
    """Issue 20's relay targets, beside Postfix through the same next hop:
    delivered ≥ 1.5x Postfix's with geosmtp in one process, acceptance at
    least Postfix's; with a next hop 50 ms away, delivered ≥ Postfix's; CPU per
    delivered message reported beside Postfix's."""
    geo = next((a for (s, _c), a in agg.items() if s == REFERENCE), None)
    pf = next((a for (s, _c), a in agg.items() if s == "postfix"), None)
    if base != "relay" or geo is None or pf is None:
        return []
    out = []

    def ratio(key: str) -> float:
        a, b = geo.get(key), pf.get(key)
        return a / b if _num(a) and _num(b) and b else math.nan

    one = geo.get("server_workers") == 1
    delay = geo.get("sink_delay") or 0
    far = delay >= 0.05
    want = 1.0 if far else 1.5
    r = ratio("delivery_per_s")
    where = f"next hop {delay * 1000:g} ms away" if delay else "next hop on loopback"
    procs = "one process" if one else f"{_f(geo.get('server_workers'))} workers (target: 1)"
    met = _num(r) and r >= want and one and geo["ok"]
    out.append(
        f"- issue 20: delivered ≥ {want}x Postfix's, {where}, {procs}, nothing lost "
        f"(measured {r:.2f}x): **{'met' if met else 'MISSED'}**"
    )
    r = ratio("accept_per_s")
    out.append(
        f"- issue 20: acceptance while relaying ≥ Postfix's (measured {r:.2f}x): "
        f"**{'met' if _num(r) and r >= 1 else 'MISSED'}**"
    )
    out.append(
        f"- issue 20: CPU per delivered message: geosmtp {_f(geo.get('cpu_ms_per_msg'), 2)} ms, "
        f"Postfix {_f(pf.get('cpu_ms_per_msg'), 2)} ms ({ratio('cpu_ms_per_msg'):.2f}x): reported"
    )
    return out


def variant(meta: dict) -> str:
    """A relay run's variant, from its meta: `bench → sink +50 ms`."""
    hop = meta.get("sink", "sink")
    delay = meta.get("sink_delay") or 0
    if delay:
        hop += f" +{delay * 1000:g} ms"
    return f"{meta.get('client', 'bench')} → {hop}"


#: The combined relay table: (heading, agg key, digits).
COMBINED = [
    ("accepted msgs/s", "accept_per_s", 0),
    ("delivered msgs/s", "delivery_per_s", 0),
    ("CPU ms per msg", "cpu_ms_per_msg", 2),
    ("sink connections", "sink_connections", 0),
    ("msgs per connection", "msgs_per_connection", 1),
]


def combine(paths: list[Path], name: str, out: Path = RESULTS) -> tuple[Path, Path]:
    """Several relay runs (variants: next hop, its delay, the client) in one
    table and one plot: per variant, each server's rates and CPU per message,
    and geosmtp's ratios to Postfix."""
    runs = []
    for path in paths:
        data = json.loads(path.read_text())
        runs.append((variant(data["meta"]), path, aggregate(data["rows"])))
    head = "| variant | server | " + " | ".join(h for h, _k, _d in COMBINED)
    lines = [
        head + " | lost / duplicated | check | result |",
        "|---|---|" + "---:|" * 6 + "---|---|",
    ]
    for label, path, agg in runs:
        for key in sorted(agg, key=lambda k: _rank(k[0])):
            a = agg[key]
            cells = " | ".join(_f(a.get(k), d) for _h, k, d in COMBINED)
            if "missing_all" in a:
                lost = f"{sum(a['missing_all']):,} / {sum(a.get('duplicates_all', [])):,}"
            else:
                lost = "n/a (counted)"
            lines.append(
                f"| {label} | {a['server']} | {cells} | {lost} | {_checked(a)} "
                f"| [{path.stem}]({path.stem}.md) |"
            )
    lines.append("")
    for label, _path, agg in runs:
        ratios = _versus(agg, [(h, k) for h, k, _d in COMBINED[:3]])
        lines += [f"- {label}: " + r.removeprefix("- ") for r in ratios]
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / f"{name}.md"
    md_path.write_text(f"## {name}\n\n" + md)
    png_path = out / f"{name}.png"
    _combined_plot(runs, name, png_path)
    return md_path, png_path


def _combined_plot(runs: list, name: str, path: Path) -> None:
    """Delivered msgs/s and CPU ms per message, a group of bars per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = _order(sorted({s for _l, _p, agg in runs for s, _c in agg}))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("delivery_per_s", "delivered msgs/s"),
        ("cpu_ms_per_msg", "server CPU ms per delivered message"),
        ("msgs_per_connection", "messages per connection to the next hop"),
    ]
    width = 0.8 / max(1, len(servers))
    for ax, (field, ylabel) in zip(axes, panels, strict=True):
        for i, server in enumerate(servers):
            vals = []
            for _label, _path, agg in runs:
                a = next((a for (s, _c), a in agg.items() if s == server), {})
                vals.append(a.get(field, math.nan))
            xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(runs))]
            ax.bar(xs, vals, width=width, label=server)
        ax.set_xticks(range(len(runs)), [label for label, _p, _a in runs], fontsize=8)
        ax.set_ylabel(ylabel)
    axes[2].set_yscale("log")  # one message per connection beside hundreds
    axes[0].legend()
    fig.suptitle(f"geosmtp bench: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rebuild(json_path: Path) -> tuple[Path, Path, Path]:
    """Write the table and the plot again from a saved result file."""
    data = json.loads(json_path.read_text())
    meta = data["meta"]
    scenario = meta.get("scenario") or data["rows"][0]["scenario"].split("-")[0]
    return save(scenario, json_path.stem, data["rows"], meta, json_path.parent)


def save(
    scenario: str, name: str, rows: list[dict], meta: dict, out: Path = RESULTS
) -> tuple[Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = table(scenario, rows)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    header = (
        f"## {name}\n\n"
        f"{meta.get('when', '')} · command: `{meta.get('command', '')}`\n\n"
        f"machine: {meta.get('machine', {})}\n\n"
        f"geosmtp commit: {meta.get('geosmtp_commit', '?')}\n\n"
    )
    md_path = out / f"{name}.md"
    md_path.write_text(header + md)
    png_path = out / f"{name}.png"
    plot(scenario, name, rows, png_path)
    return json_path, md_path, png_path


def plot(scenario: str, name: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    servers = _order(sorted({s for s, _ in agg}))
    base = scenario
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if base == "idle":
        _bars(ax1, agg, servers, "pss_per_conn_kb", "server PSS per idle connection (KB)")
        _bars(ax2, agg, servers, "probe_max_ms", "fresh client, worst of the probes (ms)")
    elif base == "slow":
        _bars(ax1, agg, servers, "baseline_msgs_per_s", "msgs/s", label="alone", shift=-0.2)
        _bars(
            ax1, agg, servers, "msgs_per_s", "normal clients' msgs/s", label="with slow", shift=0.2
        )
        _bars(ax2, agg, servers, "baseline_p99_ms", "ms", label="alone", shift=-0.2)
        _bars(ax2, agg, servers, "p99_ms", "normal clients' p99 (ms)", label="with slow", shift=0.2)
        ax1.legend()
        ax2.legend()
    elif base == "flood":
        for i, phase in enumerate(("quiet", "many", "one")):
            label = {"quiet": "quiet", "many": "attack, 750 addresses", "one": "attack, 1 address"}
            shift = (i - 1) * 0.27
            _bars(
                ax1,
                agg,
                servers,
                f"{phase}_msgs_per_s",
                "normal clients' msgs/s (median)",
                label=label[phase],
                shift=shift,
                width=0.27,
            )
            _bars(
                ax2,
                agg,
                servers,
                f"{phase}_p99_ms",
                "normal clients' p99 latency (ms)",
                label=label[phase],
                shift=shift,
                width=0.27,
            )
        ax1.legend()
        ax2.legend()
    elif base == "relay":
        _bars(ax1, agg, servers, "accept_per_s", "msgs/s", label="accepted", shift=-0.2)
        _bars(ax1, agg, servers, "delivery_per_s", "msgs/s (median)", label="delivered", shift=0.2)
        ax1.legend()
        _bars(ax2, agg, servers, "cpu_ms_per_msg", "server CPU ms per delivered message")
    elif base == "pop3":
        _bars(ax1, agg, servers, "sessions_per_s", "POP3 sessions/s (median)")
        _bars(ax2, agg, servers, "pss_peak_mb", "server peak PSS, all its processes (MB)")
    elif base == "crash":
        _crash_plot(ax1, ax2, rows)
    elif base == "large":
        _bars(ax1, agg, servers, "mb_per_s", "MB/s")
        _bars(ax2, agg, servers, "rss_growth_mb", "server peak RSS growth (MB)")
    else:
        levels = sorted({c for _s, c in agg})
        if len(levels) > 1:
            for s in servers:
                xs = [c for c in levels if (s, c) in agg]
                ax1.plot(xs, [agg[(s, c)].get("msgs_per_s", math.nan) for c in xs], "o-", label=s)
                ax2.plot(xs, [agg[(s, c)].get("p99_ms", math.nan) for c in xs], "o-", label=s)
            for ax in (ax1, ax2):
                ax.set_xscale("log")
                ax.set_xlabel("concurrent sessions")
                ax.legend()
            ax1.set_yscale("log")
            ax2.set_yscale("log")
            ax1.set_ylabel("messages/s (median)")
            ax2.set_ylabel("p99 transaction latency, ms (median)")
        else:
            _bars(ax1, agg, servers, "msgs_per_s", "messages/s (median)")
            _bars(ax2, agg, servers, "p99_ms", "p99 transaction latency, ms (median)")
    fig.suptitle(f"geosmtp bench: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _crash_plot(ax1, ax2, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    """Acknowledged and found deliveries by victim; each trial's acked messages."""
    by = rows[0].get("by_victim", {}) if rows else {}
    kinds = [k for k, v in by.items() if v.get("trials")]
    xs = range(len(kinds))
    ax1.bar([x - 0.2 for x in xs], [by[k]["acked_local"] for k in kinds], 0.4, label="acked")
    ax1.bar([x + 0.2 for x in xs], [by[k]["found"] for k in kinds], 0.4, label="found once")
    ax1.set_xticks(list(xs), kinds)
    ax1.set_ylabel("local deliveries (sum over trials)")
    ax1.legend()
    lines = rows[0].get("trial_lines", []) if rows else []
    acked = [int(line.split("acked ")[1].split()[0]) for line in lines]
    ax2.plot(range(1, len(acked) + 1), acked, "o", markersize=3)
    ax2.set_xlabel("trial")
    ax2.set_ylabel("messages acknowledged before the kill")


def _bars(ax, agg, servers, field, ylabel, label=None, shift=0.0, width=None):  # type: ignore[no-untyped-def]
    vals, lows, highs = [], [], []
    for s in servers:
        a = next((a for (srv, _c), a in agg.items() if srv == s), {})
        v = a.get(field, math.nan)
        every = a.get(field + "_all", [v])
        vals.append(v)
        lows.append(v - min(every) if _num(v) else 0)
        highs.append(max(every) - v if _num(v) else 0)
    xs = [i + shift for i in range(len(servers))]
    width = width or (0.4 if shift else 0.6)
    ax.bar(xs, vals, width=width, yerr=[lows, highs], capsize=4, label=label)
    for x, v in zip(xs, vals, strict=True):
        if not _num(v):  # e.g. a server that could not start
            ax.annotate("no result", (x, 0), ha="center", va="bottom", color="gray")
    ax.set_xticks(range(len(servers)), servers)
    ax.set_ylabel(ylabel)
