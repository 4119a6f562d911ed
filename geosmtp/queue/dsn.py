"""Delivery status notifications: RFC 3464 reports in a multipart/report (RFC 6522).

Pure and standard-library only: the caller passes the time (`date`,
`arrival_date`, the per-recipient dates), the Message-ID and the MIME boundary,
and a file to write to; nothing here reads the clock, a random source or the
filesystem. The original message is read from the file object it is given,
in pieces, so a large original returned whole is never in memory at once.

What the queue must do around it:

- Never send a DSN to the null reverse-path: check `never_bounce_to(sender)`
  first (RFC 5321 §4.5.5, §6.1: no notification of a notification, no bounce
  loops). `write_dsn` refuses `<>` as well, so a forgotten check is an
  exception, never a loop.
- Send the DSN itself with `MAIL FROM:<>` (RFC 3461 §6.1, RFC 5321 §4.5.5), so
  a DSN that cannot be delivered produces no other; it is logged and dropped
  after its own lifetime.
- Choose the recipients: only those whose NOTIFY asks for this kind of report
  (RFC 3461 §4.1), one report per kind.
- Send with `BODY=8BITMIME` when `DSNInfo.eight_bit`, and with `SMTPUTF8` when
  `DSNInfo.smtputf8` (the sender's address is not ASCII).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal, Protocol

Kind = Literal["failed", "delayed", "delivered"]
#: RFC 3464 §2.3.3.
Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
KINDS = frozenset({"failed", "delayed", "delivered"})

SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}

#: The original is read and written in pieces of this size.
CHUNK_SIZE = 64 * 1024
#: At most this much of the original's header section is returned (as
#: Postfix's `header_size_limit`); a longer one is cut at a line end.
MAX_HEADER_SIZE = 100 * 1024

# RFC 3463 §3.1: class.subject.detail.
_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# RFC 2046 §5.1.1 bcharsnospace, 1 to 70 of them (no space: nothing to fold inside).
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")
# "type; value" (RFC 3464 §2.1.2 address-type, §2.3.6 diagnostic-type, §2.2.2 mta-name-type).
_TYPED_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*;\s*(.*)", re.DOTALL)
_XTEXT_RE = re.compile(rb"\+([0-9A-Fa-f]{2})")  # RFC 3461 §4
_UNITEXT_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")  # RFC 6533 §3 EmbeddedUnicodeChar
# What ends or folds a line for some parser (str.splitlines, email's \r|\n), and
# the tab: each becomes a space, so a multi-line SMTP reply reads as one line.
_BREAK_RE = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]")
# Every other control character becomes "?".
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PIECE_RE = re.compile(r" +[^ ]+")
# A header field's first line (RFC 5322 §3.6.8: a name of printable ASCII but
# ":", then the colon; §4.5: white space may come before it).
_FIELD_START_RE = re.compile(rb"[!-9;-~]+[ \t]*:")
# Our own trace field, put at the top of a message at delivery (RFC 5321 §4.4).
_RETURN_PATH_RE = re.compile(rb"return-path[ \t]*:", re.IGNORECASE)
_LINE_RE = re.compile(rb"[^\n]+\n?|\n")  # a line with its LF (only a bare CR is no line end)
FOLD_AT = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
_HARD_PIECE = 900  # octets; RFC 5322 §2.1.1: a line MUST be at most 998


class BoundaryCollision(ValueError):
    """A line of the original starts with the boundary's delimiter: call again
    with another boundary. Raised before anything is written."""


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """What happened to one recipient: one per-recipient block (RFC 3464 §2.3).

    `final_recipient` is the address it was delivered (or not) to, without
    angle brackets. `original_recipient` is the ORCPT parameter exactly as the
    client sent it on RCPT (`rfc822;bob+2Bx@example.org`, still xtext-encoded,
    or RFC 6533's `utf-8;...`): the report shows it decoded (RFC 3461 §6.3 (d));
    None when the client sent no ORCPT, and then no Original-Recipient field
    appears. `remote_mta` is a host name (`mx.example.org`) or a typed value
    (`dns; mx.example.org`). `diagnostic_code` is the remote's reply
    (`550 5.1.1 <x@y>: user unknown`, taken as `smtp;`) or a typed value
    (`smtp; ...`, `X-geosmtp; connection refused`). Dates are RFC 5322
    date-times; `will_retry_until` belongs to a `delayed` recipient.
    """

    final_recipient: str
    action: Action
    status: str  # the enhanced status code, "5.1.1"
    original_recipient: str | None = None
    remote_mta: str | None = None
    diagnostic_code: str | None = None
    last_attempt_date: str | None = None
    will_retry_until: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {sorted(ACTIONS)}, not {self.action!r}")
        if not _STATUS_RE.fullmatch(self.status):
            raise ValueError(f"status must be an enhanced status code, not {self.status!r}")


@dataclass(frozen=True, slots=True)
class DSNInfo:
    """What was written, and how the queue must send it."""

    #: "full": the whole original (message/rfc822 or message/global);
    #: "headers": its header section (text/rfc822-headers or message/global-headers).
    returned: Literal["full", "headers"]
    #: The report uses the RFC 6533 types (the original or a field needs UTF-8).
    utf8: bool
    #: Some part is 8-bit: send with BODY=8BITMIME (RFC 6152).
    eight_bit: bool
    #: A header field of the report itself is UTF-8 (the sender's address):
    #: send with SMTPUTF8 (RFC 6531).
    smtputf8: bool
    #: Octets written.
    size: int


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def tell(self) -> int: ...


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def never_bounce_to(sender: str | None) -> bool:
    """True for the null reverse-path: no DSN may go there.

    RFC 5321 §4.5.5 and §6.1: a message with `MAIL FROM:<>` (a notification
    itself) never gets a notification, or two servers could bounce bounces
    forever. The queue must check this before building a report; `sender` is
    the reverse-path as stored (`Envelope.sender_address`: "" for `<>`), with or
    without its angle brackets, or None.
    """
    return sender is None or sender.strip() in ("", "<>")


def decode_xtext(text: str) -> str:
    """RFC 3461 §4 xtext: each `+XX` is the octet XX; the octets are UTF-8
    (RFC 6533 lets a `+XX` sequence carry UTF-8). Invalid UTF-8 becomes U+FFFD."""
    raw = _to_bytes(text)
    return _XTEXT_RE.sub(lambda m: bytes.fromhex(m.group(1).decode()), raw).decode(
        "utf-8", "replace"
    )


def decode_orcpt(value: str) -> tuple[str, str]:
    """An ORCPT parameter (RFC 3461 §4.2) as `(addr-type, address)`, decoded.

    `rfc822;bob+2B1@example.org` gives `("rfc822", "bob+1@example.org")`. The
    `utf-8` type (RFC 6533 §3) has its own escape, `\\x{HHHH}`, instead of xtext.
    A value without a type is taken as an rfc822 address.
    """
    m = _TYPED_RE.fullmatch(value)
    addr_type, address = (m.group(1), m.group(2)) if m else ("rfc822", value)
    if addr_type.lower() == "utf-8":
        return addr_type, _UNITEXT_RE.sub(_unichar, address)
    return addr_type, decode_xtext(address)


def write_dsn(
    out: _Writable,
    *,
    reporting_mta: str,
    original_envelope_id: str | None,
    sender: str,
    arrival_date: str,
    recipients: Sequence[RecipientStatus],
    kind: Kind,
    original: _Readable,
    ret: str | None = "HDRS",
    max_full_size: int,
    date: str,
    message_id: str,
    boundary: str,
    postmaster_address: str | None = None,
    crlf: bool = False,
    max_header_size: int = MAX_HEADER_SIZE,
) -> DSNInfo:
    """Write a delivery status notification to `out`, the original copied in pieces.

    `reporting_mta` is our host name; `original_envelope_id` the ENVID parameter
    of MAIL as received (xtext, shown decoded: RFC 3461 §6.3 (a)) or None;
    `sender` the original reverse-path, where the report goes; `original` a
    seekable binary file of the message as stored (LF line ends), read from its
    current position to its end. `ret` is the MAIL RET parameter: the whole
    message is returned only for `kind="failed"`, `RET=FULL` (RFC 3461 §4.3:
    FULL asks for it in "failed" reports) and a message of at most
    `max_full_size` octets; otherwise its header section. `date` (RFC 5322),
    `message_id` and `boundary` come from the caller; the boundary should be
    unpredictable (a random token): if a line of the original starts with it,
    `BoundaryCollision` is raised before anything is written.

    The report has LF line ends, as geosmtp stores messages; `crlf=True` gives
    CRLF, for sending.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    ret = (ret or "HDRS").upper()
    if ret not in ("HDRS", "FULL"):
        raise ValueError(f"ret must be HDRS or FULL, not {ret!r}")
    if never_bounce_to(sender):
        raise ValueError("no delivery status notification to the null reverse-path <>")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise ValueError(f"not a valid MIME boundary: {boundary!r}")
    host = _clean(reporting_mta)
    sender_address = _clean(_unbracket(sender))
    postmaster = _clean(_unbracket(postmaster_address or f"postmaster@{host}"))

    # Look at the original before writing anything: its size, whether it needs
    # UTF-8, whether a line of it could be taken for our boundary.
    start = original.tell()
    size = original.seek(0, 2) - start
    original.seek(start)
    full = kind == "failed" and ret == "FULL" and size <= max_full_size
    scan = _Scan(boundary.encode("ascii"))
    if full:
        while chunk := original.read(CHUNK_SIZE):
            scan.feed(chunk)
        original.seek(start)
    # The header section, without our Return-Path; returned whole, the rest
    # of the message follows it as it is.
    section = _read_header_section(original, max_header_size)
    header_section = _without_return_path(section)
    if full:
        original.seek(start + len(section))
    else:
        scan.feed(header_section)
    if scan.collision:
        raise BoundaryCollision(f"a line of the original starts with --{boundary}")

    status_text = _delivery_status(host, original_envelope_id, arrival_date, recipients)
    human_text = _explanation(
        kind, host, postmaster, recipients, full, ret == "FULL" and kind == "failed"
    )
    utf8 = not (scan.headers_ascii and status_text.isascii() and sender_address.isascii())
    original_ascii = scan.ascii if full else header_section.isascii()
    eight_bit = not (original_ascii and status_text.isascii() and human_text.isascii())

    if utf8:
        report_type, status_type = "global-delivery-status", "message/global-delivery-status"
        original_type = "message/global" if full else "message/global-headers"
    else:
        report_type, status_type = "delivery-status", "message/delivery-status"
        original_type = "message/rfc822" if full else "text/rfc822-headers"

    top = "".join(
        [
            _field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>"),
            _field("To", f"<{sender_address}>"),
            _field("Subject", SUBJECTS[kind]),
            _field("Date", date),
            _field("Message-ID", f"<{_unbracket(_clean(message_id))}>"),
            _field("Auto-Submitted", "auto-replied"),  # RFC 3834 §5
            _field("MIME-Version", "1.0"),
            _field(
                "Content-Type",
                f'multipart/report; report-type={report_type}; boundary="{boundary}"',
            ),
            _cte(eight_bit),
        ]
    )
    delimiter = f"--{boundary}\n"
    head = "".join(
        [
            top,
            "\nThis is a MIME-encapsulated message.\n\n",
            delimiter,
            _field("Content-Description", "Notification"),
            _field(
                "Content-Type",
                f"text/plain; charset={'us-ascii' if human_text.isascii() else 'utf-8'}",
            ),
            _cte(not human_text.isascii()),
            "\n",
            human_text,
            "\n",
            delimiter,
            _field("Content-Description", "Delivery report"),
            _field("Content-Type", status_type),
            _cte(not status_text.isascii()),
            "\n",
            status_text,
            "\n",
            delimiter,
            _field(
                "Content-Description",
                "Undelivered message" if full else "Message headers",
            ),
            _field("Content-Type", original_type),
            _cte(not original_ascii),
            "\n",
        ]
    )
    smtputf8 = not top.isascii()

    def emit(data: bytes) -> int:
        if crlf:
            data = data.replace(b"\n", b"\r\n")
        out.write(data)
        return len(data)

    written = emit(_encode(head)) + emit(header_section)
    if full:
        remaining = size - len(section)
        while remaining > 0 and (chunk := original.read(min(CHUNK_SIZE, remaining))):
            remaining -= len(chunk)
            written += emit(chunk)
    # The line break before a delimiter belongs to the delimiter (RFC 2046
    # §5.1.1), so the part is the original exactly, final newline or not.
    written += emit(f"\n--{boundary}--\n".encode("ascii"))
    return DSNInfo(
        returned="full" if full else "headers",
        utf8=utf8,
        eight_bit=eight_bit,
        smtputf8=smtputf8,
        size=written,
    )


def build_dsn(**keywords: Any) -> bytes:
    """`write_dsn` into memory, with the same keywords: the report as bytes. For a
    report that may hold a large original (RET=FULL), write it to a file with
    `write_dsn` instead."""
    buf = BytesIO()
    write_dsn(buf, **keywords)
    return buf.getvalue()


# -- the delivery-status part (RFC 3464 §2.2, §2.3) -----------------------------


def _delivery_status(
    host: str,
    envelope_id: str | None,
    arrival_date: str,
    recipients: Sequence[RecipientStatus],
) -> str:
    """The per-message block, then one block per recipient, blank-line separated."""
    per_message = [_field("Reporting-MTA", f"dns; {host}")]
    if envelope_id is not None:
        per_message.append(_field("Original-Envelope-Id", decode_xtext(envelope_id)))
    per_message.append(_field("Arrival-Date", arrival_date))
    blocks = ["".join(per_message)]
    for r in recipients:
        fields = []
        if r.original_recipient is not None:
            addr_type, address = decode_orcpt(r.original_recipient)
            fields.append(_field("Original-Recipient", f"{addr_type}; {address}"))
        final = _unbracket(r.final_recipient)
        fields.append(_field("Final-Recipient", f"{_address_type(final)}; {final}"))
        fields.append(_field("Action", r.action))
        fields.append(_field("Status", r.status))
        if r.remote_mta:
            fields.append(_field("Remote-MTA", "; ".join(_typed(r.remote_mta, "dns"))))
        if r.diagnostic_code:
            fields.append(_field("Diagnostic-Code", "; ".join(_typed(r.diagnostic_code, "smtp"))))
        if r.last_attempt_date:
            fields.append(_field("Last-Attempt-Date", r.last_attempt_date))
        if r.will_retry_until:
            fields.append(_field("Will-Retry-Until", r.will_retry_until))
        blocks.append("".join(fields))
    return "\n".join(blocks)


def _address_type(address: str) -> str:
    """rfc822 for an ASCII address; utf-8 (RFC 6533 §3) for an internationalised one."""
    return "rfc822" if address.isascii() else "utf-8"


# -- the human-readable part ------------------------------------------------------

_INTRO = {
    "failed": (
        "Your message could not be delivered to one or more recipients. "
        "The reasons are given below."
    ),
    "delayed": (
        "Your message has not been delivered yet to one or more recipients. "
        "The mail system will keep trying; you do not need to send it again. "
        "The recipients and the reasons for the delay are given below."
    ),
    "delivered": "Your message was delivered to the recipients listed below.",
}
_OUTCOME = {
    "failed": "delivery failed",
    "delayed": "not delivered yet, still trying",
    "delivered": "delivered",
    "relayed": "relayed to a system that sends no delivery reports",
    "expanded": "delivered and forwarded on to further recipients",
}


def _explanation(
    kind: str,
    host: str,
    postmaster: str,
    recipients: Sequence[RecipientStatus],
    full: bool,
    full_asked: bool,
) -> str:
    """The text/plain part. Every line starts with our own words or with
    indentation, so nothing from a client can start a line (or a boundary)."""
    if full:
        attached = "Your message is attached."
    elif full_asked:
        attached = (
            "Your message was too large to be returned whole; its header section is attached."
        )
    else:
        attached = "The header section of your message is attached."
    paragraphs = [
        f"This is the mail system at host {host}.",
        f"{_INTRO[kind]} {attached}",
        f"If you need help, write to the postmaster at <{postmaster}> and include this report.",
    ]
    # Our paragraphs hold only our own words and the configured host names.
    blocks = [_wrap(p, subsequent_indent="") for p in paragraphs]
    for r in recipients:
        line = f"<{_unbracket(r.final_recipient)}>: {_OUTCOME[r.action]} (status {r.status})"
        if r.will_retry_until:
            line += f"; trying until {r.will_retry_until}"
        block = _wrap(line + ".")
        host_name = _typed(r.remote_mta, "dns")[1] if r.remote_mta else None
        if r.diagnostic_code:
            reply = _typed(r.diagnostic_code, "smtp")[1]
            who = f"{host_name} said" if host_name else "Reason"
            block += "\n" + _wrap(f"{who}: {reply}", indent="    ")
        elif host_name:
            block += "\n" + _wrap(f"Remote server: {host_name}", indent="    ")
        blocks.append(block)
    return "\n\n".join(blocks) + "\n"


def _wrap(text: str, indent: str = "", subsequent_indent: str = "    ") -> str:
    return textwrap.fill(
        _clean(text),
        width=76,
        initial_indent=indent,
        subsequent_indent=subsequent_indent,
        break_on_hyphens=False,
    )


# -- header fields ----------------------------------------------------------------


def _field(name: str, value: str) -> str:
    """`Name: value` and LF, the value made header-safe and folded.

    Line breaks in the value become spaces and other control characters "?",
    so a client's text (an address, an ENVID, a remote's reply) can never
    start a header line of its own. Folding puts a line break before a space
    (RFC 5322 §2.2.3), so unfolding gives the value back exactly; only a word
    longer than 900 octets is cut, with a space added where it is cut.
    """
    line = name + ":"
    lines = []
    for piece in _PIECE_RE.findall(" " + _clean(value)):
        for part in _split_long(piece):
            if len(line) + len(part) > FOLD_AT and line != name + ":":
                lines.append(line)
                line = part
            else:
                line += part
    lines.append(line)
    return "\n".join(lines) + "\n"


def _split_long(piece: str) -> list[str]:
    """A piece (spaces and a word) in parts of at most `_HARD_PIECE` octets,
    each after the first starting with a space to fold at."""
    if len(piece.encode("utf-8", "replace")) <= _HARD_PIECE:
        return [piece]
    parts, current, size = [], "", 0
    for char in piece:
        n = len(char.encode("utf-8", "replace"))
        if size + n > _HARD_PIECE:
            parts.append(current)
            current, size = " ", 1
        current += char
        size += n
    parts.append(current)
    return parts


def _cte(eight_bit: bool) -> str:
    return _field("Content-Transfer-Encoding", "8bit") if eight_bit else ""


def _clean(text: str) -> str:
    return _CONTROL_RE.sub("?", _BREAK_RE.sub(" ", text)).strip()


def _typed(value: str, default_type: str) -> tuple[str, str]:
    """`(type, text)` of `type; text`, or `(default_type, value)` for an untyped value."""
    m = _TYPED_RE.fullmatch(value)
    return (m.group(1), m.group(2).strip()) if m else (default_type, value.strip())


def _unbracket(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def _unichar(m: re.Match[str]) -> str:
    code = int(m.group(1), 16)
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return chr(code)


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # octets the parser kept as they came
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _encode(text: str) -> bytes:
    """Our parts as UTF-8; a lone surrogate (an undecodable octet) becomes "?"."""
    return text.encode("utf-8", "replace")


# -- reading the original ---------------------------------------------------------


class _Scan:
    """What the report needs to know of the original, seen once in pieces:
    is its header section ASCII, is all of it, and does a line of it start
    with the boundary's delimiter (a line ends at LF or, for email parsers
    that also split there, at a bare CR)."""

    __slots__ = ("_carry", "_marks", "ascii", "collision", "headers_ascii", "in_headers")

    def __init__(self, boundary: bytes) -> None:
        self._marks = (b"\n--" + boundary, b"\r--" + boundary)
        self._carry = b"\n"  # the message starts at a line start
        self.in_headers = True
        self.headers_ascii = True
        self.ascii = True
        self.collision = False

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk
        if self.in_headers:
            end = data.find(b"\n\n")
            if not (data if end < 0 else data[: end + 1]).isascii():
                self.headers_ascii = False
            self.in_headers = end < 0
        if self.ascii and not chunk.isascii():
            self.ascii = False
        if not self.collision:
            self.collision = any(mark in data for mark in self._marks)
        self._carry = data[-(len(self._marks[0]) - 1) :]


def _read_header_section(original: _Readable, limit: int) -> bytes:
    """The header section of the original, each line with its LF: its lines
    up to the first one that is not part of a header field, at most `limit`
    octets, cut at a line end.

    A line is part of a field when it starts one (`name:`, RFC 5322 §3.6.8)
    or, after the first, folds the one before (it starts with a space or a
    tab and holds more than white space, §2.2.3). The empty line that ends
    the section stops it, and so does the first line of body text in a
    message that has no empty line: body text is never returned as headers.
    """
    data = _read_up_to(original, limit + 1)  # one octet more tells a longer section
    end = 0
    while end < len(data):
        newline = data.find(b"\n", end)
        line_end = len(data) if newline < 0 else newline + 1
        if line_end > limit or not _is_field_line(data[end:line_end], first=end == 0):
            break
        end = line_end
    return data[:end]


def _is_field_line(line: bytes, *, first: bool) -> bool:
    if line[:1] in (b" ", b"\t"):
        return not first and not line.isspace()
    return _FIELD_START_RE.match(line) is not None


def _read_up_to(original: _Readable, size: int) -> bytes:
    """At most `size` octets from `original`: fewer only at its end."""
    buf = bytearray()
    while len(buf) < size and (chunk := original.read(min(CHUNK_SIZE, size - len(buf)))):
        buf += chunk
    return bytes(buf)


def _without_return_path(section: bytes) -> bytes:
    """A header section without its `Return-Path:` fields (and their folded
    lines): the server's own trace field, added at delivery, is no part of
    what the sender sent, and never goes into a report."""
    if not _RETURN_PATH_RE.search(section):
        return section
    kept = []
    dropping = False
    for line in _LINE_RE.findall(section):
        if line[:1] not in (b" ", b"\t"):
            dropping = _RETURN_PATH_RE.match(line) is not None
        if not dropping:
            kept.append(line)
    return b"".join(kept)
