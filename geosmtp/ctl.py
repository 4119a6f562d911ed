"""`geosmtp ctl`: the management API's client.

It reads the admin address and token from the same config file the server
uses (`-c`, default ./config.yaml). Exit status 0 on success, 1 when the
server cannot be reached or refuses the request, 2 on a usage error. Every
error is one line on stderr, `geosmtp ctl: ...`, never a traceback.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .printable import escape

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    pass


def one_line(text: str) -> str:
    """A message as one printable line: line breaks folded, anything else that
    is not printable escaped."""
    return escape(" ".join(str(text).split()))


class Client:
    def __init__(self, url: str, token: str, timeout: float = 10) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                kind = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise CtlError("the server refused the token (401 Unauthorized)") from None
            try:
                message = json.loads(exc.read())["error"]
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
                message = exc.reason
            raise CtlError(f"{exc.code}: {message}") from None
        except http.client.HTTPException as exc:
            # Something answered, but not in HTTP: an SMTP banner, a TLS port, noise.
            got = str(exc).strip()
            detail = f"{type(exc).__name__}: {got!r}" if got else type(exc).__name__
            raise CtlError(
                f"cannot reach the admin API at {self.url}: not an HTTP reply ({detail}); "
                "is that the admin listener's address and port?"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(
                f"cannot reach the admin API at {self.url}: {reason} "
                "(is geosmtp running, with admin.enabled?)"
            ) from None
        if not kind.startswith("application/json"):
            return raw.decode(errors="replace")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise CtlError(f"the admin API at {self.url} sent invalid JSON: {exc}") from None


def _client(args: argparse.Namespace) -> Client:
    from . import config as cfg

    if args.url and args.token:  # the config is not needed (and may be the broken one)
        return Client(args.url, args.token)
    path = args.config or ("config.yaml" if Path("config.yaml").exists() else None)
    config = cfg.load(path) if path else cfg.from_mapping({})
    admin = config.admin
    token = args.token or _token(admin)
    host = f"[{admin.address}]" if ":" in admin.address else admin.address
    return Client(args.url or f"http://{host}:{admin.port}", token)


def _token(admin: Any) -> str:
    """The write token; when it cannot be had (its file is missing or not
    readable by this user) but a read token can, that one: the read commands
    work, the others get the server's 403."""
    from .admin.server import admin_read_token, admin_token
    from .config import ConfigError

    try:
        return admin_token(admin, create=False)
    except ConfigError as exc:
        try:
            read_token = admin_read_token(admin, create=False)
        except ConfigError:
            read_token = None
        if read_token is None:
            raise exc from None
        return read_token


