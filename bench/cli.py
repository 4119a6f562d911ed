"""`python -m bench`: run a scenario, compare servers, profile geosmtp.

    python -m bench list
    python -m bench run SCENARIO [--server geosmtp] [--quick]
    python -m bench compare SCENARIO [--rounds 3] [--servers geosmtp,aiosmtpd,...]
    python -m bench profile [SCENARIO] [--tool py-spy|cprofile]
    python -m bench selfcheck

Exit status: 0 when every run delivered exactly what was acknowledged, with no
errors; 1 when a run failed its Maildir check or saw errors; 2 on usage errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import signal
import sys
import time

from . import report
from .scenarios import SCENARIOS, Options
from .servers import SERVERS, cleanup_all, machine, server_class, source_version

POSTFIX_SCENARIOS = {"throughput", "fanout", "scaling", "large", "relay"}
RELAY_SERVERS = {"geosmtp", "postfix"}  # the relay scenario: servers with an outbound queue
POP3_SERVERS = {"geosmtp", "dovecot", "dovecot-perf"}  # the dovecots serve nothing else
DEFAULT_SERVERS = ["geosmtp", "aiosmtpd", "postfix", "smtp-sink"]
DEFAULT_POP3_SERVERS = ["geosmtp", "dovecot"]
REQUIRED = {"geosmtp", "geosmtp+cat", "aiosmtpd", "dovecot"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="scaled-down counts: a smoke run")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument(
        "--no-pipelining", dest="pipelining", action="store_false", help="one command per RTT"
    )
    p.add_argument(
        "--client",
        choices=["bench", "smtp-source"],
        default="bench",
        help="drive the load with this client (smtp-source: throughput, fanout, scaling, relay)",
    )
    p.add_argument(
        "--server-workers",
        type=int,
        help="relay: geosmtp's `workers:` (default 1: one serving process, issue 20's target)",
    )
    p.add_argument(
        "--sink-delay",
        type=float,
        default=0.0,
        help="relay: seconds the sink waits before each reply (a next hop that far away)",
    )
    p.add_argument(
        "--sink",
        choices=["sink", "smtp-sink"],
        default="sink",
        help="relay: the next hop, bench/sink.py (default: checks every id) or Postfix's "
        "smtp-sink (counts messages)",
    )
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="servers skip fsync")
    p.add_argument("--messages", type=int, help="override the message count")
    p.add_argument("--clients", type=int, help="override the session count")
    p.add_argument("--size", type=int, help="override the message size (octets)")
    p.add_argument("--time-limit", type=float, default=600, help="seconds per run (default 600)")
    p.add_argument("--keep", action="store_true", help="keep servers' temp dirs")
    p.add_argument(
        "--mailboxes",
        type=int,
        help="spread recipients over N mailboxes (100); pop3: N full mailboxes (1,000)",
    )
    p.add_argument(
        "--hash",
        choices=["passwd", "cheap"],
        default=None,
        help="pop3: the users' argon2id hashes: as `geosmtp passwd` makes them (default), "
        "or cheap ones (t=1, 1 MiB) to measure the data path alone; soak: cheap by default",
    )
    p.add_argument("--trials", type=int, help="crash: kill -9 trials (default 100)")
    p.add_argument("--tag", default="", help="suffix for the result files")
    p.add_argument(
        "--duration", type=float, help="soak: seconds of traffic (default 1800; --quick 120)"
    )


SMTP_SOURCE_SCENARIOS = ("throughput", "fanout", "scaling", "relay")


def _relay_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the relay-only options, if anything."""
    if not hasattr(args, "sink"):
        return None
    relay_only = args.sink != "sink" or args.sink_delay or args.server_workers is not None
    if relay_only and args.scenario != "relay":
        return "--sink, --sink-delay and --server-workers: the relay scenario only"
    if args.sink_delay < 0:
        return "--sink-delay: seconds, 0 or more"
    if args.sink == "smtp-sink" and args.sink_delay:
        return "--sink-delay: bench/sink.py only (smtp-sink delays by whole seconds, DATA only)"
    if args.server_workers is not None and args.server_workers < 1:
        return "--server-workers: 1 or more"
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="scenarios and servers")
    run = sub.add_parser("run", help="one scenario against one server")
    _add_common(run)
    run.add_argument("--server", choices=sorted(SERVERS), default="geosmtp")
    run.add_argument("--rounds", type=int, default=1)
    cmp_ = sub.add_parser("compare", help="the same scenario against each server, alternating")
    _add_common(cmp_)
    cmp_.add_argument("--rounds", type=int, default=3)
    cmp_.add_argument(
        "--servers",
        help=f"comma-separated (default {','.join(DEFAULT_SERVERS)}; pop3: "
        f"{','.join(DEFAULT_POP3_SERVERS)}); postfix and smtp-sink are skipped when not installed",
    )
    prof = sub.add_parser("profile", help="profile geosmtp under a scenario")
    _add_common(prof)
    prof.add_argument("--tool", choices=["py-spy", "cprofile"], default="py-spy")
    prof.add_argument("--format", choices=["raw", "flamegraph", "speedscope"], default="raw")
    prof.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    prof.add_argument(
        "--idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="relay: sample waiting threads too (wall time; --no-idle: CPU samples only)",
    )
    prof.set_defaults(scenario="throughput")
    sub.add_parser("selfcheck", help="check the bench's own message builder and verifier")
    rep = sub.add_parser("report", help="rebuild a result's table and plot from its JSON")
    rep.add_argument("json", nargs="+")
    rep.add_argument(
        "--combine",
        metavar="NAME",
        help="relay: the runs' variants in one table and plot, results/NAME.md and .png",
    )
    return p


