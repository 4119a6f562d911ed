"""What every sans-I/O server core shares (SMTP, POP3, LMTP): the connection
mechanics, the events and sentinels of the contract with the shell, the
reply values, SASL and `ProtocolError`.

Pure: imports only the standard library; no sockets, gevent, yaml, loguru,
files or config. A core imports this package (and `geosmtp.mail`), never
another core; the shells (`geosmtp.server`) import the cores.
"""

from .connection import (
    LINE_TOO_LONG,
    NEED_DATA,
    PAUSED,
    CloseConnection,
    ConnectionClosed,
    ProtocolError,
    SansIOConnection,
    Sentinel,
)
from .replies import Reply, ReplyValue, StatusReply

__all__ = [
    "LINE_TOO_LONG",
    "NEED_DATA",
    "PAUSED",
    "CloseConnection",
    "ConnectionClosed",
    "ProtocolError",
    "Reply",
    "ReplyValue",
    "SansIOConnection",
    "Sentinel",
    "StatusReply",
]
