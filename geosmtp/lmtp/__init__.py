"""The sans-I/O LMTP server core (RFC 2033): the SMTP core with LHLO, local
recipients only, and one reply per recipient after the message.

Imports only the SMTP core and the pure mail domain, as that core does.
"""

from .session import LHLO_ONLY, NOT_LOCAL, LMTPConnection, delivered

__all__ = ["LHLO_ONLY", "NOT_LOCAL", "LMTPConnection", "delivered"]
