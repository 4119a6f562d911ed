"""`geosmtp queue`: the outbound queue of a running server, through its management API.

    geosmtp queue [-c FILE] [--url URL] [--token TOKEN] list|show ID|flush [ID]|
                  delete ID|hold ID|release ID

The admin address and token come from the config, as for `geosmtp ctl` (its
`Client` and options). Exit status 0 done, 1 the server cannot be reached or
refused the request (an unknown id: `404`), 2 a usage or config error; every
error one line on stderr, `geosmtp queue: ...`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from .ctl import EXIT_OK, Client, _human_bytes, add_client_options, run
from .printable import escape

PROG = "geosmtp queue"


def human_age(seconds: float) -> str:
    """12s, 3m05s, 2h07m, 4d03h: short enough for a table column."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _state(entry: dict) -> str:
    if entry.get("in_flight"):
        return "sending"
    return "held" if entry["held"] else "queued"


def _rcpt_line(r: dict) -> str:
    """bob@x.test  pending, 2 attempts, next 2026-12-01T13:00:00Z: 451 4.3.0 later"""
    parts = [r["state"]]
    if r["attempts"]:
        parts.append(f"{r['attempts']} attempt{'s' if r['attempts'] != 1 else ''}")
    if r.get("next_attempt"):
        parts.append(f"next {r['next_attempt']}")
    text = f"{escape(r['address'])}  {', '.join(parts)}"
    if r.get("last_error"):
        text += f": {escape(r['last_error'])}"
    return text


def _quarantine_note(result: dict) -> str:
    """A line about entries in quarantine/, if there are any (an operator looks at them)."""
    n = result.get("quarantined") or 0
    if not n:
        return ""
    return (
        f"\n{n} unusable entr{'ies' if n != 1 else 'y'} in the queue folder's quarantine/ "
        "(see the server log)"
    )


def format_list(result: dict) -> str:
    entries = result["entries"]
    if not entries:
        return "the queue is empty" + _quarantine_note(result)
    rows = [("ID", "AGE", "SIZE", "STATE", "SENDER", "RECIPIENTS")]
    for e in entries:
        rcpts = e["recipients"] or [{"address": "", "state": "", "attempts": 0}]
        rows.append(
            (
                e["id"],
                human_age(e["age_seconds"]),
                _human_bytes(e["size"]),
                _state(e),
                f"<{escape(e['sender'])}>",
                _rcpt_line(rcpts[0]),
            )
        )
        rows += [("", "", "", "", "", _rcpt_line(r)) for r in rcpts[1:]]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  "
        f"{row[3]:<{widths[3]}}  {row[4]:<{widths[4]}}  {row[5]}".rstrip()
        for row in rows
    ]
    count = result["count"]
    lines.append(
        f"{count} message{'s' if count != 1 else ''}, {result['held']} held, "
        f"oldest {human_age(result['oldest_age_seconds'])}"
    )
    return "\n".join(lines) + _quarantine_note(result)


def format_entry(e: dict) -> str:
    def field(name: str, value: Any) -> str:
        """A line of the entry; what a client or a remote server chose is escaped."""
        return f"{name:<13}{'-' if value is None or value == '' else escape(str(value))}"

    lines = [
        field("id", e["id"]),
        field("state", _state(e)),
        field("sender", f"<{e['sender']}>"),
        field("arrival", f"{e['arrival']} ({human_age(e['age_seconds'])} ago)"),
        field("size", f"{e['size']} octets"),
        field("client", e.get("client")),
        field("auth_user", e.get("auth_user")),
        field("envid", e.get("envid")),
        field("ret", e.get("ret")),
        field("body", e.get("body")),
        field("smtputf8", "yes" if e.get("smtputf8") else "no"),
        "recipients",
    ]
    for r in e["recipients"]:
        lines.append(f"  <{escape(r['address'])}>")
        for key in ("state", "attempts", "next_attempt", "status", "last_error", "remote_mta"):
            lines.append("    " + field(key, r.get(key)))
        if r.get("notify") is not None:
            lines.append("    " + field("notify", ",".join(r["notify"])))
        if r.get("orcpt") is not None:
            lines.append("    " + field("orcpt", r["orcpt"]))
    return "\n".join(lines)


def _path(queue_id: str, action: str = "") -> str:
    return f"/api/v1/queue/{quote(queue_id, safe='')}{action}"


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    result = client.request("GET", "/api/v1/queue")
    print(json.dumps(result, indent=2) if args.json else format_list(result))
    return EXIT_OK


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    entry = client.request("GET", _path(args.id))
    print(json.dumps(entry, indent=2) if args.json else format_entry(entry))
    return EXIT_OK


def cmd_flush(client: Client, args: argparse.Namespace) -> int:
    if args.id is None:
        result = client.request("POST", "/api/v1/queue/flush")
        n = result["flushed"]
        text = f"flushed {n} message{'s' if n != 1 else ''}"
        if result["held"]:
            text += f"; {result['held']} held, not tried until released"
        print(text)
        return EXIT_OK
    result = client.request("POST", _path(args.id, "/flush"))
    if result["held"]:
        print(f"{result['flushed']} is held: not tried until released")
    else:
        print(f"flushed {result['flushed']}")
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    result = client.request("DELETE", _path(args.id))
    print(f"deleted {result['deleted']}")
    return EXIT_OK


def cmd_hold(client: Client, args: argparse.Namespace) -> int:
    result = client.request("POST", _path(args.id, "/hold"))
    print(f"{result['held']} held" if result["changed"] else f"{result['held']} was held already")
    return EXIT_OK


def cmd_release(client: Client, args: argparse.Namespace) -> int:
    result = client.request("POST", _path(args.id, "/release"))
    rid = result["released"]
    print(f"{rid} released, to be tried now" if result["changed"] else f"{rid} was not held")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The outbound queue of a running geosmtp.")
    add_client_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="every queued message and its recipients")
    s.add_argument("--json", action="store_true", help="the raw JSON")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("show", help="one queued message's record")
    s.add_argument("id")
    s.add_argument("--json", action="store_true", help="the raw JSON")
    s.set_defaults(func=cmd_show)
    s = sub.add_parser("flush", help="try now: one message, or all")
    s.add_argument("id", nargs="?")
    s.set_defaults(func=cmd_flush)
    s = sub.add_parser("delete", help="remove a message from the queue (no report is sent)")
    s.add_argument("id")
    s.set_defaults(func=cmd_delete)
    s = sub.add_parser("hold", help="no attempts for a message until it is released")
    s.add_argument("id")
    s.set_defaults(func=cmd_hold)
    s = sub.add_parser("release", help="undo hold: try the message now")
    s.add_argument("id")
    s.set_defaults(func=cmd_release)
    return p


def main(argv: list[str]) -> int:
    return run(_parser().parse_args(argv), PROG)
