"""The `lmtp` listener role (issue 21): its config keys, its UNIX socket, and
who a TCP one serves."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from geosmtp import config as cfg
from geosmtp.app import PROTOCOLS, App
from geosmtp.server.listeners import bind_unix
from geosmtp.server.protocols import Protocols


def load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "c.yaml"
    path.write_text("domains: [example.test]\n" + text)
    return cfg.load(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(cfg.ConfigError) as err:
        load(tmp_path, text)
    return str(err.value)


def test_an_lmtp_listener_on_a_unix_socket(tmp_path):
    config = load(
        tmp_path,
        "listeners:\n"
        "  - {role: lmtp, path: run/lmtp.sock, mode: 0600}\n"
        "  - {role: lmtp, address: 127.0.0.1, port: 24}\n",
    )
    unix, tcp = config.listeners
    assert unix.path == tmp_path.resolve() / "run" / "lmtp.sock"  # relative: to the config
    protocols = Protocols(*PROTOCOLS)  # the protocol of a role is the registry's
    assert unix.mode == 0o600 and protocols.of(unix).name == "lmtp"
    assert tcp.path is None and tcp.mode == 0o660 and protocols.of(tcp).name == "lmtp"


@pytest.mark.parametrize(
    ("listeners", "message"),
    [
        (
            "[{role: mx, path: /run/x.sock}]",
            "listeners[0].path: only an lmtp listener listens on a UNIX socket, not mx",
        ),
        (
            "[{role: lmtp, path: /run/x.sock}, {role: lmtp, path: /run/x.sock}]",
            "listeners[1].path: same path as listeners[0]",
        ),
        (f"[{{role: lmtp, path: /{'x' * 120}}}]", "listeners[0].path: "),
        ("[{role: lmtp, path: /run/x.sock, mode: 01777}]", "listeners[0].mode: expected at most"),
    ],
)
def test_bad_unix_listeners_are_refused(tmp_path, listeners, message):
    assert error_of(tmp_path, f"listeners: {listeners}\n").startswith(message)


def test_unix_listeners_never_collide_with_a_port(tmp_path):
    # address and port are not used with a path: two such listeners are no clash.
    text = "listeners:\n  - {role: mx, port: 2525}\n  - {role: lmtp, path: /run/a.sock}\n"
    text += "  - {role: lmtp, path: /run/b.sock}\n"
    assert len(load(tmp_path, text).listeners) == 3


def test_bind_unix_makes_the_socket_with_its_mode(tmp_path):
    path = str(tmp_path / "run" / "lmtp.sock")
    sock = bind_unix(path, 0o640, 16)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.close()
        # A second server on the same path is refused while this one listens.
        with pytest.raises(OSError, match="in use"):
            bind_unix(path, 0o640, 16)
    finally:
        sock.close()
    # The file a server that is gone left is replaced.
    sock = bind_unix(path, 0o600, 16)
    sock.close()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_bind_unix_never_replaces_a_file_that_is_not_a_socket(tmp_path):
    path = tmp_path / "lmtp.sock"
    path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        bind_unix(str(path), 0o660, 16)
    assert path.read_text() == "precious"


def allowed(trusted: list[str], peer: str) -> bool:
    """`App.lmtp_client_allowed` with these `trusted_networks`."""
    app = SimpleNamespace(trusted_networks=[ipaddress.ip_network(n) for n in trusted])
    app._trusted = lambda p: App._trusted(app, p)  # type: ignore[attr-defined]
    return App.lmtp_client_allowed(app, peer)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("trusted", "peer", "expected"),
    [
        ([], "127.0.0.1", True),
        ([], "127.0.0.2", True),
        ([], "::1", True),
        ([], "192.168.1.5", False),
        ([], "unix", False),
        (["127.0.0.1/32"], "127.0.0.2", False),  # trusted_networks, when set, decide
        (["127.0.0.1/32"], "127.0.0.1", True),
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "127.0.0.1", False),
    ],
)
def test_who_a_tcp_lmtp_listener_serves(trusted, peer, expected):
    assert allowed(trusted, peer) is expected
