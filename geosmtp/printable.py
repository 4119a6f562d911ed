"""Text from outside made safe to show: one line, nothing a terminal or a
line-splitting reader would act on.

Both logs (`logs.clean`, and every message of `log.txt`) and the management
tools' text output (`geosmtp ctl`, `geosmtp queue`) show a client's or a remote
server's words through `escape()`. Every character that is not printable
(Unicode categories C: controls, format characters such as the bidi override
U+202E, surrogates, private use, unassigned; and Z: separators, U+2028 and
U+2029 that end a line for `str.splitlines`, U+00A0) becomes an escape, but
the plain space: `\\x0a`, `\\x85`, `\\u2028`, `\\U000e0001`. Standard library
only: the admin tools import it without the server's dependencies.
"""

from __future__ import annotations

#: A character seen for the first time is looked up and remembered, up to
#: this many (a client sending every code point cannot grow it further).
_CACHE_SIZE = 4096


def escape_char(char: str) -> str:
    """One character as an escape: `\\xHH`, `\\uHHHH` or `\\UHHHHHHHH`."""
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class _Table(dict):
    """`str.translate`'s table: each printable character to itself, every other
    one to its escape, filled in as characters are met."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        value = char if char.isprintable() else escape_char(char)
        if len(self) < _CACHE_SIZE:
            self[code] = value
        return value


_TABLE = _Table()


def escape(text: str) -> str:
    """`text` with every character that is not printable escaped (the space is
    printable). A printable text is returned as it is: the common case costs
    one `str.isprintable()`."""
    if text.isprintable():
        return text
    return text.translate(_TABLE)
