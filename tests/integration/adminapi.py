"""A client for the management API (http.client) and helpers for its tests."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from tests.conftest import RunningServer, free_port, wait_until

TOKEN = "test-token-0123456789abcdefghijk"  # 32 characters
assert len(TOKEN) == 32


def admin_section(**extra: Any) -> dict:
    """The `admin:` override: enabled, a free loopback port, the test token."""
    return {"admin": {"enabled": True, "port": free_port(), "token": TOKEN, **extra}}


def with_admin(overrides: dict | None = None, **admin: Any) -> dict:
    return {**admin_section(**admin), **(overrides or {})}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json["error"]


class AdminClient:
    def __init__(self, host: str, port: int, token: str | None = TOKEN) -> None:
        self.host = host
        self.port = port
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | bool | None = True,
    ) -> Reply:
        """`token=True`: the client's token; a string: that one; None: no header."""
        sent = dict(headers or {})
        bearer = self.token if token is True else token
        if bearer is not None:
            sent["Authorization"] = f"Bearer {bearer}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        reply = self.request(method, path, body)
        assert reply.status == 200, (method, path, reply.status, reply.body)
        return reply.json

    def get(self, path: str) -> Any:
        return self.ok("GET", path)

    def stats(self) -> dict:
        return self.get("/api/v1/stats")

    def metrics(self) -> dict:
        return self.stats()["metrics"]

    def sessions(self) -> list[dict]:
        return self.get("/api/v1/sessions")["sessions"]

    def config(self) -> dict:
        return self.get("/api/v1/config")

    def exposition(self) -> str:
        reply = self.request("GET", "/metrics")
        assert reply.status == 200, reply.body
        return reply.body.decode()

    def quiet(self) -> dict:
        """The metrics once no session is open (so every count so far is in)."""

        def idle() -> dict | None:
            stats = self.stats()
            return stats["metrics"] if stats["connections"]["current"] == 0 else None

        return wait_until(idle, what="no open session")


def admin_config(server: RunningServer) -> dict:
    return yaml.safe_load(server.config_path.read_text())["admin"]


def admin_of(server: RunningServer, token: str | None = TOKEN) -> AdminClient:
    """The server's admin API, once it answers (it starts after the SMTP listeners)."""
    client = AdminClient("127.0.0.1", admin_config(server)["port"], token)

    def up() -> bool:
        assert server.process.poll() is None, server.stderr()[-2000:]
        try:
            client.request("GET", "/api/v1/stats", token=None)
        except OSError:
            return False
        return True

    wait_until(up, what="admin API")
    return client


def total(metrics: dict, name: str, **labels: str) -> float:
    """A sample's value; with labels, the sum over the samples that carry them."""
    value = metrics.get(name)
    if value is None:  # a labelled metric has no sample before its first use
        return 0.0
    if not isinstance(value, dict):
        assert not labels, (name, labels)
        return value
    wanted = {f"{k}={v}" for k, v in labels.items()}
    return sum(v for key, v in value.items() if wanted <= set(key.split(",")))


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def ctl(server_or_config: RunningServer | os.PathLike | str, *args: str, timeout: float = 30):
    """Run `python -m geosmtp ctl -c CONFIG ARGS...`; the CompletedProcess (text)."""
    path = getattr(server_or_config, "config_path", server_or_config)
    return subprocess.run(
        [sys.executable, "-m", "geosmtp", "ctl", "-c", str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
