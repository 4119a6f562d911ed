"""Filter stages: one interface for every step between the spool and the router.

A stage sees the envelope and the spooled message and answers one of:
`Accept()` (go on), `Replace(spool_file)` (go on with a rewritten message),
`TempFail(...)` (`4xx`, the client keeps the message and retries) or
`Reject(...)` (`5xx`). Stages run in order; the first that does not accept
decides. What runs: external programs and Python callables (`geosmtp/filters/`,
the `filters:` section), the sender checks and DKIM signing
(`geosmtp.mailauth.stages`), and whatever else is put in `Pipeline.stages`.

A stage may also have `applies(message) -> bool`: when it says False the stage
is skipped for that message (not run, not logged, not counted). Without it, a
stage runs for every message. And a `group`: what the metrics count a refusal
by it under (`geosmtp_messages_rejected_total{stage=...}`): `filter` when it
has none, `sender-checks` and `dkim-sign` for those two.

`failure` on a result says that the verdict is not the stage's own judgement
of the message but its failure policy (a filter program that crashed, timed
out, wrote too much: `on_failure`); it names what went wrong (`timeout`,
`exit=3`, ...) for the access log and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..storage import SpoolFile
from .message import Message


@dataclass(frozen=True)
class Accept:
    failure: str | None = None


@dataclass(frozen=True)
class Replace:
    """Go on with this message instead (the stage wrote it to a new spool file)."""

    spool: SpoolFile


@dataclass(frozen=True)
class TempFail:
    """Refuse for now: `4xx`. `code`/`status`/`text` are the reply; without `text`
    the server's wording for a temporary failure is used."""

    reason: str
    code: int = 451
    status: str = "4.3.0"
    text: str | None = None
    failure: str | None = None


@dataclass(frozen=True)
class Reject:
    """Refuse for good: `5xx`."""

    reason: str
    code: int = 554
    status: str = "5.7.1"
    text: str | None = None
    failure: str | None = None


StageResult = Accept | Replace | TempFail | Reject


def printable(text: str) -> str:
    """`text` fit for an SMTP reply's text: printable US-ASCII, anything else
    "?" (a stage's words, or a name that came from the client or the message)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def verdict_name(result: StageResult) -> str:
    """`accept`, `replace`, `tempfail` or `reject`: the result's kind, as logs and
    metrics name it."""
    return type(result).__name__.lower()


class Stage(Protocol):
    """One step between the spool and the router (see the module's docstring for
    the optional `applies`)."""

    name: str

    def process(self, message: Message) -> StageResult: ...
