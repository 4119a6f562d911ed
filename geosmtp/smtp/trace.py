"""Trace header fields added on delivery (RFC 5321 §4.4, RFC 3848)."""

from __future__ import annotations

import re

from ..mail import Envelope

# Anything a client chose (HELO name, addresses) goes through this before it is
# put in a header: control characters (CR and LF above all, but also NEL and the
# Unicode line separators that some parsers split on) would let a client add
# header lines of its own; parentheses and backslashes would break out of the
# comment that holds them.
_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f()\\\u2028\u2029]")
# The same but parentheses, for a caller that keeps only those that pair up.
_UNSAFE_BUT_PARENTHESES_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")

# What could end or fold a header line, for text outside a comment.
_UNSAFE_LINE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def header_safe(text: str, keep_parentheses: bool = False) -> str:
    """Text a client chose, made safe to stand inside a header comment.

    `keep_parentheses`: the caller pairs them up itself (a nested comment)."""
    return (_UNSAFE_BUT_PARENTHESES_RE if keep_parentheses else _UNSAFE_RE).sub("?", text)


def _path(address: str) -> str:
    """A reverse- or forward-path as it was given: bounces go to exactly this address.

    The parser has validated it (no controls, no line separators), and in a path
    parentheses and backslashes are ordinary quoted characters, not comment
    syntax, so it is copied exactly. Only an address that never came through the
    parser could hold a line break; that one is made safe rather than trusted.
    """
    if _UNSAFE_LINE_RE.search(address):
        return header_safe(address)
    return address


def with_protocol(
    envelope: Envelope, tls: bool = False, authenticated: bool = False, protocol: str = "smtp"
) -> str:
    """The `with` keyword: `SMTP`, `ESMTP` or, for a message sent with SMTPUTF8,
    `UTF8SMTP` (RFC 6531 §3.7.3), with the RFC 3848 suffixes S (TLS) and A (AUTH);
    for `protocol` "lmtp", `LMTP` (RFC 3848) or `UTF8LMTP`."""
    if protocol == "lmtp":
        base = "UTF8LMTP" if envelope.smtputf8 else "LMTP"
    elif not envelope.esmtp:
        return "SMTP"
    else:
        base = "UTF8SMTP" if envelope.smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def trace_headers(
    envelope: Envelope,
    *,
    hostname: str,
    client_ip: str,
    queue_id: str,
    date: str,
    tls: bool = False,
    authenticated: bool = False,
    protocol: str = "smtp",
) -> bytes:
    """`Return-Path:` and `Received:` lines, LF-terminated, to put before the message.

    `date` is the RFC 5322 date-time of receipt (`email.utils.formatdate`); the
    shell reads the clock, the core does not.
    """
    lines = [
        f"Return-Path: <{_path(envelope.sender_address)}>",
        f"Received: from {header_safe(envelope.helo)} ([{header_safe(client_ip)}])",
        f"\tby {header_safe(hostname)} (geosmtp) with "
        f"{with_protocol(envelope, tls, authenticated, protocol)} id {queue_id}",
    ]
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{_path(envelope.recipients[0].mailbox.address)}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\n".join(lines) + "\n").encode("utf-8")
