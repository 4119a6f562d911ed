"""DKIM canonicalization (RFC 6376 §3.4), the body hashed as it streams.

Pure. dkimpy canonicalizes a body it holds whole in memory, several copies of
it; here the body goes through in blocks of whole lines, each block worked on
by a few C-speed `bytes`/`re` calls, so a 25 MB message costs one block of
memory. The signer and the verifier both hash bodies this way (the verifier
hands dkimpy the header section only: see `dkim_verify`).

    lines = LineBlocks()
    hasher = BodyHasher(relaxed=True)
    for piece in pieces_of_the_stored_body:
        hasher.update(lines.feed(piece))
    hasher.update(lines.end())
    hasher.digest()
"""

from __future__ import annotations

import hashlib
import re

from ..mail.lineends import lines_as_lf
from .headers import CRLF, HeaderField

_WSP_RE = re.compile(rb"[ \t]+")
_TAB_TO_SPACE = bytes.maketrans(b"\t", b" ")


def relax_lines(lines: bytes) -> bytes:
    """§3.4.4 on whole lines (LF ends): each run of white space one space, none at a
    line's end. With bytes methods, not `re`: a character-class regex crawls
    through a large body at 15 MB/s, these at hundreds."""
    lines = lines.translate(_TAB_TO_SPACE)
    while b"  " in lines:
        lines = lines.replace(b"  ", b" ")
    return lines.replace(b" \n", b"\n")


class LineBlocks:
    """Pieces of a stored message in, blocks of whole lines out, each line ended
    by one LF: CR, LF and CRLF are all line ends, as the relay sends them
    (`relay.client.write_data`). A CR that ends a piece is held until the next
    shows whether an LF follows."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""  # an unfinished line (already converted), then perhaps a CR

    def feed(self, data: bytes) -> bytes:
        data = self._tail + data
        kept = data.rstrip(b"\r")
        text = lines_as_lf(kept)
        cut = text.rfind(b"\n") + 1
        self._tail = text[cut:] + data[len(kept) :]
        return text[:cut]

    def end(self) -> bytes:
        """The rest: a last line without a line end gets one, as the relay adds it."""
        text, self._tail = lines_as_lf(self._tail), b""
        if text and not text.endswith(b"\n"):
            text += b"\n"
        return text


class BodyHasher:
    """The body hash (`bh=`) of one canonicalization, hash and length limit.

    `update()` takes whole lines ended by LF (from `LineBlocks`). "simple"
    (§3.4.3) ignores empty lines at the end and makes an empty body one CRLF;
    "relaxed" (§3.4.4) also drops white space at line ends and makes each run
    of it one space, and leaves an empty body empty. Empty lines are held back
    until a line with content shows they are not the last. `limit` is the
    signature's `l=`: only that many octets of the canonical body are hashed.
    """

    __slots__ = ("_count", "_emitted", "_hash", "_limit", "_pending", "relaxed")

    def __init__(self, relaxed: bool, algorithm: str = "sha256", limit: int | None = None) -> None:
        self.relaxed = relaxed
        self._hash = hashlib.new(algorithm)
        self._limit = limit
        self._count = 0
        self._pending = 0  # empty lines seen and not yet hashed
        self._emitted = False

    def update(self, lines: bytes) -> None:
        if not lines:
            return
        if self.relaxed:
            lines = relax_lines(lines)
        content = lines.rstrip(b"\n")
        empty_at_end = len(lines) - len(content)
        if not content:
            self._pending += empty_at_end
            return
        self._emit(b"\n" * self._pending + content + b"\n")
        self._pending = empty_at_end - 1

    def digest(self) -> bytes:
        if not self._emitted and not self.relaxed:
            self._emit(b"\n")  # §3.4.3: an empty body is one CRLF
        return self._hash.digest()

    def _emit(self, text: bytes) -> None:
        self._emitted = True
        data = text.replace(b"\n", CRLF)
        if self._limit is not None:
            data = data[: max(0, self._limit - self._count)]
        self._count += len(data)
        self._hash.update(data)


def canonical_header(field: HeaderField, relaxed: bool) -> bytes:
    """One header field as DKIM hashes it (§3.4.1 simple, §3.4.2 relaxed), with its CRLF."""
    if not relaxed:
        return field.raw
    value = _WSP_RE.sub(b" ", field.value.replace(CRLF, b"")).strip(b" ")
    return field.name.lower().rstrip(b" \t") + b":" + value + CRLF


def select_fields(fields: list[HeaderField], names: list[bytes]) -> list[HeaderField]:
    """The fields that `h=` names select (RFC 6376 §5.4.2): each name takes the
    lowest instance not yet taken; a name with none left selects nothing."""
    taken: dict[bytes, int] = {}
    selected: list[HeaderField] = []
    for name in names:
        name = name.lower()
        i = taken.get(name, len(fields))
        while i > 0:
            i -= 1
            if fields[i].lname == name:
                selected.append(fields[i])
                break
        taken[name] = i
    return selected
