"""The sans-I/O POP3 protocol core: bytes in, replies and events out.

Imports only the standard library and the shared protocol base
(`geosmtp.protocol`: the contract's sentinels, `CloseConnection`,
`ConnectionClosed`, `ProtocolError`, the reply values, SASL), never the SMTP
core; no sockets, gevent, yaml, loguru or files. `stuffing` turns a stored message
into what RETR and TOP send.
"""

from .session import (
    AuthRequest,
    Listing,
    LoginFailure,
    POP3Connection,
    POP3Security,
    Retrieve,
    StartTLS,
    Update,
)
from .state import State
from .stuffing import MessageEncoder, virtual_size

__all__ = [
    "AuthRequest",
    "Listing",
    "LoginFailure",
    "MessageEncoder",
    "POP3Connection",
    "POP3Security",
    "Retrieve",
    "StartTLS",
    "State",
    "Update",
    "virtual_size",
]
