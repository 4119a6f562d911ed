"""The framing of a message's data, in readers that own their state (as h11's
`_readers.py` does for HTTP bodies).

The connection holds one reader while message data is being read (after
354, or inside a BDAT chunk) and calls it with its input buffer; the reader
takes what it can and gives back the message data in it. Every reader has
the same face:

- `reader(buf)`: consume octets from the front of `buf` (a `bytearray`) and
  return the message data they hold, dot-unstuffed with LF line ends (`b""`
  when they held none to keep: a refused message, a skipped chunk), or None
  when nothing could be taken and more input is needed;
- `done`: the data this reader frames is all read (the final `.` line, the
  chunk's last octet); the connection then ends it;
- `size`: octets of the message so far, as `MessageEnd.size` counts them.

A message is refused (too big, a line over the text-line limit) only at its
end, so that the reply does not depend on how the client's data was cut into
reads; `refusal()` gives that reply. From the moment the problem is seen, a
reader keeps nothing more: it gives the complete lines before the problem
(the header section, whose Message-ID the access log shows for refused mail
too) and then only counts.
"""

from __future__ import annotations

from ..mail.limits import Limits
from ..mail.lineends import join_stored, stored_line_ends
from ..protocol import Reply
from . import replies as R


def chunk_header(arg: bytes) -> tuple[int, bool] | None:
    """BDAT's `chunk-size [LAST]` (RFC 3030 §2) as (size, last), or None."""
    parts = arg.split()
    if (
        not 1 <= len(parts) <= 2
        or not parts[0].isdigit()
        or len(parts[0]) > 18
        or (len(parts) == 2 and parts[1].upper() != b"LAST")
    ):
        return None
    return int(parts[0]), len(parts) == 2


class _MessageReader:
    """What DATA and BDAT share: the size and text-line limits, the refusal."""

    #: The verb whose data this is, for the access log ("DATA", "BDAT").
    verb = ""
    #: The message ends with this reader's data (BDAT: a chunk without LAST does not).
    last = True

    def __init__(self, limits: Limits) -> None:
        self.max_size = limits.max_message_size
        # A line ends at LF and may hold text_line - 2 octets and a CR (§4.5.3.1.6).
        self.text_limit = limits.text_line - 1
        self.size = 0
        self.line_too_long = False
        self.done = False
        self._emitting = True  # the message is not refused yet: its data goes out

    def refusal(self) -> Reply | None:
        """The reply refusing the message at its end (or at a chunk's), or None."""
        if self.size > self.max_size:
            return R.MESSAGE_TOO_BIG
        if self.line_too_long:
            return R.TEXT_LINE_TOO_LONG
        return None

    def tail(self) -> bytes:
        """Data held back until the message's end is known; b"" when none."""
        return b""

    def _refused_prefix(self, segments: list[bytes], size_before: int) -> bytes:
        """The message is refused from here on: the complete lines before the
        problem (a line too long, the size limit reached), and nothing more after."""
        self._emitting = False
        limit = self.text_limit
        room = self.max_size - size_before
        kept = taken = 0
        for seg in segments[:-1]:  # the last piece has no LF: not a complete line
            if len(seg) - (seg[:1] == b".") > limit or taken + len(seg) + 1 > room:
                break
            taken += len(seg) + 1
            kept += 1
        if not kept:
            return b""
        return stored_line_ends(b"\n".join(segments[:kept]) + b"\n")


