"""What travels down the pipeline: a spooled message and its envelope."""

from __future__ import annotations

from dataclasses import dataclass

from ..mail import Envelope
from ..storage import SpoolFile


@dataclass
class Message:
    """A message received whole, on disk in the spool, about to be delivered.

    `spool` may be replaced by a filter stage that rewrites the message; the
    envelope never changes.
    """

    envelope: Envelope
    spool: SpoolFile
    queue_id: str
    size: int  # octets as the client sent them (RFC 1870), for limits and logs
    client: str = ""  # the client's IP address
    role: str = ""  # the listener role it arrived on (mx, submission, ...)
