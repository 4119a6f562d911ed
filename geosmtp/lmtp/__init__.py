"""The sans-I/O LMTP server core (RFC 2033): the SMTP core with LHLO, local
recipients only, and one reply per recipient after the message.

Imports only the SMTP core and the pure mail domain, as that core does.
"""

from .session import LMTPConnection, delivered

__all__ = ["LMTPConnection", "delivered"]
