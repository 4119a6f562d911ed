"""The gevent side of an SMTP session: socket in, core, socket out.

One `SMTPSession` per client, run in its own greenlet. It reads under a
`gevent.Timeout`, feeds the sans-I/O core, writes the replies the core
queued, and acts on the core's events: spool the message to disk as it
arrives, deliver it, log it. All protocol decisions are the core's.
"""

from __future__ import annotations

import email.utils
import itertools
import socket
import ssl
import time
from typing import TYPE_CHECKING

import gevent
from gevent import socket as gsocket
from loguru import logger

from .. import logs
from ..auth import BUSY
from ..mail.headers import MessageIdSniffer
from ..mail.ids import new_queue_id
from ..pipeline import Message, Verdict
from ..smtp import (
    NEED_DATA,
    AuthRequest,
    CloseConnection,
    ConnectionClosed,
    MessageData,
    MessageEnd,
    MessageStart,
    SMTPConnection,
    StartTLS,
    State,
    TransactionAborted,
    TransactionRejected,
)
from ..smtp import replies as R
from ..smtp.trace import trace_headers
from ..storage import SpoolFile, StorageError

if TYPE_CHECKING:
    from ..app import App
    from ..config import Listener
    from ..mail import Envelope
    from ..metrics import ListenerMetrics
    from ..smtp.sasl import Credentials

READ_SIZE = 64 * 1024


class ClientTimeout(Exception):
    """The client was silent for longer than the configured timeout."""


class ShutdownRequested(Exception):
    """The server is stopping and the grace period is over."""


class HandshakeFailed(Exception):
    """TLS could not be set up with the client; the session ends without a reply."""


_session_ids = itertools.count(1)
_last_date: tuple[int, str] = (-1, "")


def received_date() -> str:
    """Now as an RFC 5322 date-time in local time, for `Received:`; made once a second."""
    global _last_date
    now = int(time.time())
    if _last_date[0] != now:
        _last_date = (now, email.utils.formatdate(now, localtime=True))
    return _last_date[1]