def _nested(key: str, value: Any) -> dict:
    patch: Any = value
    for part in reversed(key.split(".")):
        patch = {part: patch}
    return patch


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_stats(stats: dict, previous: dict | None = None, interval: float = 1.0) -> str:
    c, m, b = stats["connections"], stats["messages"], stats["bytes"]
    lines = [
        f"geosmtp {stats['version']}   up {stats['uptime_seconds']:.0f} s   "
        f"{stats['process']['workers']} workers as {stats['process']['user']} "
        f"(uid {stats['process']['uid']})",
        f"connections  open {c['current']:>8}   total {c['total']:>10}   refused {c['refused']:>8}",
        f"messages     accepted {m['accepted']:>6}   rejected {m['rejected']:>7}"
        f"   deliveries {m['recipients']:>8}",
        f"traffic      in {_human_bytes(b['received']):>12}   out {_human_bytes(b['sent']):>12}",
    ]
    if previous is not None:
        pm, pc = previous["messages"], previous["connections"]
        # The time the server saw pass: the interval plus the requests' own time.
        elapsed = stats["uptime_seconds"] - previous["uptime_seconds"]
        elapsed = elapsed if elapsed > 0 else interval
        rate = (m["accepted"] - pm["accepted"]) / elapsed
        conn_rate = (c["total"] - pc["total"]) / elapsed
        lines.append(f"rates        {rate:8.1f} msgs/s   {conn_rate:8.1f} connections/s")
    commands = stats["metrics"].get("geosmtp_commands_total", {})
    if commands:
        top = sorted(commands.items(), key=lambda kv: -kv[1])[:8]
        lines.append("commands     " + "  ".join(f"{k.split('=', 1)[1]} {v:.0f}" for k, v in top))
    return "\n".join(lines)


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(client.request("GET", "/api/v1/stats"), indent=2))
        return EXIT_OK
    if not args.watch:
        print(format_stats(client.request("GET", "/api/v1/stats")))
        return EXIT_OK
    previous = None
    shown = 0
    try:
        while args.count is None or shown < args.count:
            stats = client.request("GET", "/api/v1/stats")
            screen = format_stats(stats, previous, args.interval)
            sessions = client.request("GET", "/api/v1/sessions")
            screen += f"\n\n{'ID':>8}  {'PEER':<24} {'STATE':<10} {'AGE':>8}  USER"
            for s in sessions["sessions"][: args.rows]:
                screen += (
                    f"\n{s['id']:>8}  {escape(s['peer']) + ':' + str(s['port']):<24} "
                    f"{s['state']:<10} {s['age_seconds']:>7.1f}s  {escape(s['user'] or '')}"
                )
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")  # a live view: redraw in place
            print(screen, flush=True)
            if not sys.stdout.isatty():
                print("", flush=True)
            previous = stats
            shown += 1
            if args.count is None or shown < args.count:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_config(client: Client, args: argparse.Namespace) -> int:
    if args.action == "get":
        config = client.request("GET", "/api/v1/config")
        if args.key:
            from .config import lookup

            try:
                config = lookup(config, args.key)
            except KeyError:
                raise CtlError(f"{args.key}: no such key") from None
        print(
            yaml.safe_dump(config, sort_keys=False).rstrip()
            if isinstance(config, dict | list)
            else json.dumps(config)
        )
        return EXIT_OK
    if args.key is None or args.value is None:
        print("geosmtp ctl: usage: geosmtp ctl config set KEY VALUE", file=sys.stderr)
        return EXIT_USAGE
    value = yaml.safe_load(args.value)  # "100" -> 100, "true" -> True, "[a, b]" -> list
    result = client.request("PATCH", "/api/v1/config", _nested(args.key, value))
    changed = result["changed"]
    print(f"changed: {', '.join(changed)}" if changed else "unchanged")
    return EXIT_OK


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    result = client.request("POST", "/api/v1/reload")
    print(f"reloaded; changed: {', '.join(result['changed']) or 'nothing'}")
    if result["restart_needed"]:
        print(f"needs a restart to take effect: {', '.join(result['restart_needed'])}")
    return EXIT_OK


def cmd_sessions(client: Client, args: argparse.Namespace) -> int:
    result = client.request("GET", "/api/v1/sessions")
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(
        f"{'ID':>8}  {'PEER':<24} {'LISTENER':<28} {'STATE':<10} {'AGE':>8}  {'IN':>8} "
        f"{'OUT':>8}  USER"
    )
    for s in result["sessions"]:
        # What a client chose (its address, its login) is escaped as the logs do.
        print(
            f"{s['id']:>8}  {escape(s['peer']) + ':' + str(s['port']):<24} "
            f"{escape(s['listener']):<28} {s['state']:<10} {s['age_seconds']:>7.1f}s  "
            f"{s['bytes_in']:>8} {s['bytes_out']:>8}  {escape(s['user'] or '')}"
        )
    print(f"{result['count']} open")
    return EXIT_OK


def cmd_runtime(client: Client, args: argparse.Namespace) -> int:
    result = client.request("GET", "/api/v1/runtime")
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(f"{'WORKER':>8} {'SESSIONS':>9} {'GREENLETS':>10} {'FDS':>6} {'RSS':>10}")
    for w in result["workers"]:
        print(
            f"{w['pid']:>8} {w['sessions']:>9} {w['greenlets']:>10} {w['descriptors']:>6} "
            f"{_human_bytes(w['rss_bytes']):>10}"
        )
    return EXIT_OK


def cmd_kick(client: Client, args: argparse.Namespace) -> int:
    client.request("DELETE", f"/api/v1/sessions/{args.id}")
    print(f"session {args.id} closed")
    return EXIT_OK


