"""Filter stages: the interface the filter issue plugs into.

A stage sees the envelope and the spooled message and answers one of:
`Accept()` (go on), `Replace(spool_file)` (go on with a rewritten message),
`TempFail(...)` (`4xx`, the client keeps the message and retries) or
`Reject(...)` (`5xx`). Stages run in order; the first that does not accept
decides. The sender checks and DKIM signing (`geosmtp.mailauth.stages`) are
stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..storage import SpoolFile
from .message import Message


@dataclass(frozen=True)
class Accept:
    pass


@dataclass(frozen=True)
class Replace:
    """Go on with this message instead (the stage wrote it to a new spool file)."""

    spool: SpoolFile


@dataclass(frozen=True)
class TempFail:
    """Refuse for now: `4xx`. `code`/`status`/`text` are the reply, when the stage has one."""

    reason: str
    code: int = 451
    status: str = "4.3.0"
    text: str | None = None


@dataclass(frozen=True)
class Reject:
    """Refuse for good: `5xx`."""

    reason: str
    code: int = 554
    status: str = "5.7.1"
    text: str | None = None


StageResult = Accept | Replace | TempFail | Reject


class Stage(Protocol):
    """One step between the spool and the router."""

    name: str

    def process(self, message: Message) -> StageResult: ...
