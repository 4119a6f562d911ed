"""SASL for SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034): the PLAIN
(RFC 4616) and LOGIN mechanisms.

Pure decoding; the check of the password is the shell's (it is slow on
purpose and runs in a threadpool). A `SASLExchange` is fed the client's
responses and says what to send next: a `Challenge`, a refusal (`SASLError`
with its `Problem`), or the credentials to verify. Each core words the
challenge and the refusal in its own replies.
"""

from __future__ import annotations

import binascii
import enum
from dataclasses import dataclass, field

MECHANISMS = ("PLAIN", "LOGIN")
#: RFC 4954 §4: a server must accept AUTH command and response lines this long.
MAX_AUTH_LINE = 12288


@dataclass(frozen=True)
class Credentials:
    mechanism: str
    login: str
    password: str = field(repr=False)  # never in a repr, and so never in a log


class Problem(enum.Enum):
    """Why an exchange was refused (each core has a reply for each)."""

    CANCELLED = "the client cancelled the exchange"  # "*" (RFC 4954 §4)
    BAD_BASE64 = "the response is not base64"
    BAD_RESPONSE = "the response is malformed"
    BAD_MECHANISM = "the mechanism is not supported"
    FAILED = "acting for another user is not supported"  # PLAIN's authzid


class SASLError(Exception):
    """A refused exchange; its text never holds the client's response."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.value)
        self.problem = problem


@dataclass(frozen=True)
class Challenge:
    """A server challenge, base64 already (empty: PLAIN without an initial response)."""

    text: str


USERNAME = Challenge("VXNlcm5hbWU6")  # base64("Username:"), LOGIN
PASSWORD = Challenge("UGFzc3dvcmQ6")  # base64("Password:"), LOGIN
EMPTY = Challenge("")  # PLAIN without an initial response


def decode(response: bytes) -> bytes:
    """A client response: base64, `=` for empty, `*` to cancel (RFC 4954 §4)."""
    response = response.strip()
    if response == b"*":
        raise SASLError(Problem.CANCELLED)
    if response == b"=":
        return b""
    try:
        return binascii.a2b_base64(response, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SASLError(Problem.BAD_BASE64) from None


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(Problem.BAD_RESPONSE) from None


def parse_plain(message: bytes) -> Credentials:
    """`[authzid] NUL authcid NUL passwd` (RFC 4616 §2)."""
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SASLError(Problem.BAD_RESPONSE)
    authzid, authcid, password = (_text(p) for p in parts)
    if authzid and authzid != authcid:
        # Acting for another user is not supported: refuse rather than ignore it.
        raise SASLError(Problem.FAILED)
    return Credentials("PLAIN", authcid, password)


class SASLExchange:
    """One AUTH exchange. `start()` then `respond()` per client line.

    Each returns a `Challenge` to send or the `Credentials` to check;
    refusals raise `SASLError`.
    """

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise SASLError(Problem.BAD_MECHANISM)
        self.mechanism = mechanism
        self._login: str | None = None

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        if self.mechanism == "PLAIN":
            if initial is None:
                return EMPTY
            return parse_plain(decode(initial))
        if initial is None:
            return USERNAME
        return self.respond(initial)

    def respond(self, line: bytes) -> Challenge | Credentials:
        data = decode(line)
        if self.mechanism == "PLAIN":
            return parse_plain(data)
        if self._login is None:
            self._login = _text(data)
            if not self._login:
                raise SASLError(Problem.BAD_RESPONSE)
            return PASSWORD
        return Credentials("LOGIN", self._login, _text(data))
