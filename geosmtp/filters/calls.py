"""Python stages: finding the callable a `call:` names, and what it is given.

A Python stage is a function `stage(envelope, message, context)`:

- `envelope`: the `geosmtp.mail.Envelope` (sender, recipients, HELO name,
  authenticated user, ...), read-only;
- `message`: a binary file opened on the spooled message, read-only,
  positioned at its first header (the server's `Return-Path:` is not part of
  it), LF line endings; read it in pieces, it may be large;
- `context`: a `StageContext` (queue id, client address, listener role, ...,
  and `new_message()` for a rewrite).

It returns `Accept()`, `Replace(f)` (f from `context.new_message()`),
`TempFail(...)` or `Reject(...)` (all in `geosmtp.filters`). It runs in a
thread of its own unless it is marked `@cooperative` (then in a greenlet:
it must not block the process). docs/filters.md has the whole contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Imported (and checked) by the config: `filters[].call`.
from ..config import load_callable as load_callable
from ..storage import Spool, SpoolFile

F = TypeVar("F", bound=Callable[..., Any])


def cooperative(fn: F) -> F:
    """Mark a Python stage as cooperative: it runs as a greenlet in the server's
    own thread, not in a thread of the filter pool. Only for a stage that never
    blocks the process (gevent-friendly I/O, little CPU)."""
    fn.cooperative = True  # type: ignore[attr-defined]  # a mark on the stage's function
    return fn


def is_cooperative(fn: Callable[..., Any]) -> bool:
    return getattr(fn, "cooperative", False) is True


@dataclass
class StageContext:
    """What a Python stage knows about a message besides its envelope."""

    stage: str  # this stage's name (from the config)
    queue_id: str
    client: str  # the client's IP address
    role: str  # the listener role it arrived on (mx, submission, submissions)
    size: int  # octets as the client sent them
    hostname: str  # this server's name (the config's `hostname`)
    _spool: Spool = field(repr=False)
    _return_path: bytes = field(default=b"", repr=False)
    _made: list[SpoolFile] = field(default_factory=list, repr=False)

    def new_message(self) -> SpoolFile:
        """A new, empty message to write a rewrite into (`write(bytes)`), then
        `return Replace(it)`. Write the message without a `Return-Path:`:
        the server keeps its own in front. Files made but not returned are
        removed after the stage."""
        spool = self._spool.open()
        self._made.append(spool)
        if self._return_path:
            spool.write(self._return_path)
        return spool

    def made(self, spool: object) -> bool:
        """Whether `spool` is one of the files `new_message` made."""
        return any(spool is made for made in self._made)

    def discard_unused(self, kept: SpoolFile | None) -> None:
        """Remove the files `new_message` made, but `kept`."""
        made, self._made = self._made, []
        for spool in made:
            if spool is not kept:
                spool.remove()
