"""The sans-I/O SMTP protocol core: bytes in, replies and events out.

Imports only the standard library; no sockets, gevent, yaml, loguru or files.
"""

from .parser import Mailbox, SyntaxProblem
from .policy import Recipient, RecipientPolicy, safe_mailbox_name
from .replies import Reply
from .session import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    CloseConnection,
    Envelope,
    Extensions,
    Limits,
    MessageData,
    MessageEnd,
    MessageStart,
    Security,
    SMTPConnection,
    StartTLS,
    TransactionAborted,
    TransactionRejected,
)
from .state import State

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthRequest",
    "CloseConnection",
    "Envelope",
    "Extensions",
    "Limits",
    "Mailbox",
    "MessageData",
    "MessageEnd",
    "MessageStart",
    "Recipient",
    "RecipientPolicy",
    "Reply",
    "SMTPConnection",
    "Security",
    "StartTLS",
    "State",
    "SyntaxProblem",
    "TransactionAborted",
    "TransactionRejected",
    "safe_mailbox_name",
]
