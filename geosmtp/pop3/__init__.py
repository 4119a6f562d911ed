"""The sans-I/O POP3 protocol core: bytes in, replies and events out.

Imports only the standard library and the SMTP core's pure pieces it shares
(the connection base `SansIOConnection`, the SASL exchange and the SMTP
replies it refuses with, which `replies` words as `-ERR` lines,
`ProtocolError`, the `NEED_DATA`/`PAUSED` sentinels); no sockets, gevent,
yaml, loguru or files. `stuffing` turns a stored message
into what RETR and TOP send.
"""

from .session import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    CloseConnection,
    ConnectionClosed,
    Listing,
    LoginFailure,
    POP3Connection,
    POP3Security,
    Retrieve,
    StartTLS,
    Update,
)
from .state import ProtocolError, State
from .stuffing import MessageEncoder, virtual_size

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthRequest",
    "CloseConnection",
    "ConnectionClosed",
    "Listing",
    "LoginFailure",
    "MessageEncoder",
    "POP3Connection",
    "POP3Security",
    "ProtocolError",
    "Retrieve",
    "StartTLS",
    "State",
    "Update",
    "virtual_size",
]
