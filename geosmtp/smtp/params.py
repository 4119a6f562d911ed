"""The words of the ESMTP extensions: the keywords EHLO advertises, the
arguments of MAIL and RCPT and their parameters (RFC 1870, 6152, 6531, 4954,
3461): which ones this connection takes, and whether their values are right.

Argument checks only, called by the command handlers once the command may run;
whether it may run at all is the command table's answer (`rules.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..mail.limits import Extensions, Limits
from ..mail.xtext import is_xtext
from ..protocol import Reply, sasl
from . import replies as R
from .parser import SyntaxProblem

_DSN_PARAMS = frozenset({"NOTIFY", "ORCPT"})
_NOTIFY_WORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


def is_utf8(arg: bytes) -> bool:
    """Non-ASCII, valid UTF-8: an address that SMTPUTF8 (RFC 6531) would allow."""
    if arg.isascii():
        return False
    try:
        arg.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def ehlo_keywords(ext: Extensions, limits: Limits, offers: Callable[[str], bool]) -> list[str]:
    """The extension keywords of the EHLO reply, in the order they are sent;
    `offers(verb)` says whether the connection offers a verb now."""
    keywords = []
    if ext.pipelining:
        keywords.append("PIPELINING")
    if ext.size:
        keywords.append(f"SIZE {limits.max_message_size}")
    if offers("VRFY"):
        keywords.append("VRFY")
    if offers("STARTTLS"):
        keywords.append("STARTTLS")
    if offers("AUTH"):
        keywords.append("AUTH " + " ".join(sasl.MECHANISMS))
    if ext.enhancedstatuscodes:
        keywords.append("ENHANCEDSTATUSCODES")
    if ext.eightbitmime:
        keywords.append("8BITMIME")
    if ext.dsn:
        keywords.append("DSN")  # RFC 3461; in Postfix's order, after 8BITMIME
    if ext.smtputf8:
        keywords.append("SMTPUTF8")
    if offers("BDAT"):
        keywords.append("CHUNKING")
    return keywords


def mail_syntax_reply(arg: bytes, utf8_allowed: bool) -> Reply:
    """The reply to a MAIL argument the parser refused."""
    if not arg.upper().startswith(b"FROM:"):
        return R.SYNTAX_MAIL
    if is_utf8(arg) and not (utf8_allowed and b" SMTPUTF8" in arg.upper()):
        return R.NEEDS_SMTPUTF8
    return R.BAD_SENDER_SYNTAX


def rcpt_syntax_reply(arg: bytes, smtputf8: bool) -> Reply:
    """The reply to a RCPT argument the parser refused."""
    if not arg.upper().startswith(b"TO:"):
        return R.SYNTAX_RCPT
    if is_utf8(arg) and not smtputf8:
        return R.NEEDS_SMTPUTF8
    return R.BAD_RECIPIENT_SYNTAX


def mail_params_problem(
    params: dict[str, str | None], ext: Extensions, limits: Limits, esmtp: bool
) -> Reply | None:
    """The reply refusing MAIL's parameters, or None when they are all right."""
    for key, value in params.items():
        if key == "SIZE" and ext.size and esmtp:
            # isdigit() alone accepts "²" (int() then raises) and other scripts' digits
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                return R.BAD_PARAMETER_VALUE
            if int(value) > limits.max_message_size:
                return R.SIZE_DECLARED_TOO_BIG
        elif key == "BODY" and ext.eightbitmime and esmtp:
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return R.BAD_PARAMETER_VALUE
        elif key == "SMTPUTF8" and ext.smtputf8 and esmtp:
            if value is not None:
                return R.BAD_PARAMETER_VALUE
        elif key == "AUTH" and ext.auth and esmtp:
            pass  # RFC 4954 §5: the submitter's identity; we record our own login
        elif key == "RET" and ext.dsn and esmtp:
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return R.BAD_PARAMETER_VALUE  # RFC 3461 §4.3
        elif key == "ENVID" and ext.dsn and esmtp:
            if value is None or len(value) > 100 or not is_xtext(value):
                return R.BAD_PARAMETER_VALUE  # RFC 3461 §4.4: xtext, at most 100
        else:
            return R.BAD_PARAMETER
    return None


def rcpt_params(
    params: dict[str, str | None], ext: Extensions, esmtp: bool
) -> tuple[frozenset[str] | None, str | None] | Reply:
    """NOTIFY and ORCPT (RFC 3461 §4.1, §4.2), or the reply refusing the parameters."""
    notify: frozenset[str] | None = None
    orcpt: str | None = None
    try:
        for key, value in params.items():
            if key == "NOTIFY" and ext.dsn and esmtp and value:
                words = frozenset(value.upper().split(","))
                if not words <= _NOTIFY_WORDS or ("NEVER" in words and len(words) > 1):
                    raise SyntaxProblem("NOTIFY: NEVER, or SUCCESS/FAILURE/DELAY")
                notify = words
            elif key == "ORCPT" and ext.dsn and esmtp and value:
                addr_type, _, address = value.partition(";")
                ok = addr_type and address and len(value) <= 500 and is_xtext(address)
                if not ok or not addr_type.replace("-", "").isalnum():
                    raise SyntaxProblem("ORCPT: addr-type;xtext")
                orcpt = value
            else:
                raise SyntaxProblem(f"unknown parameter {key}")
    except SyntaxProblem:
        known = set(params) <= _DSN_PARAMS and ext.dsn and esmtp
        return R.BAD_PARAMETER_VALUE if known else R.BAD_PARAMETER
    return notify, orcpt
