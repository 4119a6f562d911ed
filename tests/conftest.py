"""Shared fixtures: a real geosmtp process on loopback, started through its CLI."""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from bench.probe import wait_for
from geosmtp.storage.maildir import delivery_order

HOSTNAME = "mx.test.example"
DOMAINS = ["test.example", "localhost"]


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    """The live and zombie children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The test process must stay unpatched: a module whose imports call gevent's
    `patch_all()` (the bench's load generator does) turns the suite's threads
    into greenlets and its `os.fork` into gevent's, and tests then hang or fail
    far from the cause."""
    from gevent import monkey

    names = ("socket", "os", "thread", "time")
    patched = [name for name in names if monkey.is_module_patched(name)]
    if patched:
        raise pytest.UsageError(
            f"collecting the tests monkey-patched {patched} (gevent) in the test process: "
            "a test imports a module that calls patch_all(); run that in a child process"
        )


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (the bench's
    `wait_for`); a test failure after `timeout`."""
    try:
        return wait_for(predicate, timeout, what, interval)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# How many servers the run started: each costs a second or more of the suite's
# time, so the summary shows the count (a rise there is a slower CI).
SERVER_STARTS = [0]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand its count to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["server_starts"] = SERVER_STARTS[0]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """In the controller (pytest-xdist): add up the workers' counts."""
    SERVER_STARTS[0] += getattr(node, "workeroutput", {}).get("server_starts", 0)


