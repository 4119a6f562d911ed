"""The gevent side of an LMTP session (RFC 2033): the SMTP session's, with
one reply per recipient.

`LMTPSession` runs the LMTP core (`geosmtp.lmtp`) as `SMTPSession` runs the
SMTP one: the same reads, spool, pipeline and access log. What differs:

- on TCP, a client that is neither in `trusted_networks` nor, when there is
  none, on loopback gets `421 4.7.0` before the greeting and is closed: LMTP
  has no AUTH, so the listener is the one guard (a UNIX socket's is its mode);
- no client rates nor error budget (`client_limits`): the client is the MTA
  in front, which applied them;
- the message goes through the pipeline with one delivery per mailbox
  (`Pipeline.process_each`): the core gets one reply per recipient, a `250`
  only for a mailbox that has the message durably, a `4xx` for one whose
  delivery failed (the client tries that recipient again), and the stages'
  refusal for every recipient when a stage refuses the message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from loguru import logger

from ..lmtp import LMTPConnection, delivered
from ..logs import LineBudget, held_back
from ..pipeline import Verdict
from ..protocol import Reply
from ..smtp import replies as R
from .smtp import SMTPSession, ran

if TYPE_CHECKING:
    from ..config import Listener
    from ..mail import Envelope
    from .anvil import ClientRates
    from .host import Host


def build_core(
    host: Host, listener: Listener, peer: str, rates: ClientRates | None = None
) -> LMTPConnection:
    """The LMTP core for a new client on `listener`, with the app's settings of
    the moment (no AUTH, no TLS: the listener's place guards it; no rates)."""
    return LMTPConnection(
        host.config.hostname, host.policy, host.limits, host.extensions, vrfy=host.config.vrfy
    )


#: The WARNING lines for refused TCP clients, per worker: a stranger that
#: reaches the listener cannot fill the log (`logs.LineBudget`, as for the
#: PROXY refusals); `geosmtp_sessions_total{outcome="refused"}` counts all.
REFUSAL_LINES = LineBudget(10, 6.0)


class LMTPSession(SMTPSession):
    PROTOCOL = "lmtp"

    conn: LMTPConnection

    def _serve(self) -> None:
        if self.listener.path is None and not self.server.lmtp_client_allowed(self.peer):
            held = REFUSAL_LINES.take()
            if held is not None:
                logger.warning(
                    "session {}: [{}] refused on the lmtp listener: neither in "
                    "trusted_networks nor (without them) on loopback{}",
                    self.id,
                    self.peer,
                    held_back(held),
                )
            self._send(R.LMTP_NOT_ALLOWED.to_bytes())
            self.outcome = "refused"
            return
        super()._serve()

    def _error_budget_used(self) -> bool:
        """No budget across sessions (`client_limits.max_errors`) on LMTP: its
        client is the MTA in front. `limits.max_errors` still ends a session."""
        self.errors_counted = self.conn.errors
        return False

    def _deliver(self, envelope: Envelope, size: int) -> None:
        """Hand the message to the pipeline, one delivery per mailbox; answer
        each recipient with its own outcome, in RCPT order (RFC 2033 §4.2)."""
        spool, self.spool = self.spool, None
        queue_id = self.queue_id or ""
        started = time.perf_counter()
        count = len(envelope.recipients)
        message = self._message(envelope, spool, queue_id, size)
        if isinstance(message, Verdict):
            verdicts, (stages, auth_results) = [message] * count, self.NOT_RUN
        else:
            verdicts = self.server.pipeline.process_each(message)
            stages, auth_results = ran(message)
        replies: list[Reply] = []
        failures: list[str] = []
        for recipient, verdict in zip(envelope.recipients, verdicts, strict=True):
            address = recipient.mailbox.address
            if verdict.delivered:
                replies.append(delivered(queue_id, address))
                continue
            reply = self._refusal(verdict, address)
            replies.append(reply)
            failures.append(f"<{address}>:{reply.code}")
        self.conn.recipients_delivered(replies)
        done = count - len(failures)
        if done:
            self._count_accepted(started, done, size)
        else:
            first = next(v for v in verdicts if not v.delivered)
            self.server.metrics.messages_rejected.labels(first.group or "storage").inc()
        self._log_transaction(
            envelope,
            250 if done else replies[0].code,
            size=size,
            queue=queue_id,
            stages=stages,
            failed=",".join(failures) or None,
            **auth_results,
        )
        self._sync_metrics()

    def _access(self, envelope: Envelope | None, result: int | str, **extra: Any) -> None:
        super()._access(envelope, result, proto="lmtp", **extra)
