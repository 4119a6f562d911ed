"""How the listeners take connections from the socket the master bound."""

from __future__ import annotations

import ipaddress
import socket
from types import SimpleNamespace

import gevent
import pytest
from gevent import socket as gsocket

from geosmtp.protocol.proxy import ProxyError
from geosmtp.server.listeners import Listeners, read_proxy_header, trusted
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


# issue 22: the PROXY header read on a socket
HEADER = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"


def test_the_proxy_header_is_read_octet_by_octet_and_the_rest_left_in_the_socket():
    """A header that trickles in, then the protocol's bytes: the read takes the
    header's octets and not one more (peeking), however the writes fall."""
    ours, theirs = gsocket.socketpair()
    with ours, theirs:

        def trickle() -> None:
            for octet in HEADER[:-1]:
                theirs.sendall(bytes([octet]))
                gevent.sleep(0)  # a write of its own each
            theirs.sendall(HEADER[-1:] + b"EHLO x\r\n")

        writer = gevent.spawn(trickle)
        header = read_proxy_header(ours, 5)
        writer.get(timeout=5)
        assert header.source == ("192.0.2.7", 56324)
        assert header.length == len(HEADER)
        ours.settimeout(5)
        assert ours.recv(100) == b"EHLO x\r\n"


def test_a_missing_or_cut_proxy_header_is_an_error():
    ours, theirs = gsocket.socketpair()
    with ours, theirs, pytest.raises(TimeoutError):
        read_proxy_header(ours, 0.05)  # nothing comes
    ours, theirs = gsocket.socketpair()
    with ours, theirs, pytest.raises(ProxyError, match="ended before"):
        theirs.sendall(HEADER[:10])
        theirs.close()
        read_proxy_header(ours, 5)
    ours, theirs = gsocket.socketpair()
    with ours, theirs, pytest.raises(ProxyError, match="not a PROXY header"):
        theirs.sendall(b"EHLO x\r\n")
        read_proxy_header(ours, 5)


def test_proxy_trusted_matches_networks_and_single_addresses_of_both_families():
    networks = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.0.2.7/32", "::1/128")]
    assert trusted("10.1.2.3", networks) and trusted("192.0.2.7", networks)
    assert trusted("::1", networks)
    assert not trusted("192.0.2.8", networks) and not trusted("127.0.0.1", networks)
    assert not trusted("::2", networks) and not trusted("unix", networks)
    # As trusted_networks: an IPv4-mapped address is its IPv4 one; a zone is dropped.
    assert trusted("::ffff:10.1.2.3", networks) and not trusted("::ffff:192.0.2.8", networks)
    assert trusted("fe80::1%eth0", [ipaddress.ip_network("fe80::/10")])
