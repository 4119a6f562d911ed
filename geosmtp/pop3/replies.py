"""POP3 replies (RFC 1939 §3) with extended response codes (RFC 2449 §8, RFC 3206).

The wording of every reply the POP3 server sends is in this file: constants
(reply values, `geosmtp.protocol.StatusReply`, which render themselves) for
the fixed ones, small functions for those with a variable
part (a count, a size, a unique-id listing). Nothing here echoes client input:
the variable parts are numbers, the server's own names and the texts the
shell passes to `closing()` and `login_failed()`, which are made safe for a
reply line (`one_line`).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..protocol import sasl
from ..protocol.replies import StatusReply

#: RFC 2449 §4: a reply line is at most 512 octets, CRLF included; the room
#: left for a text given by the shell, after "-ERR [SYS/TEMP] ".
MAX_TEXT = 400


def ok(text: str = "") -> StatusReply:
    return StatusReply(f"+OK {text}" if text else "+OK")


def err(text: str, code: str | None = None) -> StatusReply:
    """`-ERR [code] text` (a response code per RFC 2449 §8, or none)."""
    prefix = f"[{code}] " if code else ""
    return StatusReply(f"-ERR {prefix}{text}")


def multiline(first: StatusReply, lines: Iterable[str]) -> StatusReply:
    """A multi-line reply (RFC 1939 §3): the status line, the lines byte-stuffed,
    and "." alone to end it."""
    return StatusReply(first.line, tuple(lines))


def one_line(text: str, limit: int = MAX_TEXT) -> str:
    """`text` (from the shell) as safe reply text: no line breaks or other
    control characters, at most `limit` characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in text[: limit * 2])
    return " ".join(cleaned.split())[:limit]


def response_code(code: str) -> str:
    """A response code from the shell, kept to its grammar (RFC 2449 §8:
    atoms of letters, digits and "-", separated by "/")."""
    return "".join(c for c in code[:40] if c.isascii() and (c.isalnum() or c in "-/")).upper()


# ------------------------------------------------ replies with a variable part


def greeting(hostname: str) -> StatusReply:
    """The banner (RFC 1939 §4); no APOP timestamp, APOP is not offered."""
    return ok(f"{one_line(hostname, 255)} POP3 server ready")


def signing_off(hostname: str) -> StatusReply:
    """QUIT before login (RFC 1939 §4)."""
    return ok(f"{one_line(hostname, 255)} POP3 server signing off")


def updated(hostname: str, left: int) -> StatusReply:
    """QUIT after the UPDATE state removed the deleted messages (RFC 1939 §6)."""
    what = "maildrop empty" if left == 0 else f"{left} message{'s' * (left != 1)} left"
    return ok(f"{one_line(hostname, 255)} POP3 server signing off ({what})")


def not_updated(failed: int, deleted: int) -> StatusReply:
    """QUIT when some deleted messages could not be removed (RFC 1939 §6)."""
    if failed:
        return err(f"Could not remove {failed} of {deleted} deleted messages.", "SYS/TEMP")
    return err("Some deleted messages were not removed.", "SYS/TEMP")


def stat(count: int, octets: int) -> StatusReply:
    """STAT: exactly `+OK nn mm` (RFC 1939 §5)."""
    return ok(f"{count} {octets}")


def scan_line(number: int, size: int) -> StatusReply:
    """LIST msg: one scan listing (RFC 1939 §5)."""
    return ok(f"{number} {size}")


def scan_listing(entries: Iterable[tuple[int, int]], count: int, octets: int) -> StatusReply:
    """LIST: every message not deleted, `number size` a line."""
    first = ok(f"{count} message{'s' * (count != 1)} ({octets} octets)")
    return multiline(first, (f"{n} {size}" for n, size in entries))


def uid_line(number: int, uid: str) -> StatusReply:
    """UIDL msg: one unique-id listing (RFC 1939 §7)."""
    return ok(f"{number} {uid}")


def uid_listing(entries: Iterable[tuple[int, str]]) -> StatusReply:
    """UIDL: every message not deleted, `number uid` a line."""
    return multiline(ok("Unique-ID listing follows"), (f"{n} {uid}" for n, uid in entries))


def retrieving(size: int) -> StatusReply:
    """RETR's status line; the message follows (RFC 1939 §5)."""
    return ok(f"{size} octets")


def maildrop(count: int, octets: int) -> StatusReply:
    """RSET (RFC 1939 §5): what the maildrop holds again."""
    return ok(f"maildrop has {count} message{'s' * (count != 1)} ({octets} octets)")


def capabilities(names: Iterable[str]) -> StatusReply:
    """CAPA (RFC 2449 §5)."""
    return multiline(ok("Capability list follows"), names)


def mechanisms(names: Iterable[str]) -> StatusReply:
    """AUTH without an argument: the SASL mechanisms, one a line, as the
    RFC 1734 drafts had it and Dovecot and Outlook still do."""
    return multiline(ok("Authentication mechanisms follow"), names)


