"""The sans-I/O SMTP protocol core: bytes in, replies and events out.

Imports only the standard library, the shared protocol base
(`geosmtp.protocol`: the contract's sentinels, `CloseConnection`,
`ConnectionClosed`, `ProtocolError`, the reply values, SASL) and the pure
mail domain (`geosmtp.mail`); no sockets, gevent, yaml, loguru or files.
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
from .session import (
    ClientRates,
    Extensions,
    Limits,
    Security,
    SMTPConnection,
)
from .state import State, Step

__all__ = [
    "AuthRequest",
    "ClientRates",
    "Extensions",
    "Limits",
    "MessageData",
    "MessageEnd",
    "MessageStart",
    "RecipientPolicy",
    "SMTPConnection",
    "Security",
    "StartTLS",
    "State",
    "Step",
    "SyntaxProblem",
    "TransactionAborted",
    "TransactionRejected",
]
