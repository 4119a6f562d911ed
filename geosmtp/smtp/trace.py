"""Trace header fields added on delivery (RFC 5321 §4.4, RFC 3848)."""

from __future__ import annotations

import email.utils
import re

from .session import Envelope

# Anything a client chose (HELO name, addresses) goes through this before it is
# put in a header: control characters (CR and LF above all) would let a client
# add header lines of its own; parentheses and backslashes would break out of
# the comment that holds them.
_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f()\\]")


def header_safe(text: str) -> str:
    return _UNSAFE_RE.sub("?", text)


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
    date = email.utils.formatdate(timestamp, localtime=True)
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
