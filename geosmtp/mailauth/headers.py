"""The header section of a stored message, as the sender checks and the signer read it.

Pure: bytes in, values out. Messages are spooled with LF line ends (the SMTP
shell turns CRLF into LF), and a filter stage may write CRLF; on the wire, the
relay sends every CR, LF and CRLF as CRLF (`relay.client.write_data`). DKIM
hashes the wire form, so everything here works on that form: `crlf()` makes it.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

# The default and the forbidden `dkim.headers` are the config's (defined once).
from ..config import DKIM_SIGNED_HEADERS as DKIM_SIGNED_HEADERS
from ..config import DKIM_UNSIGNED_HEADERS as DKIM_UNSIGNED_HEADERS
from ..mail.address import canonical_domain

CRLF = b"\r\n"


#: A field name: printable US-ASCII except ":" (RFC 5322 §2.2), then optional
#: white space before the colon (the obsolete syntax of §4.5, still met).
_FIELD_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def crlf(data: bytes) -> bytes:
    """`data` with every CR, LF and CRLF line end as CRLF, as the relay sends it."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def is_blank_line(line: bytes) -> bool:
    """The empty line that ends a header section, whatever its line end."""
    return line in (b"\n", b"\r\n", b"\r")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One field of a header section: its name as written, and the whole field
    (name, colon, value, folded lines) with CRLF line ends."""

    name: bytes
    raw: bytes

    @property
    def lname(self) -> bytes:
        return self.name.lower()

    @property
    def value(self) -> bytes:
        """Everything after the colon, continuation lines included, CRLFs kept."""
        return self.raw[self.raw.index(b":") + 1 :]

    def text(self) -> str:
        """The value unfolded, as text (UTF-8 under RFC 6532; anything else replaced)."""
        unfolded = self.value.replace(CRLF, b"")
        return unfolded.decode("utf-8", "replace").strip()


_LINE_END_RE = re.compile(rb"(\r\n|\r|\n)")


def header_lines(section: bytes) -> list[bytes]:
    """The lines of a header section, each with its line end as stored. CR, LF
    and CRLF all end a line, as they do on the wire (`crlf`): a bare CR must
    not hide a field from the checks that a mail reader would show."""
    parts = _LINE_END_RE.split(section)
    lines = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def field_groups(lines: list[bytes]) -> list[tuple[bytes | None, list[bytes]]]:
    """The lines grouped by field: (name, [first line, continuation lines...]).
    A line that is neither a field nor a continuation (an mbox "From " line,
    garbage) makes a group of its own named None, with what continues it."""
    groups: list[tuple[bytes | None, list[bytes]]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and groups:
            groups[-1][1].append(line)
            continue
        match = _FIELD_RE.match(line)
        groups.append((match.group(1) if match else None, [line]))
    return groups


def parse_header_section(section: bytes) -> list[HeaderField]:
    """The fields of a header section (without the empty line that ends it), with
    CRLF line ends whatever the stored ones; lines that are no field are skipped."""
    fields = []
    for name, lines in field_groups(header_lines(section)):
        if name is not None:
            raw = crlf(b"".join(lines))
            fields.append(HeaderField(name, raw if raw.endswith(CRLF) else raw + CRLF))
    return fields


def from_domains(fields: list[HeaderField]) -> list[str]:
    """The domains of every address in every `From:` field (RFC 5322 §3.6.2), in
    order, each once, lower-case A-labels. Several `From:` fields are read
    alike, so a second one cannot hide the first from DMARC (RFC 7489 §6.6.1)."""
    domains: list[str] = []
    for f in fields:
        if f.lname != b"from":
            continue
        for _, address in email.utils.getaddresses([f.text()]):
            _, at, domain = address.rpartition("@")
            domain = domain.strip().rstrip(".")
            if not at or not domain:
                continue
            domain = canonical_domain(domain)
            if domain not in domains:
                domains.append(domain)
    return domains


def _skip_cfws(text: str, i: int) -> int:
    """The index after white space and (nested) comments from `i` (RFC 5322 §3.2.2)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        i += 1
    return i


def authserv_id(field: HeaderField) -> str | None:
    """The authserv-id of an `Authentication-Results:` field (RFC 8601 §2.2):
    the token or quoted string before the first ";" or version, after any
    comments. Lower-case, without a trailing dot; None when there is none."""
    text = field.value.replace(CRLF, b"").decode("utf-8", "replace")
    i = _skip_cfws(text, 0)
    if text[i : i + 1] == '"':
        out, i = [], i + 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\":
                i += 1
            out.append(text[i : i + 1])
            i += 1
        ident = "".join(out)
    else:
        end = i
        while end < len(text) and not text[end].isspace() and text[end] not in ';()"':
            end += 1
        ident = text[i:end]
    ident = ident.strip().rstrip(".").lower()
    return ident or None
