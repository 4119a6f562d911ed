"""The management API: HTTP/JSON under /api/v1, and /metrics for Prometheus.

A plain WSGI application (served by gevent's WSGI server on the admin
listener, see `admin.server`). Every request must carry a bearer token:
the write token (`admin.token`) may do everything; the read token
(`admin.read_token`), if one is set, only GET: /metrics and the read
endpoints. docs/management.md documents each endpoint.
"""

from __future__ import annotations

import hmac
import json
import os
import pwd
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from loguru import logger
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .. import __version__
from .. import config as cfg
from ..metrics import RELAY_RESULTS

if TYPE_CHECKING:
    from ..app import App

StartResponse = Callable[..., Any]
MAX_BODY = 64 * 1024
#: Arrays and objects inside each other in a request body, at most: the
#: config is 4 levels deep; deeper is refused before anything walks it.
MAX_DEPTH = 32
_SESSION_RE = re.compile(r"/api/v1/sessions/([0-9A-Fa-f]+)")
_QUEUE_RE = re.compile(r"/api/v1/queue/([^/]+)(/flush|/hold|/release)?")
_FILTER_RE = re.compile(r"/api/v1/filters/([^/]+)")


#: The environ key the admin listener sets for a request that came with a
#: Transfer-Encoding instead of a Content-Length (`admin.server.AdminHandler`).
LENGTH_REQUIRED = "geosmtp.length_required"
#: The environ key that says why a request's header section cannot frame it
#: (two Content-Length headers, one that is not digits...), or None.
BAD_FRAMING = "geosmtp.bad_framing"
#: The reply headers of an answer after which the connection cannot go on.
CLOSE = [("Connection", "close")]


class ShortBody(OSError):
    """The request body did not arrive in full within admin.request_timeout."""


