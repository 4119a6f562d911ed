"""Shared fixtures: a real geosmtp process on loopback, started through its CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

HOSTNAME = "mx.test.example"
DOMAINS = ["test.example", "localhost"]


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@dataclass
class RunningServer:
    process: subprocess.Popen
    host: str
    port: int
    root: Path
    config_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def mail_dir(self) -> Path:
        return self.root / "mail_dir"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def messages(self, box: str) -> list[Path]:
        new = self.mail_dir / box / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def all_messages(self) -> list[Path]:
        return sorted(self.mail_dir.glob("*/new/*"))

    def tmp_files(self) -> list[Path]:
        return sorted(self.mail_dir.glob("*/tmp/*"))

    def access_log(self) -> str:
        path = self.log_dir / "access.log"
        return path.read_text() if path.exists() else ""

    def server_log(self) -> str:
        path = self.log_dir / "log.txt"
        return path.read_text() if path.exists() else ""

    def stderr(self) -> str:
        """What the process wrote to stderr (a file, so a chatty server never blocks on a pipe)."""
        path = self.root / "stderr.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def connect(self, host: str | None = None, port: int | None = None) -> socket.socket:
        return socket.create_connection((host or self.host, port or self.port), timeout=10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.settimeout(2)
            s.recv(1024)  # the greeting, so the session ends cleanly
            s.sendall(b"QUIT\r\n")
        return True
    except OSError:
        return False


def write_config(root: Path, overrides: dict | None = None, port: int | None = None) -> Path:
    config = {
        "hostname": HOSTNAME,
        "domains": DOMAINS,
        "listeners": [{"address": "127.0.0.1", "port": port or free_port()}],
        "mail_dir": "mail_dir",
        "log": {"dir": "logs", "level": "DEBUG"},
        "fsync": True,
        "users": {"alice": {}, "bob": {}},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_server(
    root: Path,
    overrides: dict | None = None,
    extra_args: list[str] | None = None,
    wait: bool = True,
) -> RunningServer:
    root.mkdir(parents=True, exist_ok=True)
    path = write_config(root, overrides)
    config = yaml.safe_load(path.read_text())
    listener = config["listeners"][0]
    # Output goes to files: nobody reads a pipe while the server runs, and a full
    # pipe would stall the server on its next log line.
    with open(root / "stdout.txt", "wb") as out, open(root / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geosmtp", "-c", str(path), *(extra_args or [])],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = RunningServer(proc, listener["address"], listener["port"], root, path)
    if wait:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {server.stderr()[-2000:]}")
            return _port_open(server.host, server.port)

        wait_until(ready, timeout=20, what="server to listen")
    return server


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    """Start geosmtp with config overrides; every server is stopped at teardown."""
    started: list[RunningServer] = []

    def factory(overrides: dict | None = None, **kwargs) -> RunningServer:
        server = start_server(tmp_path / f"srv{len(started)}", overrides, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


@pytest.fixture
def server(make_server) -> RunningServer:
    return make_server()
