"""What every protocol's session shares: the client's socket and its life.

A session (SMTP, POP3) runs in its own greenlet: it reads under a timeout,
feeds its protocol core, and sends what the core queued. This base holds the
part that does not depend on the protocol: reads under the socket's own
timeout, sends, the TLS handshake, the byte counts, and the way the server
asks a session to stop (`shutdown`, `kick`) without interrupting it half-way.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import gevent
from gevent import socket as gsocket
from loguru import logger

if TYPE_CHECKING:
    from ..config import Listener
    from ..metrics import ListenerMetrics
    from ..protocol import ReplyValue, SansIOConnection
    from .host import Host

READ_SIZE = 64 * 1024


class ClientTimeout(Exception):
    """The client was silent for longer than the configured timeout."""


class ShutdownRequested(Exception):
    """The server is stopping (or the administrator kicked the session)."""


class HandshakeFailed(Exception):
    """TLS could not be set up with the client; the session ends without a reply."""


_session_ids: Iterator[int]  # set by _new_session_ids, in every process
_prefix: str


def _new_session_ids() -> None:
    """Session ids, unique across protocols and the server's processes (the admin
    API keys on them): the process id in six hex digits, then a counter."""
    global _session_ids, _prefix
    _session_ids = itertools.count(1)
    _prefix = f"{os.getpid():06X}"


_new_session_ids()
os.register_at_fork(after_in_child=_new_session_ids)


class StreamSession:
    """One client connection; subclasses add the protocol.

    A subclass gives `_serve()` (the protocol loop), `CLOSING` (its closing
    reply for each way the server ends a session), `REFUSALS` (its reply to a
    client that gets no session), `_sync_metrics()` and `_ended()` (its own
    cleanup); `run()` turns the ways a session can end into outcomes, and
    `_close_with()` closes the core with a reply value, the same for every
    protocol.
    """

    #: The reply the server closes with, by outcome: timeout, shutdown, kicked, error.
    CLOSING: ClassVar[dict[str, ReplyValue]] = {}
    #: The reply for a client refused before its session: "stopping" (the
    #: server stops), "busy" (over max_clients), and one for each per-client
    #: limit that applies to the protocol (`shared.CONNECTIONS`, ...).
    REFUSALS: ClassVar[dict[str, ReplyValue]] = {}
    PROTOCOL = ""
    conn: SansIOConnection  # the protocol core (the subclass makes it)

    def __init__(
        self,
        server: Host,
        sock: socket.socket,
        address: tuple,
        listener: Listener,
        metrics: ListenerMetrics,
        client_key: int = 0,
    ) -> None:
        self.server = server
        self.sock = sock
        self.peer = address[0]
        self.peer_port = address[1]
        self.listener = listener
        self.metrics = metrics
        self.id = f"{_prefix}{next(_session_ids):X}"
        self.started = time.monotonic()
        self.outcome = "lost"  # how the session ended, for metrics
        self.kicked = False  # the administrator closed it (else: the server stops)
        #: The client's key in the per-client limits (`anvil.Anvil`); 0: not counted.
        self.client_key = client_key
        self.reading = False
        #: The wait for the command being read began (monotonic), over all its
        #: reads: a line that trickles in has the command timeout in all.
        self.command_since: float | None = None
        self._lines_seen = -1  # conn.lines_read when command_since was set
        self.expired = False  # stress: the wait for a command took too long
        self.shutdown_pending = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._counted_in = self._counted_out = 0  # bytes already added to the metrics

    @classmethod
    def refusal(cls, stopping: bool) -> bytes:
        """For a client over the connection cap, or arriving during a stop."""
        return cls.REFUSALS["stopping" if stopping else "busy"].to_bytes()

    @classmethod
    def limit_refusal(cls, limit: str) -> bytes:
        """For a client over one of its limits at connect (client_limits)."""
        return cls.REFUSALS[limit].to_bytes()

    def _timeout(self) -> float:
        """Seconds the next read may wait (the protocol's state decides)."""
        return self.server.config.timeouts.command

    def _waits_for_command(self) -> bool:
        """The next read waits for a command (not message data): under
        stress, its timeout is `stress.command_timeout` at most."""
        return True

    def _read(self) -> bytes:
        """One `recv` under the timeout the session's state calls for.

        The timeout is the socket's own: gevent arms a `Timeout` only when the
        read has to wait, where a `with gevent.Timeout` would cost two timer
        operations on every read, also when the data is already there.
        """
        if self.shutdown_pending:
            raise ShutdownRequested
        timeout = self._timeout()
        if self._waits_for_command():
            timeout = self._command_time_left(timeout)
        else:
            self.command_since = None
        if timeout <= 0:  # a total time used up: settimeout(0) would mean non-blocking
            raise ClientTimeout
        self.reading = True
        try:
            self.sock.settimeout(timeout)
            data = self.sock.recv(READ_SIZE)
        except TimeoutError:
            raise ClientTimeout from None
        except OSError:
            # gevent cancels a blocked recv with EBADF when the read side is shut.
            if self.expired:
                raise ClientTimeout from None
            if self.shutdown_pending:
                raise ShutdownRequested from None
            raise
        finally:
            self.reading = False
        if self.expired:
            raise ClientTimeout
        # Checked here, at a point of our choosing, so a stop never interrupts a
        # delivery half-way (see shutdown()).
        if self.shutdown_pending:
            raise ShutdownRequested
        self.bytes_in += len(data)
        return data

    def _command_time_left(self, timeout: float) -> float:
        """Seconds the next read for a command may wait: `timeout` (under
        stress `stress.command_timeout` at most) from when the wait for this
        command began, not from this read. A read that only added to an
        unfinished line goes on with that line's time, so a client that
        trickles a byte every few seconds and never ends its line is timed
        out (a slowloris), as Postfix's smtpd_per_record_deadline does; a
        finished line (the core took it) starts the next command's time."""
        now = time.monotonic()
        lines = self.conn.lines_read
        if self.command_since is None or lines != self._lines_seen:
            self.command_since = now
            self._lines_seen = lines
        if self.server.listeners.stressed:
            timeout = min(timeout, self.server.config.stress.command_timeout)
        return timeout - (now - self.command_since)

    def _flush(self) -> None:
        """Send the replies the core has queued, if any."""
        out = self.conn.data_to_send()
        if out:
            self._send(out)

    def _send(self, out: bytes) -> None:
        """Send `out` whole, under the command timeout."""
        # Replies are small: one send nearly always takes them whole, and costs
        # less than sendall (which asks the kernel for SO_SNDBUF every call).
        sock = self.sock
        try:
            sock.settimeout(self.server.config.timeouts.command)
            sent = sock.send(out)
            if sent < len(out):
                sock.sendall(out[sent:])
        except TimeoutError:
            raise ClientTimeout from None
        self.bytes_out += len(out)

    def _handshake(self) -> None:
        """TLS on the socket, as the server side (STARTTLS/STLS or implicit TLS)."""
        context = self.server.tls_context
        if context is None:
            raise HandshakeFailed("TLS is not configured")
        try:
            with gevent.Timeout(self.server.config.tls.handshake_timeout, HandshakeFailed):
                tls_sock = context.wrap_socket(
                    self.sock, server_side=True, do_handshake_on_connect=False
                )
                self.sock = tls_sock
                tls_sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            raise HandshakeFailed(str(exc)) from None
        self.metrics.tls.inc()

    def _sync_bytes(self) -> None:
        """Add the bytes moved since the last call to the listener's counters."""
        lm = self.metrics
        if self.bytes_in != self._counted_in:
            lm.bytes_in.inc(self.bytes_in - self._counted_in)
            self._counted_in = self.bytes_in
        if self.bytes_out != self._counted_out:
            lm.bytes_out.inc(self.bytes_out - self._counted_out)
            self._counted_out = self.bytes_out

    def _discard_input(self) -> None:
        """Read and drop what the client sent and nobody will read (bounded).

        A socket closed with unread bytes sends a reset, not an end of stream:
        a plaintext client on an implicit-TLS port (its command sits unread
        behind the failed handshake) would see "connection reset" instead of a
        clean close. gevent keeps its descriptors non-blocking, so `os.read`
        takes what is there and stops at EAGAIN without waiting.
        """
        try:
            fd = self.sock.fileno()
            for _ in range(16):  # at most 16 x 64 KiB
                if not os.read(fd, READ_SIZE):
                    break
        except OSError:  # EAGAIN: nothing more; or the socket is gone
            pass

    def _close_socket(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _age(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def kick(self) -> None:
        """The administrator closes this session, at its next read."""
        self.kicked = True
        self.shutdown()

    def expire(self, now: float, timeout: float) -> None:
        """Under stress: a session that has waited for a command for more than
        `timeout` seconds (a wait begun before the stress, with the long
        timeout) ends as if that wait had timed out."""
        since = self.command_since if self.reading else None  # None: not waiting for one
        if since is not None and now - since > timeout and not self.expired:
            self.expired = True
            self._wake()

    def shutdown(self) -> None:
        """Ask the session to end (with the protocol's reply) before its next read.

        A session blocked in `recv` is woken by shutting the socket's read side
        (the `recv` returns); nothing is thrown into the greenlet, so a session in
        the middle of storing a message finishes it first.
        """
        self.shutdown_pending = True
        self._wake()

    def _wake(self) -> None:
        """End a `recv` the session is blocked in (it sees why at once)."""
        if self.reading:
            try:
                # The plain socket's shutdown, under TLS too: SSLSocket.shutdown drops
                # the TLS state, and the reply would then go out in the clear.
                gsocket.socket.shutdown(self.sock, socket.SHUT_RD)
            except OSError:
                pass

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        logger.debug(
            "{} session {} connect from [{}]:{}", self.PROTOCOL, self.id, self.peer, self.peer_port
        )
        try:
            self._serve()
        except ClientTimeout:
            self.outcome = "timeout"
            self._close_with(self.CLOSING["timeout"])
        except ShutdownRequested:
            self.outcome = "kicked" if self.kicked else "shutdown"
            self._close_with(self.CLOSING[self.outcome])
        except HandshakeFailed as exc:
            self.outcome = "tls_failed"
            logger.debug("session {}: TLS handshake failed: {}", self.id, exc)
            self._discard_input()
        except OSError as exc:  # the socket: storage errors are StorageError, handled where met
            self.outcome = "lost"
            logger.debug("session {} socket error: {}", self.id, exc)
        except Exception:
            # A bug in the core or in the shell: the client hears the protocol's
            # "internal error", the log gets the traceback, other sessions go on.
            self.outcome = "error"
            logger.exception("session {} [{}]: internal error", self.id, self.peer)
            self._close_with(self.CLOSING["error"])
        finally:
            self._sync_metrics()
            self.metrics.session_ended(self.outcome, time.monotonic() - self.started)
            self._ended()
            self._close_socket()
            logger.debug(
                "session {} closed after {:.3f}s, in={} out={}",
                self.id,
                time.monotonic() - self.started,
                self.bytes_in,
                self.bytes_out,
            )

    def _serve(self) -> None:
        """The protocol's loop, to the end of the session."""
        raise NotImplementedError

    def _close_with(self, reply: ReplyValue) -> None:
        """Close the core with `reply` and send it, if the client still listens."""
        try:
            self.conn.close_with(reply)
            self._flush()
        except (OSError, ClientTimeout):
            pass
        except Exception:  # the core is in a state it cannot close from: send it raw
            logger.exception("session {}: cannot close cleanly", self.id)
            try:
                self.sock.send(reply.to_bytes())
            except OSError:
                pass

    def _sync_metrics(self) -> None:
        self._sync_bytes()

    def _ended(self) -> None:
        """The protocol's cleanup once the session is over (before the socket closes)."""