class HTTPError(Exception):
    def __init__(
        self, status: str, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class AdminAPI:
    def __init__(self, server: App, token: str, read_token: str | None = None) -> None:
        self.server = server
        self._token = token.encode()
        self._read_token = read_token.encode() if read_token is not None else None

    # ------------------------------------------------------------- WSGI

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        # HEAD is served wherever GET is: the same status and headers, no body.
        head = method == "HEAD"
        try:
            if environ.get(LENGTH_REQUIRED):
                raise HTTPError(
                    "411 Length Required",
                    "a request body needs a Content-Length (no Transfer-Encoding)",
                    CLOSE,
                )
            if environ.get(BAD_FRAMING):
                raise HTTPError("400 Bad Request", environ[BAD_FRAMING], CLOSE)
            if not self._check_token(environ) and method not in ("GET", "HEAD"):
                raise HTTPError(
                    "403 Forbidden",
                    f"{method} {path}: the read-only token may only GET; "
                    "this needs the admin (write) token",
                )
            if path == "/metrics":
                if method not in ("GET", "HEAD"):
                    raise HTTPError(
                        "405 Method Not Allowed",
                        f"{method} /metrics: use GET, HEAD",
                        [("Allow", "GET, HEAD")],
                    )
                self.server.cluster.publish_metrics()
                body = self.server.metrics.exposition()
                reply = _respond(start_response, "200 OK", body, CONTENT_TYPE_LATEST)
                return [] if head else reply
            status, payload = self._route(method, path, environ)
            headers: list[tuple[str, str]] = []
        except HTTPError as exc:
            status, payload, headers = exc.status, {"error": exc.message}, exc.headers
        except Exception:  # an API bug must not take the server down: report it
            logger.exception("admin API error on {} {}", method, path)
            status, payload = "500 Internal Server Error", {"error": "internal error; see log"}
            headers = []
        body = json.dumps(payload, indent=2, sort_keys=False).encode() + b"\n"
        if status.startswith("401"):
            headers = [*headers, ("WWW-Authenticate", "Bearer")]
        reply = _respond(start_response, status, body, "application/json", headers)
        return [] if head else reply

    def _check_token(self, environ: dict) -> bool:
        """True for the write token, False for the read token; else 401.

        Both are compared in constant time, each time."""
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        given = token.strip().encode()
        write = hmac.compare_digest(given, self._token)
        read = self._read_token is not None and hmac.compare_digest(given, self._read_token)
        if scheme.lower() != "bearer" or not (write or read):
            raise HTTPError("401 Unauthorized", "missing or wrong bearer token")
        return write

    def _route(self, method: str, path: str, environ: dict) -> tuple[str, Any]:
        routes: dict[str, dict[str, Callable[[dict], Any]]] = {
            "/api/v1/stats": {"GET": self.get_stats},
            "/api/v1/config": {"GET": self.get_config, "PATCH": self.patch_config},
            "/api/v1/reload": {"POST": self.post_reload},
            "/api/v1/sessions": {"GET": self.get_sessions},
            "/api/v1/runtime": {"GET": self.get_runtime},
            "/api/v1/queue": {"GET": self.get_queue},
            "/api/v1/queue/flush": {"POST": self.flush_queue},
            "/api/v1/filters": {"GET": self.get_filters},
        }
        match = _FILTER_RE.fullmatch(path)
        if match:
            environ["geosmtp.filter"] = match.group(1)
            routes[path] = {"GET": self.get_filter, "PATCH": self.patch_filter}
        match = _SESSION_RE.fullmatch(path)
        if match:
            environ["geosmtp.session_id"] = match.group(1).upper()
            routes[path] = {"DELETE": self.delete_session}
        match = _QUEUE_RE.fullmatch(path)
        if match and path not in routes:
            environ["geosmtp.queue_id"] = match.group(1)
            action = match.group(2)
            routes[path] = (
                {"POST": getattr(self, f"{action[1:]}_entry")}
                if action
                else {"GET": self.get_entry, "DELETE": self.delete_entry}
            )
        methods = routes.get(path)
        if methods is None:
            raise HTTPError("404 Not Found", f"no such endpoint: {path}")
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = _allowed(methods)
            raise HTTPError(
                "405 Method Not Allowed", f"{method} {path}: use {allowed}", [("Allow", allowed)]
            )
        return "200 OK", handler(environ)

    # -------------------------------------------------------- endpoints

    def get_stats(self, environ: dict) -> dict:
        metrics = self.server.metrics
        self.server.cluster.publish_metrics()
        snap = metrics.snapshot()

        def total(name: str) -> float:
            value = snap.get(name, 0)
            return sum(value.values()) if isinstance(value, dict) else value

        deliveries = snap.get("geosmtp_relay_deliveries_total", {})
        return {
            "version": __version__,
            "uptime_seconds": round(time.time() - metrics.started, 3),
            # Who serves: started as root without `user:`, the uid says 0.
            "process": {
                "uid": os.getuid(),
                "user": _user_name(os.getuid()),
                "workers": self.server.share[1],
                "master_pid": os.getppid(),
            },
            "connections": {
                "current": int(total("geosmtp_connections_current")),
                "total": int(total("geosmtp_connections_total")),
                "refused": int(total("geosmtp_connections_refused_total")),
            },
            "messages": {
                "accepted": int(total("geosmtp_messages_accepted_total")),
                "rejected": int(total("geosmtp_messages_rejected_total")),
                "recipients": int(total("geosmtp_recipients_total")),
            },
            "bytes": {
                "received": int(total("geosmtp_received_bytes_total")),
                "sent": int(total("geosmtp_sent_bytes_total")),
            },
            "queue": {
                "entries": int(total("geosmtp_queue_entries")),
                "held": int(total("geosmtp_queue_held_entries")),
                "oldest_age_seconds": round(total("geosmtp_queue_oldest_age_seconds"), 3),
                # Records in quarantine/ now (moved there since start: the metric).
                "quarantined": self.server.queue_store.quarantined_count(),
                "deliveries": {
                    result: int(deliveries.get(f"result={result}", 0)) for result in RELAY_RESULTS
                },
            },
            "metrics": snap,
        }

    def get_config(self, environ: dict) -> dict:
        return cfg.to_mapping(self.server.config, redact=True)

    def patch_config(self, environ: dict) -> dict:
        patch = _read_json(environ)
        if not isinstance(patch, dict):
            raise HTTPError("400 Bad Request", "the body must be a JSON object")
        current = cfg.to_mapping(self.server.config)
        merged = cfg.merged(current, patch)
        try:
            _check_change(current, merged)
            cfg.from_mapping(merged)  # a bad value is refused here, without the master
            change = self.server.change_config(merged)
        except cfg.ConfigError as exc:
            raise HTTPError("400 Bad Request", str(exc)) from None
        return {
            "changed": change.changed,
            "config": cfg.to_mapping(self.server.config, redact=True),
        }

    def post_reload(self, environ: dict) -> dict:
        try:
            change = self.server.reload()
        except cfg.ConfigError as exc:
            raise HTTPError("400 Bad Request", str(exc)) from None
        # The keys that needed a restart kept their running values: not changed.
        changed = [k for k in change.changed if k not in change.restart]
        return {"reloaded": True, "changed": changed, "restart_needed": change.restart}

    def get_sessions(self, environ: dict) -> dict:
        sessions = self.server.cluster.sessions()
        return {"count": len(sessions), "sessions": sessions}

    def get_runtime(self, environ: dict) -> dict:
        return {"workers": self.server.cluster.runtime()}

    def delete_session(self, environ: dict) -> dict:
        session_id = environ["geosmtp.session_id"]
        if self.server.cluster.first("kick", session_id) is None:
            raise HTTPError("404 Not Found", f"no open session {session_id}")
        return {"closed": session_id}

    # ------------------------------------------------------------ queue
    # Each entry is in one worker's share of the queue: the worker that knows
    # the id answers (the others say None).

    def get_queue(self, environ: dict) -> dict:
        entries = self.server.cluster.queue_entries()
        return {
            "count": len(entries),
            "held": sum(1 for e in entries if e["held"]),
            "oldest_age_seconds": max((e["age_seconds"] for e in entries), default=0.0),
            "quarantined": self.server.queue_store.quarantined_count(),
            "entries": entries,
        }

    def _one(self, op: str, environ: dict) -> dict:
        queue_id = environ["geosmtp.queue_id"]
        answer = self.server.cluster.first(op, queue_id)
        if answer is None:
            raise HTTPError("404 Not Found", f"no queued message {cfg.printable(queue_id)}")
        return answer

    def get_entry(self, environ: dict) -> dict:
        return self._one("entry", environ)

    def flush_queue(self, environ: dict) -> dict:
        answers = self.server.cluster.ask_all("flush", None)
        flushed = sum(a["flushed"] for a in answers)
        held = sum(a["held"] for a in answers)
        logger.info("admin flushed the queue ({} messages)", flushed + held)
        return {"flushed": flushed, "held": held}

    def flush_entry(self, environ: dict) -> dict:
        return self._one("flush", environ)

    def hold_entry(self, environ: dict) -> dict:
        return self._one("hold", environ)

    def release_entry(self, environ: dict) -> dict:
        return self._one("release", environ)

    def delete_entry(self, environ: dict) -> dict:
        answer = self._one("delete", environ)
        if "busy" in answer:
            raise HTTPError("409 Conflict", answer["busy"])
        return answer

    # ---------------------------------------------------------- filters

    def _filter_info(self, stage: Any, snap: dict) -> dict:
        def by(metric: str, label: str) -> dict[str, int]:
            out = {}
            for key, value in snap.get(metric, {}).items():
                labels = dict(part.split("=", 1) for part in key.split(","))
                if labels.get("stage") == stage.name:
                    out[labels[label]] = int(value)
            return out

        return {
            **stage.info(),
            "runs": by("geosmtp_stage_runs_total", "verdict"),
            "failures": by("geosmtp_stage_failures_total", "failure"),
        }

    def get_filters(self, environ: dict) -> dict:
        filters = self.server.filters
        snap = self.server.metrics.snapshot()  # with workers: all of theirs added
        return {
            "concurrency": {
                "limit": self.server.config.filter_concurrency,
                "running": int(snap["geosmtp_filter_running"]),
                "waiting": int(snap["geosmtp_filter_waiting"]),
            },
            "count": len(filters.stages),
            "filters": [self._filter_info(stage, snap) for stage in filters.stages],
        }

    def _stage(self, environ: dict) -> Any:
        name = environ["geosmtp.filter"]
        stage = self.server.filters.by_name(name)
        if stage is None:
            raise HTTPError("404 Not Found", f"no filter named {cfg.printable(name)!r}")
        return stage

    def get_filter(self, environ: dict) -> dict:
        return self._filter_info(self._stage(environ), self.server.metrics.snapshot())

    def patch_filter(self, environ: dict) -> dict:
        """Change one stage's keys (`{"enabled": false}`) in the running config,
        validated as the file is; a reload goes back to the file."""
        name = self._stage(environ).name
        patch = _read_json(environ)
        if not isinstance(patch, dict):
            raise HTTPError("400 Bad Request", "the body must be a JSON object")
        if "name" in patch and patch["name"] != name:
            raise HTTPError(
                "400 Bad Request", "name: cannot be changed here; edit the config file and reload"
            )
        running = cfg.to_mapping(self.server.config)
        index = next(i for i, f in enumerate(running["filters"]) if f["name"] == name)
        before = running["filters"][index]
        current = {**running, "filters": list(running["filters"])}
        current["filters"][index] = cfg.merged(before, patch)
        try:
            _check_change(running, current)
            cfg.from_mapping(current)  # a bad value is refused here, without the master
            self.server.change_config(current)
        except cfg.ConfigError as exc:
            raise HTTPError("400 Bad Request", str(exc)) from None
        after = cfg.to_mapping(self.server.config)["filters"][index]
        changed = cfg.changed_keys(before, after)
        if changed:
            logger.info(
                "admin changed filter {}: {}",
                name,
                ", ".join(f"{k}={cfg.lookup(after, k)!r}" for k in changed),
            )
        stage = self.server.filters.by_name(name)
        return {
            "name": name,
            "changed": changed,
            "filter": self._filter_info(stage, self.server.metrics.snapshot()),
        }


def _check_change(running: dict, new: dict) -> None:
    """Only runtime-safe keys change through the API: 403 for the others
    (before anything in `new` is read, run or imported), 400 for a bad shape."""
    try:
        cfg.check_runtime_change(running, new)
    except cfg.NotRuntimeSafe as exc:
        raise HTTPError("403 Forbidden", str(exc)) from None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _read_json(environ: dict) -> Any:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HTTPError("400 Bad Request", "bad Content-Length") from None
    if length > MAX_BODY:
        raise HTTPError(
            "413 Payload Too Large", f"the body may be at most {MAX_BODY} octets", CLOSE
        )
    try:
        raw = environ["wsgi.input"].read(length) if length else b""
    except OSError as exc:  # ShortBody, or the client closed
        raise HTTPError(
            "400 Bad Request",
            f"the body is shorter than its Content-Length ({length} octets): {exc}",
            CLOSE,
        ) from None
    try:
        value = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError("400 Bad Request", f"invalid JSON: {exc}") from None
    except RecursionError:  # the parser recurses once a level: `[` * 100000
        value = None
        depth = MAX_DEPTH + 1
    else:
        depth = _depth(value)
    if depth > MAX_DEPTH:
        raise HTTPError("400 Bad Request", f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    return value


def _allowed(methods: Iterable[str]) -> str:
    """An `Allow` header's value: a path's methods, HEAD after GET (it is served too)."""
    names: list[str] = []
    for name in methods:
        names += [name, "HEAD"] if name == "GET" else [name]
    return ", ".join(names)


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed JSON value (a scalar: 0)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _respond(
    start_response: StartResponse,
    status: str,
    body: bytes,
    content_type: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start_response(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])],
    )
    return [body]
