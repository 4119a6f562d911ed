"""The gevent side of an SMTP session: socket in, core, socket out.

One `SMTPSession` per client, run in its own greenlet. It reads with the
socket's own timeout (`stream.StreamSession`: what is left of the command
timeout for the line being read, or in DATA the smaller of the block timeout
and what is left of the total), feeds the sans-I/O core, writes the replies
the core queued, and acts on the core's events: spool the message to disk as
it arrives, deliver it, log it. All protocol decisions are the core's.

Three kinds of failure are told apart, and handled in different places: an
`OSError` from the socket is a lost client (`StreamSession.run`); a
`StorageError` from the spool or the delivery is caught where the message is
written: the rest of the message is read and refused with `452 4.3.1` (no
room) or `451 4.3.0`, and the session goes on; any other exception is a bug,
caught at the session boundary (`StreamSession.run`): `421 4.3.0` to the
client and the traceback in the log, nothing else affected. The access log
gets exactly one line per transaction (`_log_transaction`: stored, refused,
abandoned, or cut off when the session ends inside one).
"""

from __future__ import annotations

import email.utils
import socket
import time
from typing import TYPE_CHECKING, Any, ClassVar, cast

import gevent
from loguru import logger

from .. import logs
from ..mail.headers import MessageIdSniffer
from ..mail.ids import new_queue_id
from ..pipeline import Message, Verdict
from ..protocol import NEED_DATA, CloseConnection, ConnectionClosed, Reply, ReplyValue
from ..smtp import (
    AuthRequest,
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
from ..storage.spool import without_return_paths
from .anvil import ClientRates
from .shared import CONNECTION_RATE, CONNECTIONS, ERRORS
from .stream import StreamSession

if TYPE_CHECKING:
    from ..config import Listener
    from ..mail import Envelope
    from ..metrics import ListenerMetrics
    from ..protocol.sasl import Credentials
    from .host import Host

_last_date: tuple[int, str] = (-1, "")


def received_date() -> str:
    """Now as an RFC 5322 date-time in local time, for `Received:`; made once a second."""
    global _last_date
    now = int(time.time())
    if _last_date[0] != now:
        _last_date = (now, email.utils.formatdate(now, localtime=True))
    return _last_date[1]


def build_core(
    host: Host, listener: Listener, peer: str, rates: ClientRates | None = None
) -> SMTPConnection:
    """The SMTP core for a new client on `listener`, with the app's settings of
    the moment; `rates` counts the client's messages and recipients (client_limits)."""
    return SMTPConnection(
        host.config.hostname,
        host.policy,
        host.limits,
        host.extensions,
        host.security(listener, peer),
        vrfy=host.config.vrfy,
        rates=rates,
    )


def ran(message: Message) -> tuple[str | None, dict[str, str]]:
    """What the pipeline's run left on `message` for the access line: its
    stages' verdicts (`stages=`), and the sender checks' results."""
    return ",".join(map(str, message.verdicts)) or None, message.auth_results


class SMTPSession(StreamSession):
    """An SMTP session; its core is the one its listener's role speaks
    (`protocols.Protocols.build`)."""

    def __init__(
        self,
        server: Host,
        sock: socket.socket,
        address: tuple,
        listener: Listener,
        metrics: ListenerMetrics,
        client_key: int = 0,
    ) -> None:
        super().__init__(server, sock, address, listener, metrics, client_key)
        rates = ClientRates(server.anvil, client_key, self.peer) if client_key else None
        self.conn: SMTPConnection = cast(
            SMTPConnection, server.protocols.build(listener, self.peer, server, rates=rates)
        )
        self.errors_counted = 0  # of conn.errors, those added to the client's budget
        self.spool: SpoolFile | _FailedSpool | None = None
        self.queue_id: str | None = None
        self.sniffer: MessageIdSniffer | None = None  # the current message's Message-ID
        # The access log has one line per transaction: refused recipients wait
        # here for it, and the envelope whose line is written is remembered.
        self.refused: list[str] = []
        self.logged: Envelope | None = None
        self.data_started = 0.0

    # -------------------------------------------------------------- I/O

    def _timeout(self) -> float:
        timeouts = self.server.config.timeouts
        if self.conn.in_data:
            left = timeouts.data_total - (time.monotonic() - self.data_started)
            return max(0.0, min(timeouts.data_block, left))
        return timeouts.command

    def _waits_for_command(self) -> bool:
        return not self.conn.in_data

    def _sync_metrics(self) -> None:
        """Add this session's byte and command tallies to the server's counters.

        Done once per message and at the end of the session rather than on every
        read and write: the counters lag by at most one transaction, and the
        per-message cost of counting drops to a few calls.
        """
        self._sync_bytes()
        counts = self.conn.take_counts()
        if counts:
            self.server.metrics.add_counts(counts)

    REFUSALS: ClassVar[dict[str, ReplyValue]] = {
        "stopping": R.SHUTTING_DOWN,
        "busy": R.TOO_MANY_CLIENTS,
        CONNECTIONS: R.CLIENT_CONNECTIONS,
        CONNECTION_RATE: R.CLIENT_CONNECTION_RATE,
        ERRORS: R.CLIENT_ERRORS,
    }

    def info(self) -> dict:
        """What the admin API shows of this session (never message data or secrets)."""
        return {
            "id": self.id,
            "protocol": self.PROTOCOL,
            "peer": self.peer,
            "port": self.peer_port,
            "listener": self.metrics.name,
            "state": self.conn.state.value,
            "age_seconds": self._age(),
            "user": self.conn.auth_user,
            "tls": self.conn.tls,
            "helo": self.conn.helo,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    # ------------------------------------------------------------ the loop

    CLOSING: ClassVar[dict[str, ReplyValue]] = {
        "timeout": R.TIMEOUT,
        "shutdown": R.SHUTTING_DOWN,
        "kicked": R.KICKED,
        "error": R.INTERNAL_ERROR,
    }
    PROTOCOL = "smtp"

    def _serve(self) -> None:
        conn = self.conn
        if conn.tls:  # an implicit-TLS listener: handshake before the greeting
            self._handshake()
        greeting = conn.greeting()
        self.sock.sendall(greeting)
        self.bytes_out += len(greeting)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if conn.errors != self.errors_counted and self._error_budget_used():
                    conn.close_with(R.CLIENT_ERRORS)
                    continue
                self._flush()
                # b"" when the client has closed its side: the core then
                # answers ConnectionClosed.
                conn.receive_data(self._read())
            elif type(event) is MessageData:
                self.sniffer.feed(event.data)  # type: ignore[union-attr]  # set at MessageStart
                self._spool_write(event.data)
            elif type(event) is MessageStart:
                self._start_message(event.envelope)
            elif type(event) is MessageEnd:
                self._deliver(event.envelope, event.size)
            elif type(event) is TransactionRejected:
                self._rejected(event)
            elif type(event) is TransactionAborted:
                self._discard_spool()
                self._log_transaction(event.envelope, "aborted", size=event.size, reason=event.by)
            elif type(event) is StartTLS:
                self._flush()
                self._handshake()
                conn.tls_started()
            elif type(event) is AuthRequest:
                self._authenticate(event.credentials)
            elif type(event) is CloseConnection:
                self._flush()
                reply = event.reply
                code = reply.code if isinstance(reply, Reply) else 221
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

    def _error_budget_used(self) -> bool:
        """Add the session's new error replies to its client's budget
        (client_limits.max_errors, over all its sessions): whether the
        budget is used up, and the session is to end. A logged-in client's
        errors are not counted; nor is the session ended in message data."""
        conn = self.conn
        new, self.errors_counted = conn.errors - self.errors_counted, conn.errors
        if conn.auth_user is not None or conn.in_data:
            return False
        return self.server.anvil.add_errors(self.client_key, new, self.peer)

    def _ended(self) -> None:
        if self.conn.errors != self.errors_counted:
            # The last replies' errors (a session that limits.max_errors ended
            # with one pipelined batch of bad commands counts them too).
            self._error_budget_used()
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

    # ------------------------------------------------------ TLS and AUTH

    def _authenticate(self, credentials: Credentials) -> None:
        """Check a login (`Host.logins`); a failure's reply is held, then may disconnect."""
        login = self.server.logins.check(self.id, self.peer, credentials)
        if login.throttled:
            self.conn.close_with(R.TOO_MANY_AUTH_FAILURES)
            return
        if login.user is not None:
            self.conn.auth_result(login.user)
            return
        self._flush()
        gevent.sleep(login.delay)
        self.conn.auth_result(None)
        if login.disconnect:
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
                protocol=self.PROTOCOL,
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

    def _message(
        self,
        envelope: Envelope,
        spool: SpoolFile | _FailedSpool | None,
        queue_id: str,
        size: int,
    ) -> Message | Verdict:
        """The spooled message for the pipeline, or the verdict on a spool
        that failed (every recipient's: a 4xx, or 452/552 with no space)."""
        if isinstance(spool, SpoolFile):
            spool = self._own_return_path_only(spool)
        if isinstance(spool, _FailedSpool) or spool is None:
            error = spool.error if spool is not None else None
            return Verdict(False, True, str(error), no_space=bool(error and error.no_space))
        return Message(
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

    def _deliver(self, envelope: Envelope, size: int) -> None:
        """Hand the whole message to the pipeline; answer what it decides."""
        spool, self.spool = self.spool, None
        queue_id = self.queue_id or ""
        started = time.perf_counter()
        message = self._message(self._reports_allowed(envelope), spool, queue_id, size)
        if isinstance(message, Verdict):
            verdict, (stages, auth_results) = message, self.NOT_RUN
        else:
            verdict = self.server.pipeline.process(message)
            stages, auth_results = ran(message)
        if not verdict.delivered:
            reply = self._refusal(verdict)
            self.conn.message_failed(reply)
            self.server.metrics.messages_rejected.labels(verdict.group or "storage").inc()
            self._log_transaction(
                envelope, reply.code, size=size, queue=queue_id, stages=stages, **auth_results
            )
            return
        self._count_accepted(started, len(envelope.recipients), size)
        self.conn.message_stored(queue_id)
        self._log_transaction(
            envelope, 250, size=size, queue=queue_id, stages=stages, **auth_results
        )
        self._sync_metrics()

    #: A message the pipeline never saw (its spool failed): no stages, no results.
    NOT_RUN: ClassVar[tuple[None, dict[str, str]]] = (None, {})

    def _count_accepted(self, started: float, recipients: int, size: int) -> None:
        """A message stored for `recipients` mailboxes: the server's counters."""
        metrics = self.server.metrics
        metrics.delivery_seconds.observe(time.perf_counter() - started)
        metrics.messages_accepted.inc()
        metrics.recipients.inc(recipients)
        metrics.message_size.observe(size)

    def _refusal(self, verdict: Verdict, address: str | None = None) -> Reply:
        """The reply to a verdict that is not a delivery (for the recipient
        `address`, else the whole message), logged: a stage's judgement at
        INFO, a failure to deliver at ERROR."""
        reply = self._failure_reply(verdict)
        to = f" <{address}>" if address else ""
        if verdict.stage is not None and verdict.code is not None:
            # A filter's judgement (or its failure policy, logged by the stage).
            logger.info("session {}:{} refused ({}): {}", self.id, to, reply.code, verdict.reason)
        else:
            logger.error(
                "session {}: delivery{} failed ({}): {}",
                self.id,
                f" to{to}" if to else "",
                reply.code,
                verdict.reason,
            )
        return reply

    @staticmethod
    def _failure_reply(verdict: Verdict) -> Reply:
        """The reply for a pipeline's failure: a stage's own, else 452 for a
        full disk, else 451."""
        if verdict.code is not None:
            return R.refused_by_stage(verdict.code, verdict.status, verdict.text)
        if verdict.no_space:
            return R.INSUFFICIENT_STORAGE
        return R.LOCAL_ERROR

    def _reports_allowed(self, envelope: Envelope) -> Envelope:
        """The envelope as the pipeline gets it: a client that is neither logged
        in nor trusted gets no success or delay report (NOTIFY=SUCCESS, DELAY),
        since its reverse-path can be anyone's. RFC 3461 lets a server pass a
        message on without the reports it cannot give; the RCPT had its 250."""
        if self.conn.may_relay:
            return envelope
        allowed = envelope.without_trusted_notify()
        if allowed is not envelope:
            logger.debug(
                "session {}: NOTIFY=SUCCESS/DELAY not honoured for <{}>: the client "
                "has not logged in and is not trusted",
                self.id,
                envelope.sender_address,
            )
        return allowed

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

    def _own_return_path_only(self, spool: SpoolFile) -> SpoolFile | _FailedSpool:
        """The message without the `Return-Path:` fields the client wrote (rare:
        the sniffer saw one, or could not look through the whole header
        section); the server's own, on the first line, stays."""
        sniffer = self.sniffer
        if sniffer is None:
            return spool
        sniffer.close()
        if not sniffer.return_path:
            return spool
        try:
            spool.flush()
            new = without_return_paths(self.server.spool, spool)
        except StorageError as exc:
            spool.remove()
            logger.error("session {}: cannot spool the message: {}", self.id, exc)
            return _FailedSpool(exc)
        if new is None:
            return spool
        spool.remove()
        return new

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

    def _access(self, envelope: Envelope | None, result: int | str, **extra: Any) -> None:
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
