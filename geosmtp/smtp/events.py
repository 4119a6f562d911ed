"""The events the SMTP core gives its shell (see `session.py` for when each
comes and which verdict it asks for): immutable values."""

from __future__ import annotations

from dataclasses import dataclass

from ..mail import Envelope
from ..protocol import Reply, sasl


@dataclass(frozen=True)
class MessageStart:
    """The message of `envelope` begins (354 sent, or its first BDAT chunk)."""

    envelope: Envelope


@dataclass(frozen=True)
class MessageData:
    """A piece of the message: dot-unstuffed, LF line ends."""

    data: bytes


@dataclass(frozen=True)
class MessageEnd:
    """The message is complete; the connection waits for the shell's verdict."""

    envelope: Envelope
    #: octets of message data with CRLF line ends, not counting the dots doubled
    #: for transparency nor the final "." line (RFC 1870 §3)
    size: int


@dataclass(frozen=True)
class TransactionRejected:
    """A sender, a recipient or a message was refused with `reply`."""

    envelope: Envelope | None
    reply: Reply
    stage: str  # "MAIL", "RCPT", "DATA", "BDAT"
    address: str | None = None  # the refused sender (MAIL) or recipient (RCPT)
    size: int = 0  # of the refused message (DATA, BDAT), as in MessageEnd


@dataclass(frozen=True)
class TransactionAborted:
    """The client abandoned the transaction of `envelope`."""

    envelope: Envelope
    by: str  # the verb that abandoned it: "RSET", "EHLO", "HELO"
    size: int = 0  # of the message data received so far (BDAT)


@dataclass(frozen=True)
class StartTLS:
    """220 is queued: the shell does the handshake, then calls `tls_started()`."""


@dataclass(frozen=True)
class AuthRequest:
    """Credentials to check; the shell answers with `auth_result()`."""

    credentials: sasl.Credentials
