"""The sans-I/O SMTP protocol core: bytes in, replies and events out.

Imports only the standard library and the pure mail domain (`geosmtp.mail`);
no sockets, gevent, yaml, loguru or files.
"""

from .events import (
    AuthRequest,
    MessageData,
    MessageEnd,
    MessageStart,
    StartTLS,
    TransactionAborted,
    TransactionRejected,
)
from .parser import SyntaxProblem
from .policy import RecipientPolicy
from .replies import Reply
from .session import (
    NEED_DATA,
    PAUSED,
    ClientRates,
    CloseConnection,
    ConnectionClosed,
    Extensions,
    Limits,
    Security,
    SMTPConnection,
)
from .state import ProtocolError, State, Step

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthRequest",
    "ClientRates",
    "CloseConnection",
    "ConnectionClosed",
    "Extensions",
    "Limits",
    "MessageData",
    "MessageEnd",
    "MessageStart",
    "ProtocolError",
    "RecipientPolicy",
    "Reply",
    "SMTPConnection",
    "Security",
    "StartTLS",
    "State",
    "Step",
    "SyntaxProblem",
    "TransactionAborted",
    "TransactionRejected",
]