def pytest_terminal_summary(terminalreporter) -> None:
    if SERVER_STARTS[0]:
        terminalreporter.write_line(f"geosmtp servers started: {SERVER_STARTS[0]}")


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
        """The box's new messages, oldest first (as POP3 lists them: by the
        name's seconds and microseconds, not as text)."""
        new = self.mail_dir / box / "new"
        return sorted(new.iterdir(), key=lambda p: delivery_order(p.name)) if new.is_dir() else []

    def all_messages(self) -> list[Path]:
        return sorted(self.mail_dir.glob("*/new/*"), key=lambda p: delivery_order(p.name))

    def tmp_files(self) -> list[Path]:
        """Files of messages not (yet) delivered: the spool, and any Maildir's tmp/."""
        return sorted([*self.mail_dir.glob(".spool/*"), *self.mail_dir.glob("*/tmp/*")])

    def access_log(self) -> str:
        path = self.log_dir / "access.log"
        return path.read_text() if path.exists() else ""

    def server_log(self) -> str:
        path = self.log_dir / "log.txt"
        return path.read_text() if path.exists() else ""

    def logged(self, text: str, timeout: float = 10.0) -> str:
        """log.txt once it holds `text`. A worker's lines reach it through the
        master's log pipe, a moment after what they tell of has happened."""
        try:
            return wait_until(
                lambda: text in (log := self.server_log()) and log, timeout, what=repr(text)
            )
        except AssertionError:
            raise AssertionError(f"{text!r} not in log.txt:\n{self.server_log()[-3000:]}") from None

    def stderr(self) -> str:
        """What the process wrote to stderr (a file, so a chatty server never blocks on a pipe)."""
        path = self.root / "stderr.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def connect(self, host: str | None = None, port: int | None = None) -> socket.socket:
        return socket.create_connection((host or self.host, port or self.port), timeout=10)

    def workers(self) -> list[int]:
        """The pids of the serving processes (the master's children)."""
        return child_pids(self.process.pid)

    def old_workers_gone(self, old: list[int] | set[int]) -> list[int]:
        """The worker pids once none of `old` (taken before a reload) is left.

        Until an old worker has handled its SIGTERM it may still take a client
        (an API request too) on the old config; after this, none does."""
        return wait_until(
            lambda: (pids := self.workers()) and not set(pids) & set(old) and pids,
            what="the old workers to end",
        )

    @property
    def worker(self) -> int:
        """The one serving process of a server started with `workers: 1`."""
        (pid,) = wait_until(lambda: self.workers() or None, what="the worker")
        return pid

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


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def run_cli(
    *args: str, cwd: Path, timeout: float = 30, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """`python -m geosmtp ARGS` to its end, output captured as text; `stdin` fed in."""
    return subprocess.run(
        [sys.executable, "-m", "geosmtp", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def write_config(root: Path, overrides: dict | None = None, port: int | None = None) -> Path:
    config = {
        "hostname": HOSTNAME,
        "domains": DOMAINS,
        "listeners": [{"address": "127.0.0.1", "port": port or free_port()}],
        "mail_dir": "mail_dir",
        "log": {"dir": "logs", "level": "DEBUG"},
        "fsync": True,
        "users": {"alice": {}, "bob": {}},
        # Relayed mail looks its MX up here: a loopback port where nothing answers,
        # so no test ever sends a DNS question (or mail) off this machine.
        "dns": {"nameservers": [f"127.0.0.1:{free_udp_port()}"], "timeout": 1},
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
    launcher: list[str] | None = None,
) -> RunningServer:
    """Start geosmtp through its CLI; `launcher` replaces `python -m geosmtp`
    (a test that must plant a fault in the running process uses `python -c`)."""
    SERVER_STARTS[0] += 1
    root.mkdir(parents=True, exist_ok=True)
    path = write_config(root, overrides)
    config = yaml.safe_load(path.read_text())
    listener = config["listeners"][0]
    # Output goes to files: nobody reads a pipe while the server runs, and a full
    # pipe would stall the server on its next log line.
    with open(root / "stdout.txt", "wb") as out, open(root / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [
                *(launcher or [sys.executable, "-m", "geosmtp"]),
                "-c",
                str(path),
                *(extra_args or []),
            ],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = RunningServer(proc, listener["address"], listener["port"], root, path)
    for item in config["listeners"]:
        # issue 21: a UNIX-socket listener (lmtp `path`) has no port
        server.ports.setdefault(item.get("role", "mx"), item.get("port"))
    # An implicit-TLS listener says nothing before a handshake: probe another one,
    # or (when there is none) only see that it accepts connections.
    plain = [
        li
        for li in config["listeners"]
        if li.get("role", "mx") not in ("submissions", "pop3s") and "path" not in li
    ]
    probe = plain[0] if plain else listener
    if wait:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {server.stderr()[-2000:]}")
            if not plain:
                return _port_accepts(probe["address"], probe["port"])
            return _port_open(probe["address"], probe["port"])

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


# ------------------------------------------------------------ TLS and AUTH


@dataclass
class Certs:
    """A throwaway CA (trustme) and a server certificate for 127.0.0.1 and HOSTNAME."""

    ca: object  # trustme.CA
    cert: Path  # the server's certificate chain, PEM
    key: Path  # its private key, PEM
    ca_file: Path  # the CA's certificate, PEM (for swaks, curl, openssl)

    def client_context(self, **versions) -> ssl.SSLContext:
        """A client context that trusts only this CA; `maximum_version=...` etc. as keywords."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        for name, value in versions.items():
            setattr(ctx, name, value)
        return ctx

    @property
    def tls_config(self) -> dict:
        return {"cert": str(self.cert), "key": str(self.key)}


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    trustme = pytest.importorskip("trustme")
    root = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1", "::1")
    cert, key, ca_file = root / "cert.pem", root / "key.pem", root / "ca.pem"
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, cert, key, ca_file)


@functools.cache
def password_hash(password: str) -> str:
    """An argon2 hash as `geosmtp passwd` prints it (cached: hashing is slow on purpose)."""
    from geosmtp.auth import hash_password

    return hash_password(password)


def users(**passwords: str | None) -> dict:
    """The `users:` section: `users(alice="pw", bob=None)`; None means no login."""
    return {
        name: ({"password": password_hash(pw)} if pw is not None else {})
        for name, pw in passwords.items()
    }


def listeners(*roles: str) -> list[dict]:
    """One listener on 127.0.0.1 and a free port per role, in this order."""
    return [{"address": "127.0.0.1", "port": free_port(), "role": role} for role in roles]


@pytest.fixture(scope="module")
def make_module_server(tmp_path_factory) -> Iterator:
    """Like `make_server`, for a server shared by the tests of one module."""
    started: list[RunningServer] = []

    def factory(overrides: dict | None = None, **kwargs) -> RunningServer:
        server = start_server(tmp_path_factory.mktemp("msrv"), overrides, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


# ------------------------------------------------ servers that tests share


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory) -> Iterator[RunningServer]:
    """One server with the default config for the run's tests that need nothing
    fresh: each sends to mailboxes of its own (`box`), which
    `unknown_recipients: accept` makes on first delivery. A start costs a
    second or more; the tests of every module that use this one pay it once.
    A test that stops a server, counts its log lines or metrics, or needs a
    config of its own starts its own (`make_server`, `make_module_server`)."""
    server = start_server(tmp_path_factory.mktemp("shared"))
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture
def box(request) -> str:
    """A mailbox name no other test uses (from the test's id, so the same on
    every run): mail to `{box}@test.example` is this test's alone."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    return f"t{digest}"


@dataclass
class SharedView(RunningServer):
    """A shared server as one test sees it: `access_log()` from where the test
    began, `all_messages()` stored since then.

    A line of the access log is written a moment after the client has its
    reply: a test may see only the lines it made when every test before it
    waited for its own (as `test_access_log`'s do), so a view is for the tests
    of one module, not for `shared_server`."""

    access_from: int = 0
    before: frozenset[Path] = frozenset()

    @classmethod
    def of(cls, server: RunningServer) -> SharedView:
        fields = {name: getattr(server, name) for name in RunningServer.__dataclass_fields__}
        return cls(
            **fields,
            access_from=len(server.access_log()),
            before=frozenset(server.all_messages()),
        )

    def access_log(self) -> str:
        return super().access_log()[self.access_from :]

    def all_messages(self) -> list[Path]:
        return [path for path in super().all_messages() if path not in self.before]


def stored_since(server: RunningServer, before: list[Path]) -> list[Path]:
    """The messages stored on a shared server since `before` (its
    `all_messages()` taken earlier), in delivery order."""
    seen = set(before)
    return [path for path in server.all_messages() if path not in seen]
