"""The reply values the cores queue and `CloseConnection` carries.

Every reply is a value that renders itself (`to_bytes()`): the core queues its
bytes, and the shell can render one itself when the core cannot (a refusal
before any session, or a core that failed). The wording is each protocol's
(`smtp/replies.py`, `pop3/replies.py`); the two wire forms are here:

- `Reply`: a numbered reply (RFC 5321 §4.2), as SMTP and LMTP send it, with
  an enhanced status code (RFC 2034, RFC 3463);
- `StatusReply`: a status indicator and text (`+OK`, `-ERR`, RFC 1939 §3),
  as POP3 sends it, with a dot-stuffed multi-line body when it has one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class ReplyValue(Protocol):
    """What a core queues and what `close_with()` and `CloseConnection` take."""

    @property
    def text(self) -> str: ...

    def to_bytes(self, enhanced: bool = True) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str | None  # enhanced status code "x.y.z", or None (greeting, EHLO, 3xx)
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def to_bytes(self, enhanced: bool = True) -> bytes:
        """Render per RFC 5321 §4.2.1: `code-text` on all lines but the last.

        The fixed replies are rendered once (see `_rendered`)."""
        rendered: bytes = _rendered(self, enhanced)
        return rendered

    def _render(self, enhanced: bool) -> bytes:
        prefix = f"{self.status} " if enhanced and self.status else ""
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            # Only the first line carries the enhanced code; RFC 2034 allows it
            # on each, but clients key on the first and the EHLO list has none.
            text = prefix + line if i == 0 else line
            out.append(f"{self.code}{sep}{text}\r\n")
        return "".join(out).encode("utf-8", "replace")


@functools.lru_cache(maxsize=512)
def _rendered(reply: Reply, enhanced: bool) -> bytes:
    return reply._render(enhanced)


@dataclass(frozen=True, slots=True)
class StatusReply:
    """A reply of a status indicator and text (RFC 1939 §3): `line` is the
    status line without its CRLF; `body`, when not None, the lines of a
    multi-line reply, sent byte-stuffed and ended by "." alone."""

    line: str
    body: tuple[str, ...] | None = None

    @property
    def ok(self) -> bool:
        """A positive reply (`+OK`, or a `+` challenge)."""
        return self.line[:1] == "+"

    @property
    def text(self) -> str:
        """The text after the status indicator."""
        return self.line.partition(" ")[2]

    def to_bytes(self, enhanced: bool = True) -> bytes:
        """The wire form; `enhanced` is the numbered replies' and means nothing here."""
        first = f"{self.line}\r\n".encode()
        if self.body is None:
            return first
        return first + _stuffed(self.body) + b".\r\n"


def _stuffed(lines: Iterable[str]) -> bytes:
    """Lines of a multi-line reply, a "." doubled at the start of one (RFC 1939 §3)."""
    return "".join(f".{line}\r\n" if line[:1] == "." else f"{line}\r\n" for line in lines).encode()