class DataReader(_MessageReader):
    """The message after DATA's 354, up to `<CRLF>.<CRLF>` (RFC 5321 §4.1.1.4,
    §4.5.2): dot-unstuffing, the end marker, the limits.

    Works on whole blocks of lines rather than line by line: only `<CRLF>.`
    needs attention. A bare CR or LF is ordinary data and never ends the
    message. A bare LF does end a line for the text-line limit and for storage,
    as it does for the Maildir reader (clients such as `curl -T` send LF-only
    files); `_bol` says whether the data so far ended with CRLF, the only place
    a `.` line can start. An over-long line is dropped as it arrives, so the
    buffer never holds more than a line of the limit.
    """

    verb = "DATA"

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self._bol = True  # the message data so far ends with CRLF (or is empty)
        self._discarding = False  # the rest of an over-long line is being dropped

    def __call__(self, buf: bytearray) -> bytes | None:
        if self._discarding:
            # The rest of an over-long line: counted in the size, kept nowhere.
            eol = buf.find(b"\n")
            skip = eol + 1 if eol >= 0 else len(buf) - (1 if buf.endswith(b"\r") else 0)
            self.size += skip
            if eol >= 0:
                self._bol = buf[eol - 1 : eol] == b"\r" if eol else False
            del buf[:skip]
            if eol < 0:
                return None
            self._discarding = False
        # The buffer now starts at the beginning of a line (a CRLF one if _bol).
        skipped = 0  # octets of an over-long line dropped here, counted after the block
        if self._bol and buf.startswith(b".\r\n"):
            end, block_len, consumed = True, 0, 3
        else:
            j = buf.find(b"\r\n.\r\n")
            if j >= 0:
                end, block_len, consumed = True, j + 2, j + 5
            else:
                last = buf.rfind(b"\n")
                end, block_len = False, last + 1 if last >= 0 else 0
                consumed = block_len
                tail = len(buf) - block_len
                # The unfinished line may hold text_line - 2 octets, a CR waiting
                # for its LF, and a transparency dot that does not count (§4.5.3.1.6).
                at_bol = buf[block_len - 2 : block_len] == b"\r\n" if block_len else self._bol
                dot = at_bol and buf[block_len : block_len + 1] == b"."
                if tail > self.text_limit + dot:
                    self.line_too_long = True
                    self._discarding = True
                    consumed = len(buf) - (1 if buf.endswith(b"\r") else 0)
                    # Counted as _block counts a line: without the transparency dot;
                    # and after the complete lines before it, as when the line comes
                    # whole, since the size so far decides which of them a refused
                    # message still gives (_refused_prefix).
                    skipped = consumed - block_len - dot
                if block_len == 0 and consumed == 0:
                    return None
        block = bytes(buf[:block_len])
        del buf[:consumed]
        data = self._block(block) if block else b""
        self.size += skipped
        self.done = end
        return data

    def _block(self, block: bytes) -> bytes:
        """Account for, check and unstuff a block of complete lines."""
        bol = self._bol
        self._bol = block.endswith(b"\r\n")
        stuffed = block.count(b"\r\n.") + (bol and block[:1] == b".")  # lines with a leading dot
        before = self.size
        self.size += len(block) - stuffed
        if not self._emitting:
            return b""  # refused: read to the end, keep nothing
        # Lines end with CRLF or a bare LF: a CRLF line may hold text_line - 2
        # octets and its CR; the dot doubled for transparency does not count.
        limit = self.text_limit
        segments = block.split(b"\n")
        if max(map(len, segments)) > limit and any(
            len(seg) - (seg[:1] == b".") > limit for seg in segments
        ):
            self.line_too_long = True
        if self.line_too_long or self.size > self.max_size:
            return self._refused_prefix(segments, before)
        lines = block.split(b"\r\n")
        if stuffed:
            first = 0 if bol else 1  # a line continued from the last block is not stuffed
            lines[first:] = [line[1:] if line[:1] == b"." else line for line in lines[first:]]
        return join_stored(lines)


class ChunkReader(_MessageReader):
    """A message in BDAT chunks (RFC 3030): one reader for the whole message,
    given each chunk's size with `chunk()`; it is `done` at each chunk's end.

    Without BINARYMIME a BDAT message is text like any other: stored as DATA
    is, with the same text-line limit; a line may straddle chunks and reads,
    so the length of the unfinished one is kept.
    """

    verb = "BDAT"

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self.left = 0  # octets of the current chunk still to read
        self._line = 0  # octets of the unfinished line so far
        self._cr_pending = b""  # the CRs a piece ended with: an LF may start the next

    def chunk(self, size: int, last: bool) -> None:
        """The next chunk: `size` octets, the last of the message if `last`."""
        self.left, self.last, self.done = size, last, size == 0

    def __call__(self, buf: bytearray) -> bytes | None:
        if not buf:
            return None
        take = min(len(buf), self.left)
        piece = bytes(buf[:take])
        del buf[:take]
        self.left -= take
        self.done = self.left == 0
        before = self.size
        self.size += take
        if not self._emitting:  # refused: counted, kept nowhere
            return b""
        self._check_lines(piece)
        if self.size > self.max_size or self.line_too_long:
            return self._refused_prefix(piece.split(b"\n"), before)
        # Stored as DATA is (stored_line_ends). A CRLF may straddle two pieces,
        # so the CRs a piece ends with wait for the next: all of them, since
        # whether the last starts a CRLF decides how the one before it is kept.
        # (A run of CRs is one line: the text-line limit bounds it.)
        piece = self._cr_pending + piece
        kept = piece.rstrip(b"\r")
        self._cr_pending = piece[len(kept) :]
        return stored_line_ends(kept)

    def tail(self) -> bytes:
        """The CRs the last chunk ended with, kept as they came."""
        tail, self._cr_pending = self._cr_pending, b""
        return tail

    def _check_lines(self, piece: bytes) -> None:
        """The text-line limit (RFC 5321 §4.5.3.1.6), across chunks and pieces."""
        limit = self.text_limit
        if self.line_too_long:
            return
        if b"\n" not in piece:
            self._line += len(piece)
            self.line_too_long = self._line > limit
            return
        segments = piece.split(b"\n")
        first = self._line + len(segments[0])
        self._line = len(segments[-1])
        self.line_too_long = first > limit or self._line > limit or max(map(len, segments)) > limit


class RefusedChunk:
    """A BDAT chunk sent when it may not be: read and dropped, so that its
    octets are never taken for commands (RFC 3030 §3); `reply` refuses it once
    it is read."""

    def __init__(self, size: int, reply: Reply) -> None:
        self.left = size
        self.done = size == 0
        self.reply = reply

    def __call__(self, buf: bytearray) -> bytes | None:
        if not buf:
            return None
        take = min(len(buf), self.left)
        del buf[:take]
        self.left -= take
        self.done = self.left == 0
        return b""


Reader = DataReader | ChunkReader | RefusedChunk
