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
        raise SASLError(R.AUTH_CANCELLED)
    if response == b"=":
        return b""
    try:
        return binascii.a2b_base64(response, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SASLError(R.AUTH_BAD_BASE64) from None


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(R.AUTH_BAD_RESPONSE) from None


def parse_plain(message: bytes) -> Credentials:
    """`[authzid] NUL authcid NUL passwd` (RFC 4616 §2)."""
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SASLError(R.AUTH_BAD_RESPONSE)
    authzid, authcid, password = (_text(p) for p in parts)
    if authzid and authzid != authcid:
        # Acting for another user is not supported: refuse rather than ignore it.
        raise SASLError(R.AUTH_FAILED)
    return Credentials("PLAIN", authcid, password)


class SASLExchange:
    """One AUTH exchange. `start()` then `respond()` per client line.

    Each returns a `Reply` to send (a challenge) or the `Credentials` to check;
    errors raise `SASLError` with the reply to send.
    """

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise SASLError(R.AUTH_BAD_MECHANISM)
        self.mechanism = mechanism
        self._login: str | None = None

    def start(self, initial: bytes | None) -> R.Reply | Credentials:
        if self.mechanism == "PLAIN":
            if initial is None:
                return R.AUTH_EMPTY_CHALLENGE
            return parse_plain(decode(initial))
        if initial is None:
            return R.AUTH_ASK_USERNAME
        return self.respond(initial)

    def respond(self, line: bytes) -> R.Reply | Credentials:
        data = decode(line)
        if self.mechanism == "PLAIN":
            return parse_plain(data)
        if self._login is None:
            self._login = _text(data)
            if not self._login:
                raise SASLError(R.AUTH_BAD_RESPONSE)
            return R.AUTH_ASK_PASSWORD
        return Credentials("LOGIN", self._login, _text(data))
