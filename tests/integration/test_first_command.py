"""The README's first command: `geosmtp -c config.yaml` on the bundled config, as it ships.

It must work for an ordinary user, so the server runs without the right to bind
ports below 1024: as itself, or when the test runs as root, through setpriv as
`nobody` (or, when that user cannot run this Python, as root without
CAP_NET_BIND_SERVICE). Every listener the bundled config names must then answer.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import have_ipv6, wait_until
from tests.integration.wire import Wire

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
CAP_NET_BIND_SERVICE = 10
#: The bundled config's listeners: (address, port, what answers there).
PORTS = [
    ("127.0.0.1", 2525, "smtp"),
    ("::1", 2525, "smtp"),
    ("127.0.0.1", 2587, "smtp"),
    ("127.0.0.1", 2465, "smtps"),
    ("127.0.0.1", 2110, "pop3"),
    ("127.0.0.1", 2995, "pop3s"),
    ("127.0.0.1", 8025, "http"),
]


def _bindable(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _unprivileged_launcher(workdir: Path) -> list[str]:
    """The argv prefix that starts a child unable to bind ports below 1024."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot start the server unprivileged")
    os.chown(workdir, NOBODY, NOBODY)
    probe = [sys.executable, "-c", "import geosmtp.cli, gevent, yaml, loguru, argon2"]
    for prefix in (
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"],
        # This Python may not be readable by nobody (in a private home, say): then
        # stay root, without the capability that allows ports below 1024.
        [setpriv, "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service", "--"],
    ):
        if subprocess.run([*prefix, *probe], cwd=workdir, capture_output=True).returncode == 0:
            return prefix
    pytest.skip(
        f"running as root, and setpriv can neither run {sys.executable} as uid {NOBODY} "
        "nor drop CAP_NET_BIND_SERVICE: cannot start the server unprivileged"
    )


def _unprivileged(pid: int) -> bool:
    """The process runs as a non-root user, or without CAP_NET_BIND_SERVICE."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    uid = int(fields["Uid"].split()[1])  # effective
    cap_eff = int(fields["CapEff"].strip(), 16)
    return uid != 0 or not cap_eff & (1 << CAP_NET_BIND_SERVICE)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: that lives in a folder only its owner may enter.
    path = Path(tempfile.mkdtemp(prefix="geosmtp-first-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _greets(address: str, port: int) -> None:
    with Wire.connect(address, port) as w:  # asserts the 220
        w.expect("QUIT", 221)


def _tls(address: str, port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the bundled config's self-signed certificate
    raw = socket.create_connection((address, port), timeout=10)
    return context.wrap_socket(raw)  # the handshake


def _greets_inside_tls(address: str, port: int) -> None:
    with _tls(address, port) as tls:
        w = Wire(tls)
        code, text = w.reply()
        assert code == 220, text
        w.expect("QUIT", 221)


def _pop3_greets(address: str, port: int, tls: bool = False) -> None:
    """A POP3 "+OK" greeting, then a demo user's login (after STLS or inside TLS)."""
    import poplib

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls:
        client = poplib.POP3_SSL(address, port, timeout=10, context=context)
    else:
        client = poplib.POP3(address, port, timeout=10)
        client.stls(context=context)
    assert client.getwelcome().startswith(b"+OK")
    client.user("alice")
    assert client.pass_("alice-demo").startswith(b"+OK")
    client.quit()


def _admin_answers(address: str, port: int) -> None:
    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.request("GET", "/api/v1/stats")  # no token: 401 is an answer
        assert conn.getresponse().status == 401
    finally:
        conn.close()


def test_bundled_config_runs_unprivileged_and_every_listener_answers(workdir):
    if not have_ipv6():
        pytest.skip("no IPv6 loopback here: the bundled config's [::1]:2525 listener cannot bind")
    taken = [f"[{a}]:{p}" for a, p, _ in PORTS if not _bindable(a, p)]
    if taken:
        pytest.skip(f"the bundled config's ports are in use on this machine: {', '.join(taken)}")
    shutil.copyfile(REPO / "config.yaml", workdir / "config.yaml")  # exactly as shipped
    prefix = _unprivileged_launcher(workdir)
    stderr_path = workdir.parent / f"{workdir.name}.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "geosmtp", "-c", "config.yaml"],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:

        def admin_up() -> bool:
            if proc.poll() is not None:
                text = stderr_path.read_text(errors="replace")
                if "Address already in use" in text:
                    pytest.skip(f"a bundled config port was taken meanwhile: {text.strip()}")
                raise AssertionError(f"geosmtp exited {proc.returncode}: {text}")
            try:
                _admin_answers("127.0.0.1", 8025)
            except OSError:
                return False
            return True

        # The admin listener starts last: once it answers, every listener is bound.
        wait_until(admin_up, timeout=30, what="the bundled config's listeners")
        assert _unprivileged(proc.pid), "the server ran with the right to bind ports below 1024"
        for address, port, kind in PORTS:
            check = {
                "smtp": _greets,
                "smtps": _greets_inside_tls,
                "pop3": _pop3_greets,
                "pop3s": lambda a, p: _pop3_greets(a, p, tls=True),
                "http": _admin_answers,
            }[kind]
            check(address, port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        stderr_path.unlink(missing_ok=True)
