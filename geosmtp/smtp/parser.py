"""Parsing of SMTP command lines, paths and ESMTP parameters (RFC 5321 §4.1).

Pure functions over `bytes`/`str`; they raise `SyntaxProblem` and never touch
the session state, so the state machine decides what each failure means.
"""

from __future__ import annotations

import ipaddress
import re

from ..mail.address import DOT_STRING_RE, DOT_STRING_UTF8_RE, UTF8, Mailbox


class SyntaxProblem(ValueError):
    """The argument does not match the RFC 5321 grammar."""


_QUOTED_STRING_RE = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"')
_QUOTED_STRING_UTF8_RE = re.compile(rf'"((?:[\x20\x21\x23-\x5b\x5d-\x7e{UTF8}]|\\[\x20-\x7e])*)"')
_SUBDOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SUBDOMAIN_UTF8 = rf"[A-Za-z0-9{UTF8}](?:[A-Za-z0-9{UTF8}-]*[A-Za-z0-9{UTF8}])?"
_DOMAIN_RE = re.compile(rf"{_SUBDOMAIN}(?:\.{_SUBDOMAIN})*")
_DOMAIN_UTF8_RE = re.compile(rf"{_SUBDOMAIN_UTF8}(?:\.{_SUBDOMAIN_UTF8})*")
_ADDRESS_LITERAL_RE = re.compile(r"\[([^\[\]\\\s]+)\]")
_GENERAL_LITERAL_RE = re.compile(r"([A-Za-z0-9-]*[A-Za-z0-9]):([\x21-\x5a\x5e-\x7e]+)")
# A source route "@a,@b:" before the mailbox is accepted and ignored (§4.1.2, §C).
# Only at the very start: "@...:" also occurs inside IPv6 literals and quoted parts.
_SOURCE_ROUTE_RE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")
_ESMTP_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_ESMTP_VALUE_UTF8_RE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")

# RFC 5321 §4.5.3.1.1-2: local part 64 octets, domain 255 octets, path 256.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def split_command(line: bytes) -> tuple[str, bytes]:
    """Split a command line (without CRLF) into an upper-cased verb and its argument."""
    verb, _, arg = line.partition(b" ")
    try:
        verb_text = verb.decode("ascii").upper()
    except UnicodeDecodeError:
        verb_text = ""
    return verb_text, arg.strip(b" \t")


def is_valid_domain(text: str, utf8: bool = False) -> bool:
    if not text or len(text.encode("utf-8")) > MAX_DOMAIN:
        return False
    if (_DOMAIN_UTF8_RE if utf8 else _DOMAIN_RE).fullmatch(text):
        return True
    return is_address_literal(text)


def is_address_literal(text: str) -> bool:
    m = _ADDRESS_LITERAL_RE.fullmatch(text)
    if not m:
        return False
    inner = m.group(1)
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return bool(_GENERAL_LITERAL_RE.fullmatch(inner)) and ":" in inner
    return True


def parse_mailbox(text: str, utf8: bool = False) -> Mailbox:
    """Parse `Local-part "@" ( Domain / address-literal )` (§4.1.2)."""
    at = text.rfind("@")
    if at <= 0:
        raise SyntaxProblem("mailbox needs local-part@domain")
    local_text, domain = text[:at], text[at + 1 :]
    quoted = (_QUOTED_STRING_UTF8_RE if utf8 else _QUOTED_STRING_RE).fullmatch(local_text)
    if quoted:
        local = re.sub(r"\\(.)", r"\1", quoted.group(1))
    elif (DOT_STRING_UTF8_RE if utf8 else DOT_STRING_RE).fullmatch(local_text):
        local = local_text
    else:
        raise SyntaxProblem("bad local part")
    if len(local_text.encode("utf-8")) > MAX_LOCAL_PART:
        raise SyntaxProblem("local part too long")
    if not is_valid_domain(domain, utf8):
        raise SyntaxProblem("bad domain")
    if not domain.startswith("["):
        domain = domain.lower()
    return Mailbox(local, domain)


