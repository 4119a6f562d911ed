"""The LMTP hand-over window, made to happen on purpose: geosmtp dies after
Dovecot stored a message and before geosmtp read Dovecot's `250`.

A loopback forwarder between geosmtp (`delivery.lmtp`) and a private Dovecot
passes every byte, except that it holds Dovecot's replies once geosmtp has
sent the end of a message's data. The test waits until Dovecot has stored the
message and answered (the answer held in the forwarder), then kills geosmtp
with SIGKILL (its worker, then its master) and starts it again on the same
spool and queue, the forwarder now passing everything. The restarted geosmtp
finds the queue record it never marked and sends the message again: at least
once, as RFC 5321 §6.1 asks of every MTA.

- Dovecot with Sieve duplicate suppression (`dedup=True`, as in
  examples/cluster/) keeps one copy: the second is discarded with a `250`.
- A plain Dovecot keeps two: this is the window the first case closes, and
  why examples/cluster/ runs its Dovecot with `dedup=True`.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import listeners, wait_until
from tests.integration.dovecot import Dovecot, require_dovecot_dedup, require_dovecot_lmtp
from tests.integration.test_lmtp_delivery import PASSWORD, pop3_messages
from tests.integration.test_relay_faults import records, start_again

MESSAGE = (
    b"From: bob@test.example\r\nTo: alice@test.example\r\nSubject: once\r\n"
    b"Message-ID: <hand-over-1@test.example>\r\n\r\n"
    b"first line\r\n.a line that starts with a dot\r\nlast line\r\n"
)
END_OF_DATA = b"\r\n.\r\n"


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to `target`, a pair of threads per
    connection. A connection accepted while `hold` is set stops passing the
    server's replies once the client has sent the end of a message's data
    (`\r\n.\r\n`), for as long as it lasts; what it holds is in `held`.
    Clearing `hold` lets the connections accepted after it pass everything.
    `close()` ends them all."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.hold = True
        self.held = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()  # the client sees the server down, as it would be
                continue
            server.settimeout(None)  # a hold lasts as long as the test needs
            with self.lock:
                self.sockets += [client, server]
            state = {"data_ended": False, "hold": self.hold}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        tail = b""
        while chunk := self._recv(client):
            tail = (tail + chunk)[-len(END_OF_DATA) - len(chunk) :]
            if END_OF_DATA in tail:
                state["data_ended"] = True
            try:
                server.sendall(chunk)
            except OSError:
                break
        self._shut(server)

    def _down(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        while chunk := self._recv(server):
            if state["hold"] and state["data_ended"]:
                with self.lock:
                    self.held += chunk
                continue
            try:
                client.sendall(chunk)
            except OSError:
                break
        self._shut(client)

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _shut(sock: socket.socket, how: int = socket.SHUT_WR) -> None:
        try:
            sock.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        """Stop accepting and end every connection (its threads see EOF)."""
        self._shut(self.listener, socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                self._shut(sock, socket.SHUT_RDWR)
                sock.close()


def stored(dc: Dovecot, user: str) -> int:
    """Message files in `user`'s Maildir (a look that does not move them)."""
    box = dc.mail_dir / user
    return sum(len(os.listdir(box / sub)) for sub in ("new", "cur") if (box / sub).is_dir())


@pytest.fixture
def forwarded(make_server) -> Iterator:  # type: ignore[no-untyped-def]
    """`start(dedup)`: a Dovecot with LMTP, a holding forwarder to it, and
    geosmtp delivering local mail through the forwarder."""
    cleanups = []

    def start(dedup: bool):  # type: ignore[no-untyped-def]
        dc = Dovecot(None, {"alice": PASSWORD}, lmtp=True, dedup=dedup)
        cleanups.append(dc.cleanup)
        dc.start()
        fwd = Forwarder((dc.host, dc.lmtp_port))
        cleanups.append(fwd.close)
        server = make_server(
            {
                "listeners": listeners("mx"),
                "workers": 1,
                "delivery": {"lmtp": f"127.0.0.1:{fwd.port}"},
                "relay": {"retry_schedule": [0.3]},
            }
        )
        return dc, fwd, server

    yield start
    for cleanup in reversed(cleanups):
        cleanup()


def kill9(server) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL to the master, whose death kills its worker (the queue runner,
    which holds the LMTP connection) at once (PR_SET_PDEATHSIG): the master
    cannot start another worker in between. Returns once none is left."""
    workers = server.workers()
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    for pid in workers:
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), what="the worker's end")


@pytest.mark.parametrize(
    ("dedup", "copies"),
    [
        pytest.param(True, 1, id="dovecot-drops-the-resend"),
        pytest.param(False, 2, id="plain-dovecot-keeps-both"),
    ],
)
def test_a_kill_between_dovecots_250_and_the_queue_record(forwarded, dedup, copies):
    (require_dovecot_dedup if dedup else require_dovecot_lmtp)()
    dc, fwd, server = forwarded(dedup)
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
        assert client.sendmail("bob@test.example", ["alice@test.example"], MESSAGE) == {}

    # Dovecot stored it and answered; geosmtp has not read the answer.
    wait_until(lambda: stored(dc, "alice") == 1, what="Dovecot to store the message")
    wait_until(lambda: b"250" in fwd.held, what="Dovecot's 250, held by the forwarder")
    assert len(records(server)) == 1  # geosmtp's record of it: not marked delivered
    kill9(server)
    assert len(records(server)) == 1

    fwd.hold = False
    server = start_again(server)
    try:
        wait_until(lambda: not records(server), timeout=20, what="the queue to empty")
        messages = pop3_messages(dc, "alice")
        assert len(messages) == copies
        for text in messages:
            assert text.endswith(MESSAGE.partition(b"\r\n\r\n")[2])  # whole, byte for byte
        discarded = dc.log().count("discard action: Marked message to be discarded")
        assert discarded == 2 - copies  # the second delivery, and only it, dropped
        # The resend got its 250 (the line reaches the file through the master).
        wait_until(lambda: "outcome=sent" in server.access_log(), what="the delivery's line")
    finally:
        server.process.kill()
        server.process.wait(timeout=10)
