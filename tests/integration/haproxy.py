"""A private HAProxy in TCP mode for the tests (issue 22): Debian's `haproxy`,
started on loopback from a config file in a temp folder, stopped after.

    with running_haproxy() as hp:
        port = hp.route([("127.0.0.1", server.port)], send_proxy="send-proxy-v2")
        hp.start()
        smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.5", 0)) ...

Each `route` is a frontend on a free loopback port with a backend of the
given servers (`balance roundrobin`); `send_proxy` is HAProxy's server
option: None (plain TCP), "send-proxy" (PROXY v1) or "send-proxy-v2";
`check` adds health checks (with the header when `send_proxy` is set). The
test skips, with the reason, when `/usr/sbin/haproxy` is missing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until

HAPROXY = "/usr/sbin/haproxy"
SEND_PROXY = (None, "send-proxy", "send-proxy-v2")

__all__ = ["HAPROXY", "HAProxy", "available", "require_haproxy", "running_haproxy"]


def available() -> bool:
    return Path(HAPROXY).is_file()


def require_haproxy() -> None:
    """Skip the calling test when Debian's HAProxy is not installed."""
    if not available():
        pytest.skip(f"HAProxy is not installed ({HAPROXY}): apt-get install haproxy")


class HAProxy:
    """One private HAProxy process: routes first, then `start()`, then `stop()`."""

    def __init__(self, folder: Path, host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.host = host
        self.routes: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []

    def route(
        self,
        servers: Sequence[tuple[str, int]],
        send_proxy: str | None = None,
        check: bool = False,
    ) -> int:
        """A frontend on a free port of `host` to `servers`; its port."""
        if send_proxy not in SEND_PROXY:
            raise ValueError(f"send_proxy: one of {SEND_PROXY}, got {send_proxy!r}")
        port = free_port(self.host)
        n = len(self.routes)
        # A health check sends the header too (check-send-proxy): a proxy_protocol
        # listener closes a connection without one, with a WARNING line each time.
        checks = ("check", "check-send-proxy" if send_proxy else None) if check else ()
        options = " ".join(o for o in (send_proxy, *checks) if o)
        lines = [
            f"frontend f{n}",
            f"    bind {self.host}:{port}",
            f"    default_backend b{n}",
            f"backend b{n}",
            "    balance roundrobin",
            *(
                f"    server s{n}_{i} {host}:{server_port} {options}".rstrip()
                for i, (host, server_port) in enumerate(servers)
            ),
        ]
        self.routes.append("\n".join(lines))
        self.ports.append(port)
        return port

    def config(self) -> str:
        return "\n".join(
            [
                "global",
                "    maxconn 2000",
                f"    pidfile {self.folder / 'haproxy.pid'}",
                "defaults",
                "    mode tcp",
                "    timeout connect 5s",
                "    timeout client 60s",
                "    timeout server 60s",
                *self.routes,
                "",
            ]
        )

    def start(self) -> HAProxy:
        """Run HAProxy in the foreground (`-db`) until `stop`; ready when every
        frontend accepts."""
        path = self.folder / "haproxy.cfg"
        path.write_text(self.config())
        check = subprocess.run(
            [HAPROXY, "-c", "-q", "-f", str(path)], capture_output=True, timeout=30
        )
        assert check.returncode == 0, check.stderr.decode(errors="replace")
        with open(self.folder / "haproxy.log", "wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for port in self.ports:
            wait_until(lambda port=port: self._accepts(port), what=f"HAProxy on {port}")
        return self

    def _accepts(self, port: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited {self.process.returncode}: {self.log()}")
        try:
            socket.create_connection((self.host, port), timeout=1).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        path = self.folder / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def running_haproxy(host: str = "127.0.0.1") -> Iterator[HAProxy]:
    """An HAProxy to add routes to and `start()`; stopped and removed after."""
    require_haproxy()
    folder = Path(tempfile.mkdtemp(prefix="geosmtp-haproxy-"))
    proxy = HAProxy(folder, host)
    try:
        yield proxy
    finally:
        proxy.stop()
        shutil.rmtree(folder, ignore_errors=True)