def _options(args: argparse.Namespace) -> Options:
    return Options(
        quick=args.quick,
        workers=args.workers,
        pipelining=args.pipelining,
        client=args.client,
        fsync=args.fsync,
        time_limit=args.time_limit,
        messages=args.messages,
        clients=args.clients,
        size=args.size,
        keep=args.keep,
        mailboxes=args.mailboxes,
        hash=args.hash,
        trials=args.trials,
        duration=args.duration,
        server_workers=args.server_workers,
        sink_delay=args.sink_delay,
        sink=args.sink,
    )


def _meta(args: argparse.Namespace, servers: list[str]) -> dict:
    return {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "geosmtp_commit": source_version(),
        "scenario": args.scenario,
        "servers": servers,
        "pipelining": args.pipelining,
        "workers": args.workers,
        "fsync": args.fsync,
        "quick": args.quick,
        "client": args.client,
        **({"hash": args.hash} if args.scenario == "pop3" else {}),
        **(_relay_meta(args) if args.scenario == "relay" else {}),
    }


def _relay_meta(args: argparse.Namespace) -> dict:
    """The relay's own settings: geosmtp's processes and the next hop."""
    return {
        "server_workers": args.server_workers or 1,
        "sink": args.sink,
        "sink_delay": args.sink_delay,
    }


def _name(args: argparse.Namespace, prefix: str = "") -> str:
    parts = [prefix + args.scenario]
    if args.quick:
        parts.append("quick")
    if args.client != "bench":
        parts.append(args.client)
    if args.scenario == "relay":
        if args.sink != "sink":
            parts.append(args.sink)
        if args.sink_delay:
            parts.append(f"delay{args.sink_delay * 1000:g}ms")
        if args.server_workers not in (None, 1):
            parts.append(f"w{args.server_workers}")
    if args.scenario == "pop3" and args.hash != "passwd":
        parts.append(f"{args.hash}-hash")
    if not args.pipelining:
        parts.append("nopipe")
    if args.tag:
        parts.append(args.tag)
    return "-".join(parts)


def _run_rounds(args: argparse.Namespace, servers: list[str]) -> tuple[list[dict], bool]:
    opts = _options(args)
    fn = SCENARIOS[args.scenario]
    rows: list[dict] = []
    ok = True
    classes = {name: server_class(name) for name in servers}
    for rnd in range(1, args.rounds + 1):
        order = servers if rnd % 2 else list(reversed(servers))
        for name in order:
            cls = classes[name]
            print(f"== {args.scenario}: round {rnd}/{args.rounds}, {name}", file=sys.stderr)
            t0 = time.monotonic()
            try:
                got = fn(cls, opts)
            except Exception as exc:  # an optional server that cannot run: say so, go on
                if name in REQUIRED:
                    raise
                print(f"   {name} could not run: {exc}", file=sys.stderr)
                continue
            for r in got:
                r["round"] = rnd
                state = "ok" if r.get("ok") else "FAILED"
                if r.get("scenario") == "pop3":
                    print(
                        f"   {name}: {r.get('sessions_per_s', 0):,.1f} sessions/s, "
                        f"{r.get('mb_per_s', 0):,.1f} MB/s · {r.get('verify')} · {state} "
                        f"({time.monotonic() - t0:.0f}s)",
                        file=sys.stderr,
                    )
                else:
                    if "delivery_per_s" in r:
                        print(
                            f"   {name}: accepted {r['accept_per_s']:,.0f} msgs/s, delivered "
                            f"{r['delivery_per_s']:,.0f} msgs/s ({r['delivery_s']:.1f} s)",
                            file=sys.stderr,
                        )
                    print(
                        f"   {name} c={r.get('clients')}: {r.get('msgs_per_s', 0):,.0f} msgs/s "
                        f"p99 {r.get('p99_ms', float('nan')):.1f} ms{_fairness(r)} · "
                        f"{r.get('verify')} · "
                        f"{state} ({time.monotonic() - t0:.0f}s)",
                        file=sys.stderr,
                    )
                if not r.get("ok"):
                    for e in r.get("error_examples", [])[:5] + r.get("verify_examples", [])[:5]:
                        print(f"     {e}", file=sys.stderr)
                    if name in REQUIRED:
                        ok = False
            rows.extend(got)
    return rows, ok


