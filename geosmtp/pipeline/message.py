"""What travels down the pipeline: a spooled message and its envelope."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mail import Envelope
from ..storage import SpoolFile


@dataclass(frozen=True)
class StageVerdict:
    """What one stage said about a message, for the access log: `name:verdict`,
    with the failure that made it in parentheses (`scan:tempfail(timeout)`)."""

    stage: str
    verdict: str  # accept, replace, tempfail, reject
    failure: str | None = None

    def __str__(self) -> str:
        tail = f"({self.failure})" if self.failure else ""
        return f"{self.stage}:{self.verdict}{tail}"


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
    role: str = ""  # the listener role it arrived on (mx, submission, ...); "" for our own reports
    #: time.monotonic() by which the client must have its reply: waiting for a
    #: filter slot and running filters stop there; None: the stages' own limits only.
    deadline: float | None = None
    #: What each stage that ran said, in order (the access log names them).
    verdicts: list[StageVerdict] = field(default_factory=list)
    #: What the sender checks found, by check: {"spf": "pass", "dkim": "fail,pass",
    #: "dmarc": "pass"} (one result per signature, per From: domain); each is a
    #: field of the access-log line. Empty when the checks did not run.
    auth_results: dict[str, str] = field(default_factory=dict)