def challenge(text: str) -> StatusReply:
    """A SASL challenge (RFC 5034 §4): `+ base64`, `+ ` for an empty one."""
    return StatusReply(f"+ {text}")


def usage(syntax: str) -> StatusReply:
    """A command with the wrong arguments: how it is written."""
    return err(f"Syntax: {syntax}")


def login_refused(code: str, text: str | None) -> StatusReply:
    """A login that failed, with its response code (RFC 2449 §8.1.2, RFC 3206)."""
    return err(one_line(text) if text else LOGIN_FAILURE_TEXT[code], code)


def closing(text: str, code: str | None = "SYS/TEMP") -> StatusReply:
    """The reply the shell ends the session with (`close_with`): `text` (from
    the shell, made one safe line) after the response code `code`."""
    return err(one_line(text), response_code(code) if code else None)


# ---------------------------------------------------------------- fixed replies

OK = ok()  # NOOP; TOP's status line (RFC 1939 §7: "+OK", then the lines)
LOGGED_IN = ok("Logged in.")
MARKED = ok("Message marked to be deleted.")
USER_OK = ok("Send the password with PASS.")
STLS_READY = ok("Begin TLS negotiation.")

UNKNOWN_COMMAND = err("Unknown command.")
EMPTY_COMMAND = err("Empty command.")
LINE_TOO_LONG = err("Line too long.")
BAD_NUL = err("NUL character in command.")
TOO_MANY_BAD_COMMANDS = err("Too many bad commands.")
NOT_LOGGED_IN = err("Log in first (USER and PASS, or AUTH).")
ALREADY_LOGGED_IN = err("Already logged in.")
STLS_AFTER_LOGIN = err("STLS is only allowed before login.")
BAD_MESSAGE_NUMBER = err("Invalid message number.")
NO_SUCH_MESSAGE = err("No such message.")
MESSAGE_DELETED = err("Message is deleted.")
RETRIEVE_FAILED = err("Cannot read the message now; try again later.", "SYS/TEMP")

# STLS (RFC 2595 §4)
TLS_NOT_AVAILABLE = err("TLS is not available.")
TLS_ALREADY_ACTIVE = err("TLS is already active.")

# USER/PASS and AUTH (RFC 1939 §7, RFC 5034, RFC 3206)
#: The default text after each login failure's response code.
LOGIN_FAILURE_TEXT = {
    "AUTH": "Authentication failed.",
    "IN-USE": "Mailbox is locked by another session.",
    "SYS/TEMP": "Temporary server failure; try again later.",
    "SYS/PERM": "The mailbox cannot be opened.",
}
AUTH_FAILED = err(LOGIN_FAILURE_TEXT["AUTH"], "AUTH")
AUTH_NEEDS_TLS = err("Plaintext authentication is not allowed without TLS.", "AUTH")
PASS_WITHOUT_USER = err("Send USER first.")
BAD_USER_NAME = err("Invalid user name.", "AUTH")
AUTH_LINE_TOO_LONG = err("Authentication line too long.")

#: The SASL exchange's refusals (`sasl.SASLError.problem`) in POP3's words.
SASL_ERRORS = {
    sasl.Problem.CANCELLED: err("Authentication cancelled."),
    sasl.Problem.BAD_BASE64: err("Cannot decode the base64 response."),
    sasl.Problem.BAD_RESPONSE: err("Malformed authentication response."),
    sasl.Problem.BAD_MECHANISM: err("Unsupported authentication mechanism."),
    sasl.Problem.FAILED: AUTH_FAILED,  # PLAIN acting for another user
}

#: Commands with the wrong arguments: how each is written.
SYNTAX = {
    "CAPA": "CAPA",
    "QUIT": "QUIT",
    "USER": "USER name",
    "PASS": "PASS password",
    "AUTH": "AUTH [mechanism [initial-response]]",
    "STLS": "STLS",
    "STAT": "STAT",
    "LIST": "LIST [msg]",
    "RETR": "RETR msg",
    "DELE": "DELE msg",
    "NOOP": "NOOP",
    "RSET": "RSET",
    "TOP": "TOP msg n",
    "UIDL": "UIDL [msg]",
}

# ------------------------------- the shell's: over the cap, and close_with() texts

TOO_MANY_CLIENTS = err("Too many connections; try again later.", "SYS/TEMP")
STOPPING = err("Server shutting down; try again later.", "SYS/TEMP")
#: client_limits.max_connections: this client address has that many open.
TOO_MANY_FROM_ADDRESS = err("Too many connections from your address; try again later.", "SYS/TEMP")

#: Replies for `POP3Connection.close_with(reply)`.
AUTOLOGOUT = closing("Autologout: idle for too long.")
SHUTTING_DOWN = closing("Server shutting down.")
KICKED = closing("Connection closed by the administrator.")
INTERNAL_ERROR = closing("Internal server error; closing the connection.")
#: After the last failed login allowed: the refusal's text, and the close.
TOO_MANY_AUTH_FAILURES_TEXT = "Too many authentication failures."
TOO_MANY_AUTH_FAILURES = closing(TOO_MANY_AUTH_FAILURES_TEXT, "AUTH")
