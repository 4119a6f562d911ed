"""The sans-I/O LMTP server session (RFC 2033), a small subclass of the SMTP one.

LMTP is SMTP between a mail transfer agent and the store that keeps the
mailboxes. What differs, and is all this module holds:

- the greeting names LMTP, and the client greets with `LHLO`, answered as
  EHLO is; `EHLO` and `HELO` get `500 5.5.1` (RFC 2033 §4.1);
- no STARTTLS, no AUTH, no DSN: the client is a local MTA, let in by the
  listener (loopback, `trusted_networks`, a UNIX socket's mode);
- recipients are local: LMTP never relays, a recipient in another domain gets
  `550 5.1.1`;
- after the end of the message (the final dot, or `BDAT ... LAST`) comes one
  reply per accepted recipient, in the order of the RCPT commands (RFC 2033
  §4.2): the shell's verdict is `recipients_delivered()`, one reply each.

Everything else (MAIL, RCPT, DATA, BDAT, RSET, NOOP, QUIT, VRFY, HELP, the
limits, the events, the contract with the shell) is the SMTP core's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..mail import Mailbox, Recipient
from ..protocol import Reply
from ..smtp import replies as R
from ..smtp import rules
from ..smtp.policy import RecipientPolicy
from ..smtp.rules import Rule
from ..smtp.session import Extensions, Limits, Security, SMTPConnection
from ..smtp.state import State, Step

#: The per-recipient 250 after the data (LMTP's wording is in `smtp/replies.py`).
delivered = R.lmtp_delivered


@dataclass(frozen=True)
class LocalOnly(RecipientPolicy):
    """The server's recipient policy as LMTP applies it: it never relays, and
    a recipient outside the local domains gets `550 5.1.1`."""

    def resolve(self, mailbox: Mailbox, may_relay: bool = False) -> Recipient | Reply:
        resolved = super().resolve(mailbox, may_relay=False)
        return R.NOT_LOCAL if resolved is R.RELAY_DENIED else resolved


def local_only(policy: RecipientPolicy) -> LocalOnly:
    """`policy` as LMTP applies it."""
    if isinstance(policy, LocalOnly):
        return policy
    fields = dataclasses.fields(policy)
    return LocalOnly(**{f.name: getattr(policy, f.name) for f in fields if f.init})


def _in_lmtp_words(rule: Rule) -> Rule:
    """An SMTP rule with LMTP's refusal for a client that has not greeted yet."""
    refused: Mapping[State, Reply] = {
        s: R.LHLO_FIRST if r is R.BAD_SEQUENCE_HELO else r for s, r in rule.refused.items()
    }
    return dataclasses.replace(rule, refused=refused)


def _never(conn: rules.SMTPConnection) -> bool:
    return False


class LMTPConnection(SMTPConnection):
    """One LMTP server session: the SMTP core's, with the differences above.

    Built by the shell per client with the server's `hostname`, the recipient
    `policy` (applied as `LocalOnly`), `limits` and `extensions` (STARTTLS,
    AUTH and DSN are switched off here whatever they say). The shell's
    verdict on a `MessageEnd` is `recipients_delivered()`; `message_stored()`
    and `message_failed()` give every recipient the same outcome.
    """

    def __init__(
        self,
        hostname: str,
        policy: RecipientPolicy,
        limits: Limits | None = None,
        extensions: Extensions | None = None,
        *,
        vrfy: bool = False,
    ) -> None:
        extensions = dataclasses.replace(
            extensions or Extensions(), starttls=False, auth=False, dsn=False
        )
        super().__init__(hostname, local_only(policy), limits, extensions, Security(), vrfy=vrfy)

    def banner(self) -> Reply:
        return R.lmtp_greeting(self.hostname)

    def _do_LHLO(self, arg: bytes) -> None:
        self._greet(arg, esmtp=True, verb="LHLO")

    def _do_EHLO(self, arg: bytes) -> None:
        self._error(R.LHLO_ONLY)

    # ------------------------------------------------ the shell's verdicts

    def recipients_delivered(self, replies: Sequence[Reply]) -> None:
        """The shell's verdict on a `MessageEnd`: one reply per recipient the
        envelope holds, in its order (the RCPT order): a 2xx when the message
        is durable in that recipient's mailbox (or in the queue), a 4xx when
        the client should try that recipient again, a 5xx when it never will
        be delivered. They are queued in that order (RFC 2033 §4.2), each
        4xx or 5xx counted as an error as SMTP's `message_failed()` is (a
        session over `limits.max_errors` is closed after the last of them);
        the transaction is over, as after SMTP's `message_stored()`.

        Only while the connection waits for it (`DELIVERING`), with as many
        replies as recipients, each a 2xx, 4xx or 5xx; else `ProtocolError`.
        """
        envelope = self.envelope
        if self.state is State.DELIVERING and envelope is not None:
            if len(replies) != len(envelope.recipients):
                raise self._misuse(
                    f"{len(replies)} replies for {len(envelope.recipients)} recipients"
                )
            if any(not (200 <= r.code < 300 or 400 <= r.code < 600) for r in replies):
                raise self._misuse("a recipient's reply is not a 2xx, 4xx or 5xx")
        self._verdict(Step.MESSAGE_STORED, replies)

    def message_stored(self, queue_id: str) -> None:
        """Every recipient's mailbox has the message: a 250 for each."""
        envelope = self.envelope
        recipients = envelope.recipients if envelope is not None else ()
        self.recipients_delivered([delivered(queue_id, r.mailbox.address) for r in recipients])

    def message_failed(self, reply: Reply = R.LOCAL_ERROR) -> None:
        """No recipient's mailbox has the message: `reply` (a 4xx or 5xx) for each."""
        if not 400 <= reply.code < 600:
            raise self._misuse(f"message_failed() with a {reply.code} reply")
        envelope = self.envelope
        recipients = envelope.recipients if envelope is not None else ()
        self.recipients_delivered([reply] * len(recipients))

    #: LHLO first (HELP's order), then the SMTP verbs less STARTTLS and AUTH,
    #: in LMTP's words; EHLO and HELO stay known, to be refused (500 5.5.1),
    #: and are never listed.
    COMMANDS: ClassVar[Mapping[str, Rule]] = {
        "LHLO": Rule(_do_LHLO),
        **{
            verb: _in_lmtp_words(rule)
            for verb, rule in SMTPConnection.COMMANDS.items()
            if verb not in ("STARTTLS", "AUTH", "EHLO", "HELO")
        },
        "EHLO": Rule(_do_EHLO, offered=_never),
        "HELO": Rule(_do_EHLO, offered=_never),
    }
