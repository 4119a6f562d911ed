"""What the access log wants to know of a message's header section."""

from __future__ import annotations

import re

_MESSAGE_ID_RE = re.compile(
    rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)
_RETURN_PATH_RE = re.compile(rb"^return-path[ \t]*:", re.IGNORECASE | re.MULTILINE)
_HEADER_END_RE = re.compile(rb"\n\r?\n")  # the empty line after the header section
_SPACE_RE = re.compile(rb"\s+")
#: Only the first octets are searched: a header section longer than this is
#: looked at no further (the message is still stored whole).
HEADER_LIMIT = 64 * 1024


class MessageIdSniffer:
    """Finds the Message-ID in a message fed in pieces, however it was cut.

    Fed the message as it is stored (LF line ends, or CRLF); keeps at most
    `HEADER_LIMIT` octets, and only until the header section ends. A
    "Message-ID:" line in the body is not the message's.

    It also tells whether the sender wrote a `Return-Path:` field of its own
    (`return_path`), which the server removes: True too when the header
    section is longer than it looks at (one may be further down).
    """

    __slots__ = ("_buf", "message_id", "return_path")

    def __init__(self) -> None:
        self._buf: bytearray | None = bytearray()
        self.message_id: str | None = None
        self.return_path = False

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if buf is None:
            return
        start = len(buf)
        buf += data
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":
            end = 0  # the message starts with a blank line: no header section
        else:
            # The blank line may straddle two pieces: look back two octets.
            m = _HEADER_END_RE.search(buf, max(start - 2, 0))
            end = m.start() + 1 if m else -1
        if end < 0 and len(buf) <= HEADER_LIMIT:
            return
        self._finish(end if end >= 0 else len(buf))

    def close(self) -> None:
        """The message ended: a header section without a body ends here."""
        if self._buf is not None:
            self._finish(len(self._buf))

    def _finish(self, end: int) -> None:
        buf = self._buf
        assert buf is not None
        self.return_path = end > HEADER_LIMIT
        del buf[min(end, HEADER_LIMIT) :]
        if _RETURN_PATH_RE.search(buf):
            self.return_path = True
        m = _MESSAGE_ID_RE.search(buf)
        if m:
            value = _SPACE_RE.sub(b" ", m.group(1)).strip()
            self.message_id = value.decode("utf-8", "replace")[:998]
        self._buf = None