class SMTPSession:
    def __init__(
        self,
        server: App,
        sock: socket.socket,
        address: tuple,
        listener: Listener,
        metrics: ListenerMetrics,
    ) -> None:
        self.metrics = metrics
        self.outcome = "lost"  # how the session ended, for metrics
        self._counted_in = self._counted_out = 0  # bytes already added to the metrics
        self.close_reply = R.SHUTTING_DOWN  # what shutdown() answers
        self.server = server
        self.sock = sock
        self.peer = address[0]
        self.peer_port = address[1]
        self.listener = listener
        self.id = f"{next(_session_ids):X}"
        self.started = time.monotonic()
        self.conn: SMTPConnection = server.new_connection(listener, self.peer)
        self.spool: SpoolFile | _FailedSpool | None = None
        self.queue_id: str | None = None
        self.sniffer: MessageIdSniffer | None = None  # the current message's Message-ID
        # The access log has one line per transaction: refused recipients wait
        # here for it, and the envelope whose line is written is remembered.
        self.refused: list[str] = []
        self.logged: Envelope | None = None
        self.data_started = 0.0
        self.reading = False
        self.shutdown_pending = False
        self.bytes_in = 0
        self.bytes_out = 0

    # -------------------------------------------------------------- I/O

    def _timeout(self) -> float:
        timeouts = self.server.config.timeouts
        if self.conn.in_data:
            left = timeouts.data_total - (time.monotonic() - self.data_started)
            return max(0.0, min(timeouts.data_block, left))
        return timeouts.command

    def _read(self) -> bytes:
        """One `recv` under the timeout the session's state calls for.

        The timeout is the socket's own: gevent arms a `Timeout` only when the
        read has to wait, where a `with gevent.Timeout` would cost two timer
        operations on every read, also when the data is already there.
        """
        if self.shutdown_pending:
            raise ShutdownRequested
        timeout = self._timeout()
        if timeout <= 0:  # data_total used up: settimeout(0) would mean non-blocking
            raise ClientTimeout
        self.reading = True
        try:
            self.sock.settimeout(timeout)
            data = self.sock.recv(READ_SIZE)
        except TimeoutError:
            raise ClientTimeout from None
        except OSError:
            # gevent cancels a blocked recv with EBADF when the read side is shut.
            if self.shutdown_pending:
                raise ShutdownRequested from None
            raise
        finally:
            self.reading = False
        # Checked here, at a point of our choosing, so a stop never interrupts a
        # delivery half-way (see shutdown()).
        if self.shutdown_pending:
            raise ShutdownRequested
        self.bytes_in += len(data)
        return data

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if not out:
            return
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

    def _sync_metrics(self) -> None:
        """Add this session's byte and command tallies to the server's counters.

        Done once per message and at the end of the session rather than on every
        read and write: the counters lag by at most one transaction, and the
        per-message cost of counting drops to a few calls.
        """
        lm = self.metrics
        if self.bytes_in != self._counted_in:
            lm.bytes_in.inc(self.bytes_in - self._counted_in)
            self._counted_in = self.bytes_in
        if self.bytes_out != self._counted_out:
            lm.bytes_out.inc(self.bytes_out - self._counted_out)
            self._counted_out = self.bytes_out
        counts = self.conn.take_counts()
        if counts:
            self.server.metrics.add_counts(counts)

    @staticmethod
    def refusal(stopping: bool) -> bytes:
        """For a client over the connection cap, or arriving during a stop."""
        return (R.SHUTTING_DOWN if stopping else R.TOO_MANY_CLIENTS).to_bytes()

    def info(self) -> dict:
        """What the admin API shows of this session (never message data or secrets)."""
        return {
            "id": self.id,
            "peer": self.peer,
            "port": self.peer_port,
            "listener": self.metrics.name,
            "state": self.conn.state.value,
            "age_seconds": round(time.monotonic() - self.started, 3),
            "user": self.conn.auth_user,
            "tls": self.conn.tls,
            "helo": self.conn.helo,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    def kick(self) -> None:
        """The administrator closes this session: 421 at its next read."""
        self.close_reply = R.KICKED
        self.shutdown()

    def shutdown(self) -> None:
        """Ask the session to end with 421 before its next read.

        A session blocked in `recv` is woken by shutting the socket's read side
        (the `recv` returns); nothing is thrown into the greenlet, so a session in
        the middle of storing a message finishes it first.
        """
        self.shutdown_pending = True
        if self.reading:
            try:
                # The plain socket's shutdown, under TLS too: SSLSocket.shutdown drops
                # the TLS state, and the 421 would then go out in the clear.
                gsocket.socket.shutdown(self.sock, socket.SHUT_RD)
            except OSError:
                pass

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        conn = self.conn
        logger.debug("session {} connect from [{}]:{}", self.id, self.peer, self.peer_port)
        try:
            if self.conn.tls:  # an implicit-TLS listener: handshake before the greeting
                self._handshake()
            greeting = conn.greeting()
            self.sock.sendall(greeting)
            self.bytes_out += len(greeting)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    self._flush()
                    # b"" when the client has closed its side: the core then
                    # answers ConnectionClosed.
                    conn.receive_data(self._read())
                elif type(event) is MessageData:
                    self.sniffer.feed(event.data)  # type: ignore[union-attr]
                    self._spool_write(event.data)
                elif type(event) is MessageStart:
                    self._start_message(event.envelope)
                elif type(event) is MessageEnd:
                    self._deliver(event.envelope, event.size)
                elif type(event) is TransactionRejected:
                    self._rejected(event)
                elif type(event) is TransactionAborted:
                    self._discard_spool()
                    self._log_transaction(
                        event.envelope, "aborted", size=event.size, reason=event.by
                    )
                elif type(event) is StartTLS:
                    self._flush()
                    self._handshake()
                    conn.tls_started()
                elif type(event) is AuthRequest:
                    self._authenticate(event.credentials)
                elif type(event) is CloseConnection:
                    self._flush()
                    code = event.reply.code if event.reply else 221
                    self.outcome = "quit" if code == 221 else "errors"
                    break
                elif type(event) is ConnectionClosed:
                    logger.debug("session {} lost the client", self.id)
                    self._flush()  # a half-closed client may still read
                    break
                else:
                    # PAUSED: every branch above gives the core its verdict before
                    # asking for the next event, so a wait here is a bug.
                    raise RuntimeError(f"the SMTP core waits for a verdict in {conn.state}")
        except ClientTimeout:
            self.outcome = "timeout"
            self._close_with(R.TIMEOUT)
        except ShutdownRequested:
            self.outcome = "kicked" if self.close_reply is R.KICKED else "shutdown"
            self._close_with(self.close_reply)
        except HandshakeFailed as exc:
            self.outcome = "tls_failed"
            logger.debug("session {}: TLS handshake failed: {}", self.id, exc)
        except OSError as exc:  # the socket: storage errors are StorageError, handled above
            self.outcome = "lost"
            logger.debug("session {} socket error: {}", self.id, exc)
        except Exception:
            # A bug in the core or in this shell: the client hears 421 (RFC 5321
            # §3.8), the log gets the traceback, other sessions go on.
            self.outcome = "error"
            logger.exception("session {} [{}]: internal error", self.id, self.peer)
            self._close_with(R.INTERNAL_ERROR)
        finally:
            self._sync_metrics()
            self.metrics.session_ended(self.outcome, time.monotonic() - self.started)
            self._discard_spool()
            envelope = self.conn.envelope
            if envelope is not None and envelope is not self.logged:
                # The session ended inside a transaction: QUIT, a lost client, a
                # timeout, a stop, a kick, too many errors.
                state = self.conn.closed_in or self.conn.state
                size = self.conn.message_size if state in (State.DATA, State.BDAT) else 0
                self._log_transaction(
                    envelope, "aborted", size=size, stage=state.name, reason=self.outcome
                )
            try:
                self.sock.close()
            except OSError:
                pass
            logger.debug(
                "session {} closed after {:.3f}s, in={} out={}",
                self.id,
                time.monotonic() - self.started,
                self.bytes_in,
                self.bytes_out,
            )

    def _close_with(self, reply: R.Reply) -> None:
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

    # ------------------------------------------------------ TLS and AUTH

    def _handshake(self) -> None:
        context = self.server.tls_context
        assert context is not None
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

    def _authenticate(self, credentials: Credentials) -> None:
        """Check a login in the threadpool; failures are delayed, then disconnected.

        The check is counted before it runs (the threadpool yields), so parallel
        connections from one client get `max_failures` checks between them: a
        check that could go over the allowance waits for one of the client's
        running checks to end; a client at the limit gets 421 without a check.
        """
        server = self.server
        throttle = server.auth_throttle
        deadline = time.monotonic() + server.config.timeouts.command
        attempt = throttle.reserve(self.peer)
        while attempt == BUSY and time.monotonic() < deadline:
            server.auth_checks.wait(deadline - time.monotonic())
            attempt = throttle.reserve(self.peer)
        if attempt is None or attempt == BUSY:
            server.metrics.auth_failure.inc()
            logger.warning(
                "session {}: [{}] authentication refused: too many failures", self.id, self.peer
            )
            self.conn.close_with(R.TOO_MANY_AUTH_FAILURES)
            return
        user = None
        try:
            user = server.run_blocking(server.users.verify, credentials.login, credentials.password)
        finally:
            # The outcome is counted (a check that never ended, as a failure),
            # then the client's waiting checks may ask again.
            if user is not None:
                throttle.succeeded(self.peer)
            else:
                delay, disconnect = throttle.failed(self.peer, attempt)
            server.auth_checks.pulse()
        if user is not None:
            server.metrics.auth_success.inc()
            logger.info(
                "session {}: [{}] authenticated as {} ({})",
                self.id,
                self.peer,
                user,
                credentials.mechanism,
            )
            self.conn.auth_result(user)
            return
        server.metrics.auth_failure.inc()
        # The login name is part of the AUTH arguments: it is not logged either.
        logger.warning("session {}: [{}] authentication failed", self.id, self.peer)
        self._flush()
        gevent.sleep(delay)
        self.conn.auth_result(None)
        if disconnect:
            self.conn.close_with(R.TOO_MANY_AUTH_FAILURES)

    # ----------------------------------------------------------- messages

    def _start_message(self, envelope: Envelope) -> None:
        self.data_started = time.monotonic()
        self._discard_spool()
        self.queue_id = new_queue_id()
        self.sniffer = MessageIdSniffer()
        try:
            self.spool = self.server.spool.open()
        except StorageError as exc:
            self._spool_failed(exc)
            return
        self._spool_write(
            trace_headers(
                envelope,
                hostname=self.server.config.hostname,
                client_ip=self.peer,
                queue_id=self.queue_id,
                date=received_date(),
                tls=envelope.tls,
                authenticated=envelope.auth_user is not None,
            )
        )

    def _spool_write(self, data: bytes) -> None:
        try:
            self.spool.write(data)  # type: ignore[union-attr]  # opened at MessageStart
        except StorageError as exc:
            self._spool_failed(exc)

    def _spool_failed(self, error: StorageError) -> None:
        """The spool cannot take the message: read it to its end, then answer 4xx.

        The client is in the middle of DATA and cannot be answered before the
        end of it (RFC 5321 §4.1.1.4); the partial file is removed at once so the
        space it took is free again.
        """
        logger.error("session {}: cannot spool the message: {}", self.id, error)
        if self.spool is not None:
            self.spool.discard()
        self.spool = _FailedSpool(error)

    def _deliver(self, envelope: Envelope, size: int) -> None:
        """Hand the whole message to the pipeline; answer what it decides."""
        spool, self.spool = self.spool, None
        queue_id = self.queue_id or ""
        metrics = self.server.metrics
        started = time.perf_counter()
        stages = None
        if isinstance(spool, _FailedSpool) or spool is None:
            error = spool.error if spool is not None else None
            verdict = Verdict(False, True, str(error), no_space=bool(error and error.no_space))
        else:
            message = Message(
                envelope,
                spool,
                queue_id,
                size,
                self.peer,
                self.listener.role,
                # The client waits for the reply to its final dot (RFC 5321
                # §4.5.3.2.6: 10 minutes); filters waiting for a slot stop here.
                deadline=time.monotonic() + self.server.config.timeouts.data_total,
            )
            verdict = self.server.pipeline.process(message)
            stages = ",".join(map(str, message.verdicts)) or None
        if not verdict.delivered:
            if verdict.code is not None:
                reply = R.refused_by_stage(verdict.code, verdict.status, verdict.text)
            elif verdict.no_space:
                reply = R.INSUFFICIENT_STORAGE
            else:
                reply = R.LOCAL_ERROR
            if verdict.stage is not None and verdict.code is not None:
                # A filter's judgement (or its failure policy, logged by the stage).
                logger.info("session {}: refused ({}): {}", self.id, reply.code, verdict.reason)
            else:
                logger.error(
                    "session {}: delivery failed ({}): {}", self.id, reply.code, verdict.reason
                )
            self.conn.message_failed(reply)
            metrics.messages_rejected.labels(
                "filter" if verdict.code is not None else "storage"
            ).inc()
            self._log_transaction(envelope, reply.code, size=size, queue=queue_id, stages=stages)
            return
        metrics.delivery_seconds.observe(time.perf_counter() - started)
        metrics.messages_accepted.inc()
        metrics.recipients.inc(len(envelope.recipients))
        metrics.message_size.observe(size)
        self.conn.message_stored(queue_id)
        self._log_transaction(envelope, 250, size=size, queue=queue_id, stages=stages)
        self._sync_metrics()

    def _rejected(self, event: TransactionRejected) -> None:
        self.server.metrics.messages_rejected.labels(event.stage).inc()
        if event.stage == "RCPT":  # the transaction goes on; its line lists the refusal
            self.refused.append(f"<{event.address}>:{event.reply.code}")
            return
        if event.stage == "MAIL":  # no transaction was opened: this is its one line
            self._access(None, event.reply.code, stage="MAIL", **{"from": f"<{event.address}>"})
            return
        self._discard_spool()
        assert event.envelope is not None
        self._log_transaction(event.envelope, event.reply.code, size=event.size, stage=event.stage)

    def _discard_spool(self) -> None:
        if self.spool is not None:
            self.spool.discard()
            self.spool = None

    def _log_transaction(
        self, envelope: Envelope, result: int | str, size: int = 0, **extra: str | None
    ) -> None:
        """The one access-log line of a transaction, with how it ended."""
        refused, self.refused = self.refused, []
        sniffer, self.sniffer = self.sniffer, None
        msgid = None
        if sniffer is not None:
            sniffer.close()
            msgid = sniffer.message_id
        self.logged = envelope
        self._access(
            envelope, result, refused=refused or None, size=size or None, msgid=msgid, **extra
        )

    def _access(self, envelope: Envelope | None, result: int | str, **extra) -> None:  # type: ignore[no-untyped-def]
        conn = self.conn
        fields: dict = {
            "session": self.id,
            "client": self.peer,
            "helo": conn.helo,
            "user": conn.auth_user,
            "tls": "yes" if conn.tls else None,
        }
        if envelope is not None:
            fields["from"] = f"<{envelope.sender_address}>"
            fields["to"] = [f"<{r.mailbox.address}>" for r in envelope.recipients] or None
        fields.update(extra)
        logs.access_log.write(logs.access_line(**fields, result=str(result)))


class _FailedSpool:
    """Stands in for a spool that failed; the rest of the message is read and refused."""

    def __init__(self, error: StorageError) -> None:
        self.error = error

    def write(self, data: bytes) -> None:
        pass

    def discard(self) -> None:
        pass