def _fairness(row: dict) -> str:
    """`, dot p99 .. ms, slowest session 3 of 200 msgs (mean)`, when the client timed them."""
    out = ""
    if "dot_p99_ms" in row:
        out += f", end of DATA → 250 p99 {row['dot_p99_ms']:.1f} ms"
    if "session_min_msgs" in row:
        out += (
            f", slowest session {row['session_min_msgs']} msgs "
            f"(mean {row['session_mean_msgs']:.1f})"
        )
    return out


def _servers_for(args: argparse.Namespace, names: list[str]) -> list[str]:
    out = []
    for n in names:
        base, at, _ = n.partition("@")
        if at and base.startswith("geosmtp") and base in SERVERS:  # an older geosmtp
            out.append(n)
            continue
        if n not in SERVERS:
            known = ", ".join(SERVERS)
            raise SystemExit(f"unknown server {n!r}; known: {known}, geosmtp[+variant]@REV")
        geosmtp = n.startswith("geosmtp")  # its variants have a queue and POP3 too
        if args.scenario == "soak" and not geosmtp:
            print(f"({n}: not run for soak: it reads geosmtp's admin API)", file=sys.stderr)
            continue
        if args.scenario == "relay" and n not in RELAY_SERVERS and not geosmtp:
            print(f"({n}: not run for relay: it has no outbound queue)", file=sys.stderr)
            continue
        if args.scenario == "pop3" and n not in POP3_SERVERS and not geosmtp:
            print(f"({n}: not run for pop3: it serves no POP3)", file=sys.stderr)
            continue
        if args.scenario != "pop3" and n in POP3_SERVERS - {"geosmtp"}:
            print(f"({n}: not run for {args.scenario}: it serves POP3 only)", file=sys.stderr)
            continue
        if not SERVERS[n].available():
            print(f"({n} is not installed here: skipped)", file=sys.stderr)
            continue
        if n == "postfix" and args.scenario not in POSTFIX_SCENARIOS:
            print(
                f"(postfix: not run for {args.scenario}: one process per session)", file=sys.stderr
            )
            continue
        if n == "smtp-sink" and args.scenario in ("idle", "slow", "flood"):
            # It serves at most 512 sessions at once: the 1,000s here would wait in vain.
            print(
                f"(smtp-sink: not run for {args.scenario}: 512 sessions at most)", file=sys.stderr
            )
            continue
        out.append(n)
    return out


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM (and SIGINT, which a shell ignores in background jobs): unwind, so
    every server started is stopped and its temp dir removed on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "hash", "") is None:  # soak: 64 MiB per login would hide a leak in RSS
        args.hash = "cheap" if args.scenario == "soak" else "passwd"
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.cmd == "list":
        for name, fn in SCENARIOS.items():
            print(f"{name:12} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        for name, cls in SERVERS.items():
            print(f"server {name:10} {'installed' if cls.available() else 'not installed'}")
        return 0
    if args.cmd == "report":
        from pathlib import Path

        if args.combine:
            md, png = report.combine([Path(j) for j in args.json], args.combine)
            print(md.read_text())
            print(f"written: {md}, {png}")
            return 0
        for j in args.json:
            _json, md, png = report.rebuild(Path(j))
            print(md.read_text())
            print(f"written: {md}, {png}")
        return 0
    if args.cmd == "selfcheck":
        from .selfcheck import main as selfcheck

        return selfcheck(lambda argv: _relay_usage(_parser().parse_args(argv)))
    if args.client == "smtp-source" and args.scenario not in SMTP_SOURCE_SCENARIOS:
        print("--client smtp-source: only throughput, fanout, scaling and relay", file=sys.stderr)
        return 2
    problem = _relay_usage(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.cmd == "profile" and args.scenario == "pop3":
        print("profile: SMTP scenarios only", file=sys.stderr)
        return 2
    if args.cmd == "profile":
        from .profile import profile

        try:
            return profile(args, _options(args))
        finally:
            cleanup_all()
    if args.cmd == "run":
        servers = [args.server]
        prefix = f"run-{args.server}-"
    else:
        default = DEFAULT_POP3_SERVERS if args.scenario == "pop3" else DEFAULT_SERVERS
        names = args.servers.split(",") if args.servers else default
        servers = _servers_for(args, [s.strip() for s in names if s.strip()])
        prefix = ""
    try:
        rows, ok = _run_rounds(args, servers)
    finally:
        cleanup_all()
    name = _name(args, prefix)
    if args.scenario == "soak":  # a time series: its own table and plot
        from . import soak

        json_path, md_path, png_path = soak.save(name, rows, sys.argv[1:])
        print(md_path.read_text())
        print(f"written: {json_path}, {md_path}, {png_path}")
        return 0 if ok else 1
    json_path, md_path, png_path = report.save(args.scenario, name, rows, _meta(args, servers))
    print()
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}, {png_path}")
    return 0 if ok else 1