def cmd_filters(client: Client, args: argparse.Namespace) -> int:
    result = client.request("GET", "/api/v1/filters")
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(
        f"{'NAME':<20} {'KIND':<8} {'ENABLED':<8} {'ROLES':<24} {'MAIL':<9} "
        f"{'ON_FAILURE':<10} {'RUNS':>8} {'REFUSED':>8} {'FAILED':>7}"
    )
    for f in result["filters"]:
        runs = f["runs"]
        print(
            f"{f['name']:<20} {f['kind']:<8} {'yes' if f['enabled'] else 'no':<8} "
            f"{','.join(f['roles']) if f['roles'] is not None else 'all':<24} {f['mail']:<9} "
            f"{f['on_failure']:<10} {sum(runs.values()):>8} "
            f"{runs.get('tempfail', 0) + runs.get('reject', 0):>8} "
            f"{sum(f['failures'].values()):>7}"
        )
    c = result["concurrency"]
    print(
        f"{result['count']} filters; {c['running']} of {c['limit']} slots in use, "
        f"{c['waiting']} waiting"
    )
    return EXIT_OK


def cmd_filter(client: Client, args: argparse.Namespace) -> int:
    name = urllib.parse.quote(args.name, safe="")
    if args.action == "show":
        print(json.dumps(client.request("GET", f"/api/v1/filters/{name}"), indent=2))
        return EXIT_OK
    enabled = args.action == "enable"
    result = client.request("PATCH", f"/api/v1/filters/{name}", {"enabled": enabled})
    state = "enabled" if enabled else "disabled"
    if result["changed"]:
        print(f"filter {result['name']} {state}")
    else:
        print(f"filter {result['name']} was already {state}")
    return EXIT_OK


def add_client_options(p: argparse.ArgumentParser) -> None:
    """-c, --url, --token: where the admin API is and its token (`ctl`, `queue`)."""
    p.add_argument("-c", "--config", metavar="FILE", help="the server's config (./config.yaml)")
    p.add_argument("--url", help="admin API base URL (default: from the config)")
    p.add_argument(
        "--token",
        help="bearer token (default: admin.token / admin.token_file, else the read token)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geosmtp ctl", description="Manage a running geosmtp.")
    add_client_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="counters; --watch for a live view")
    s.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    s.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    s.add_argument("--rows", type=int, default=15, help="with --watch: sessions shown")
    s.add_argument("--json", action="store_true", help="the raw JSON")
    s.set_defaults(func=cmd_stats)
    c = sub.add_parser("config", help="config get [KEY] | config set KEY VALUE")
    c.add_argument("action", choices=["get", "set"])
    c.add_argument("key", nargs="?")
    c.add_argument("value", nargs="?")
    c.set_defaults(func=cmd_config)
    r = sub.add_parser("reload", help="re-read the config file")
    r.set_defaults(func=cmd_reload)
    ss = sub.add_parser("sessions", help="open sessions")
    ss.add_argument("--json", action="store_true")
    ss.set_defaults(func=cmd_sessions)
    rt = sub.add_parser("runtime", help="every worker's greenlets, descriptors and memory")
    rt.add_argument("--json", action="store_true")
    rt.set_defaults(func=cmd_runtime)
    k = sub.add_parser("kick", help="close a session (SMTP: 421, POP3: -ERR)")
    k.add_argument("id")
    k.set_defaults(func=cmd_kick)
    fs = sub.add_parser("filters", help="the filter stages, their state and counts")
    fs.add_argument("--json", action="store_true")
    fs.set_defaults(func=cmd_filters)
    f = sub.add_parser("filter", help="filter enable NAME | filter disable NAME | filter show NAME")
    f.add_argument("action", choices=["enable", "disable", "show"])
    f.add_argument("name")
    f.set_defaults(func=cmd_filter)
    return p


def main(argv: list[str]) -> int:
    return run(_parser().parse_args(argv), "geosmtp ctl")


def run(args: argparse.Namespace, prog: str) -> int:
    """Call `args.func(client, args)`; errors as one line, `PROG: ...`, and the exit status."""
    from .config import ConfigError

    client = None
    try:
        client = _client(args)
        return args.func(client, args)
    except ConfigError as exc:
        print(f"{prog}: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"{prog}: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        # A reply of the wrong shape: not this version's API, or not the API at all.
        where = client.url if client is not None else "the server"
        print(
            f"{prog}: the admin API at {where} sent a reply {prog} does not understand "
            f"({one_line(f'{type(exc).__name__}: {exc}')})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
