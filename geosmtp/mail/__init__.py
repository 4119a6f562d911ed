"""The mail domain shared by every protocol and service: addresses, domains,
mailbox names, envelopes, header facts, ids. Standard library only; storage,
auth and the protocol cores import it, it imports none of them.

Everything here is pure except `ids` (it reads the clock and the pid), which
the protocol cores never import; the shell names messages.
"""

from .address import Domains, Mailbox, canonical_domain, safe_mailbox_name
from .envelope import Envelope, Recipient

__all__ = [
    "Domains",
    "Envelope",
    "Mailbox",
    "Recipient",
    "canonical_domain",
    "safe_mailbox_name",
]
