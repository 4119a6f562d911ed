"""Line ends of a stored message: how wire data is stored, and read back as lines.

A message is stored with LF line ends (the Maildir way; Dovecot's too). Every
reader turns a stored file back into wire form by one rule: a LF alone becomes
CRLF, a CRLF stays, a CR alone stays (POP3's `MessageEncoder`, the `W=` size,
Dovecot). `stored_line_ends` is the other half of that rule, so what a client
sent comes back byte for byte.

The relay and DKIM need lines, not bytes: SMTP allows no bare CR or LF, so
`lines_as_lf` makes every line end one LF (each sent as CRLF, hashed as CRLF).
"""

from __future__ import annotations

import re

_CRLF_NOT_AFTER_CR = re.compile(rb"(?<!\r)\r\n")


def stored_line_ends(data: bytes) -> bytes:
    """Wire data (CRLF line ends) as it is stored: each CRLF becomes LF, except
    one right after a CR, which stays whole. `x<CR><CR><LF>` is stored as it
    came: stored as `x<CR><LF>` it would read back as `x<CRLF>`, a CR lost.

    The caller keeps a CRLF in one piece (a CR at the end of `data` waits for
    the next piece) and so the CRs before it."""
    return join_stored(data.split(b"\r\n"))


def join_stored(lines: list[bytes]) -> bytes:
    """The pieces of wire data split at each CRLF, joined as `stored_line_ends`
    stores them (the SMTP core splits DATA so to undo the dot-stuffing).

    A split and a join with LF is the fastest CRLF→LF there is (faster than
    `replace`); a CR left in the result, rare, is one `memchr` to see, and only
    then is each CRLF looked at."""
    data = b"\n".join(lines)
    if b"\r" in data:
        data = _CRLF_NOT_AFTER_CR.sub(b"\n", b"\r\n".join(lines))
    return data


def lines_as_lf(data: bytes) -> bytes:
    """Stored bytes with every line end one LF: a CRLF, a LF and a CR alone are
    each a line end, but a CR right before a CRLF (`stored_line_ends` keeps
    it) is dropped rather than made an empty line, which in the header section
    would end it. A client's `x<CR><CR><LF>` goes on as `x<CRLF>`.

    The caller holds back the CRs `data` ends with until it knows what follows
    them (`rstrip(b"\\r")`): whether the last starts a CRLF decides the others."""
    text = b"\n".join(data.split(b"\r\n"))
    if b"\r" in text:  # a CR alone, rare: the slower rule only then
        text = b"\n".join(data.replace(b"\r\r\n", b"\r\n").split(b"\r\n")).replace(b"\r", b"\n")
    return text
