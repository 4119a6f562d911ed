"""Trace header fields added on delivery (RFC 5321 §4.4, RFC 3848)."""

from __future__ import annotations

import re
import time

from .session import Envelope

# Anything a client chose (HELO name, addresses) goes through this before it is
# put in a header: control characters (CR and LF above all, but also NEL and the
# Unicode line separators that some parsers split on) would let a client add
# header lines of its own; parentheses and backslashes would break out of the
# comment that holds them.
_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f()\\\u2028\u2029]")

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def header_safe(text: str) -> str:
    return _UNSAFE_RE.sub("?", text)


def rfc5322_date(timestamp: float) -> str:
    """`Tue, 04 Jun 2024 10:00:00 +0200` in local time (RFC 5322 §3.3).

    Written out here because `email.utils.formatdate` would import `socket`,
    and the core imports nothing that does I/O; month and day names are fixed
    English, never the locale's.
    """
    second = int(timestamp)
    if _last_date[0] == second:  # one message after another: the same second
        return _last_date[1]
    t = time.localtime(second)
    if t.tm_gmtoff is None:  # offset unknown: "-0000" says so (RFC 5322 §3.3)
        zone = "-0000"
    else:
        minutes = t.tm_gmtoff // 60
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    text = (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {zone}"
    )
    _last_date[:] = [second, text]
    return text


_last_date: list = [None, ""]


def with_protocol(envelope: Envelope, tls: bool = False, authenticated: bool = False) -> str:
    """`SMTP`, or `ESMTP` with the RFC 3848 suffixes S (TLS) and A (AUTH)."""
    if not envelope.esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def trace_headers(
    envelope: Envelope,
    *,
    hostname: str,
    client_ip: str,
    queue_id: str,
    timestamp: float,
    tls: bool = False,
    authenticated: bool = False,
) -> bytes:
    """`Return-Path:` and `Received:` lines, LF-terminated, to put before the message."""
    date = rfc5322_date(timestamp)
    lines = [
        f"Return-Path: <{header_safe(envelope.sender_address)}>",
        f"Received: from {header_safe(envelope.helo)} ([{header_safe(client_ip)}])",
        f"\tby {header_safe(hostname)} (geosmtp) with "
        f"{with_protocol(envelope, tls, authenticated)} id {queue_id}",
    ]
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{header_safe(envelope.recipients[0].mailbox.address)}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\n".join(lines) + "\n").encode("utf-8")
