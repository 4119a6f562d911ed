"""How the listeners take connections from the socket the master bound."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from geosmtp.server.listeners import Listeners
from geosmtp.server.protocols import Protocols, ServerProtocol


@pytest.mark.parametrize(
    ("workers", "reuse_port", "max_accept"),
    [(2, False, 1), (2, True, 100), (1, False, 100)],
)
def test_workers_sharing_one_socket_take_one_connection_per_wake_up(
    workers: int, reuse_port: bool, max_accept: int
) -> None:
    """gevent takes up to 100 connections a wake-up: with one socket for all
    workers, whichever woke first took a whole burst (measured: 100 of 100
    smtp-source sessions in one of two workers) and the other core sat idle."""
    config = SimpleNamespace(worker_count=workers, reuse_port=reuse_port, max_clients=10)
    app = SimpleNamespace(config=config, metrics=SimpleNamespace(listener=lambda name: None))
    smtp = ServerProtocol("smtp", ("mx",), object, build=lambda *args: None)  # type: ignore[arg-type]
    listeners = Listeners(app, Protocols(smtp))
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(10)
    listener = SimpleNamespace(
        role="mx", address="127.0.0.1", path=None, proxy_protocol=False, proxy_trusted=[]
    )
    listeners.start([(listener, raw)])  # type: ignore[list-item]
    try:
        assert [s.max_accept for s in listeners.servers] == [max_accept]
    finally:
        for server in listeners.servers:
            server.close()