def _split_path(arg: str) -> tuple[str, str]:
    """Return (the text inside <...>, the parameters after it)."""
    if not arg.startswith("<"):
        raise SyntaxProblem("path must be enclosed in <>")
    # A quoted local part may contain '>', so find the closing bracket after it.
    i = 1
    if arg[1:2] == '"':
        m = re.match(r'"(?:[^"\\]|\\.)*"', arg[1:])
        if not m:
            raise SyntaxProblem("unterminated quoted string")
        i = 1 + m.end()
    end = arg.find(">", i)
    if end < 0:
        raise SyntaxProblem("path must be enclosed in <>")
    rest = arg[end + 1 :]
    if rest and not rest.startswith(" "):
        raise SyntaxProblem("garbage after path")
    return arg[1:end], rest.strip(" ")


def parse_params(text: str, utf8: bool = False) -> dict[str, str | None]:
    """Parse `esmtp-param *(SP esmtp-param)`; keywords upper-cased (§4.1.2)."""
    params: dict[str, str | None] = {}
    value_re = _ESMTP_VALUE_UTF8_RE if utf8 else _ESMTP_VALUE_RE
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD_RE.fullmatch(key) or (eq and not value_re.fullmatch(value)):
            raise SyntaxProblem(f"bad parameter {item!r}")
        params[key.upper()] = value if eq else None
    return params


def _decode_arg(arg: bytes) -> str:
    try:
        return arg.decode("utf-8")
    except UnicodeDecodeError:
        raise SyntaxProblem("argument is not valid UTF-8") from None


def _after_keyword(arg: bytes, keyword: bytes) -> str:
    """`FROM:<...>` -> `<...>`; tolerates spaces after the colon, as Postfix does."""
    if arg[: len(keyword)].upper() != keyword:
        raise SyntaxProblem(f"expected {keyword.decode()}")
    return _decode_arg(arg[len(keyword) :]).lstrip(" ")


def _strip_source_route(inside: str) -> str:
    m = _SOURCE_ROUTE_RE.match(inside)
    return inside[m.end() :] if m else inside


def parse_mail_from(
    arg: bytes, utf8_allowed: bool = False
) -> tuple[Mailbox | None, dict[str, str | None]]:
    """`MAIL FROM:<reverse-path> [params]`; returns (None, params) for the null path <>."""
    text = _after_keyword(arg, b"FROM:")
    inside, rest = _split_path(text)
    params = parse_params(rest, utf8=True)
    utf8 = utf8_allowed and "SMTPUTF8" in params
    if inside == "":
        return None, params
    if len(inside) + 2 > MAX_PATH:
        raise SyntaxProblem("path too long")
    inside = _strip_source_route(inside)
    return parse_mailbox(inside, utf8=utf8), params


def parse_rcpt_to(arg: bytes, utf8: bool = False) -> tuple[Mailbox, dict[str, str | None]]:
    """`RCPT TO:<forward-path> [params]`; `<postmaster>` alone is allowed (§4.1.1.3)."""
    text = _after_keyword(arg, b"TO:")
    inside, rest = _split_path(text)
    params = parse_params(rest, utf8=utf8)
    if inside.lower() == "postmaster":
        return Mailbox("postmaster", ""), params
    if len(inside) + 2 > MAX_PATH:
        raise SyntaxProblem("path too long")
    inside = _strip_source_route(inside)
    return parse_mailbox(inside, utf8=utf8), params


def parse_helo_name(arg: bytes) -> str:
    """The EHLO/HELO argument: a domain or address literal (§4.1.1.1).

    Like Postfix by default we accept any single printable word, since many
    clients send bare host names; the Received header still shows it quoted.
    """
    text = _decode_arg(arg)
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise SyntaxProblem("bad HELO name")
    return text
