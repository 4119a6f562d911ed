"""SASL for SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN mechanisms.

Pure decoding; the check of the password is the shell's (it is slow on
purpose and runs in a threadpool). A `SASLExchange` is fed the client's
responses and says what to send next: a challenge, a refusal, or the
credentials to verify.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

from . import replies as R

MECHANISMS = ("PLAIN", "LOGIN")
#: RFC 4954 §4: a server must accept AUTH command and response lines this long.
MAX_AUTH_LINE = 12288

CANCELLED = R.reply(501, "5.7.0", "Authentication cancelled")
BAD_BASE64 = R.reply(501, "5.5.2", "Cannot decode response")
BAD_RESPONSE = R.reply(501, "5.5.2", "Malformed authentication response")
BAD_MECHANISM = R.reply(504, "5.5.4", "Unrecognized authentication type")
LINE_TOO_LONG = R.reply(500, "5.5.6", "Authentication exchange line is too long")

_USERNAME = R.reply(334, None, "VXNlcm5hbWU6")  # base64("Username:")
_PASSWORD = R.reply(334, None, "UGFzc3dvcmQ6")  # base64("Password:")
_EMPTY_CHALLENGE = R.reply(334, None, "")


@dataclass(frozen=True)
class Credentials:
    mechanism: str
    login: str
    password: str = field(repr=False)  # never in a repr, and so never in a log


class SASLError(Exception):
    def __init__(self, reply: R.Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def decode(response: bytes) -> bytes:
    """A client response: base64, `=` for empty, `*` to cancel (RFC 4954 §4)."""
    response = response.strip()
    if response == b"*":
        raise SASLError(CANCELLED)
    if response == b"=":
        return b""
    try:
        return binascii.a2b_base64(response, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SASLError(BAD_BASE64) from None


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(BAD_RESPONSE) from None


def parse_plain(message: bytes) -> Credentials:
    """`[authzid] NUL authcid NUL passwd` (RFC 4616 §2)."""
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SASLError(BAD_RESPONSE)
    authzid, authcid, password = (_text(p) for p in parts)
    if authzid and authzid != authcid:
        # Acting for another user is not supported: refuse rather than ignore it.
        raise SASLError(R.reply(535, "5.7.8", "Authentication credentials invalid"))
    return Credentials("PLAIN", authcid, password)


class SASLExchange:
    """One AUTH exchange. `start()` then `respond()` per client line.

    Each returns a `Reply` to send (a challenge) or the `Credentials` to check;
    errors raise `SASLError` with the reply to send.
    """

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise SASLError(BAD_MECHANISM)
        self.mechanism = mechanism
        self._login: str | None = None

    def start(self, initial: bytes | None) -> R.Reply | Credentials:
        if self.mechanism == "PLAIN":
            if initial is None:
                return _EMPTY_CHALLENGE
            return parse_plain(decode(initial))
        if initial is None:
            return _USERNAME
        return self.respond(initial)

    def respond(self, line: bytes) -> R.Reply | Credentials:
        data = decode(line)
        if self.mechanism == "PLAIN":
            return parse_plain(data)
        if self._login is None:
            self._login = _text(data)
            if not self._login:
                raise SASLError(BAD_RESPONSE)
            return _PASSWORD
        return Credentials("LOGIN", self._login, _text(data))
