"""SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 2034, RFC 3463).

The wording of every reply the server can send is in this file: constants for
the fixed ones, small functions for those with a variable part (a hostname, a
queue id, a size). The only text from elsewhere is what those functions are
given: the EHLO keywords, which are the extensions' registered names (chosen by
the session from its settings), and HELP's list of verbs (from the session's
dispatcher). The wire format (multi-line continuation, enhanced codes) is
the reply value's (`geosmtp.protocol.replies.Reply`).
"""

from __future__ import annotations

from ..protocol import sasl
from ..protocol.replies import Reply


def reply(code: int, status: str | None, *lines: str) -> Reply:
    return Reply(code, status, tuple(lines) or ("",))


# ------------------------------------------------ replies with a variable part


def greeting(hostname: str) -> Reply:
    """The 220 banner (RFC 5321 §4.3.1); no enhanced code before EHLO."""
    return reply(220, None, f"{hostname} ESMTP geosmtp")


def helo(hostname: str) -> Reply:
    """HELO's 250: no enhanced code in the reply to HELO or EHLO (RFC 2034 §3)."""
    return reply(250, None, hostname)


def ehlo(hostname: str, keywords: list[str]) -> Reply:
    """EHLO's multi-line 250: the hostname, then one extension keyword a line."""
    return reply(250, None, hostname, *keywords)


def closing(hostname: str) -> Reply:
    """QUIT's 221 (RFC 5321 §4.1.1.10)."""
    return reply(221, "2.0.0", f"{hostname} closing connection")


def queued(queue_id: str) -> Reply:
    """The message is durable in every mailbox (the 250 after DATA or BDAT LAST)."""
    return reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def chunk_received(size: int) -> Reply:
    """A BDAT chunk that is not the last (RFC 3030 §2): octets of the message so far."""
    return reply(250, "2.0.0", f"Ok: {size} octets received")


def user_known(address: str) -> Reply:
    """VRFY of a known user: its address in angle brackets (RFC 5321 §3.5.1)."""
    return reply(250, "2.1.5", f"<{address}>")


def refused_by_stage(code: int, status: str | None, text: str | None) -> Reply:
    """A pipeline stage's refusal in its own words (a filter program's first
    stderr line, sanitised by the stage): the one reply whose text may come
    from elsewhere. Without words of its own, the wording of its class."""
    if not text:
        text = STAGE_REFUSED_TEXT if code >= 500 else LOCAL_ERROR.text
    return reply(code, status, text)


def help_list(hostname: str, verbs: list[str], extensions: list[str]) -> Reply:
    """HELP's 214: the commands this session takes and the extensions it offers."""
    return reply(
        214,
        "2.0.0",
        f"{hostname} geosmtp; supported commands:",
        " ".join(verbs),
        "Extensions: " + " ".join(extensions),
        "See RFC 5321",
    )


# ---------------------------------------------------------------- fixed replies

OK = reply(250, "2.0.0", "Ok")  # RSET, NOOP
SENDER_OK = reply(250, "2.1.0", "Ok")
RECIPIENT_OK = reply(250, "2.1.5", "Ok")
START_DATA = reply(354, None, "End data with <CR><LF>.<CR><LF>")
VRFY_CANNOT = reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
VRFY_UNKNOWN_USER = reply(550, "5.1.1", "User unknown")

BAD_SEQUENCE_HELO = reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_NESTED_MAIL = reply(503, "5.5.1", "Error: nested MAIL command")
BAD_SEQUENCE_NEED_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_NEED_RCPT = reply(503, "5.5.1", "Error: need RCPT command")

UNKNOWN_COMMAND = reply(500, "5.5.2", "Error: command not recognized")
COMMAND_TOO_LONG = reply(500, "5.5.2", "Error: command line too long")
TEXT_LINE_TOO_LONG = reply(500, "5.5.2", "Error: message has a line longer than the limit")
BAD_NUL = reply(500, "5.5.2", "Error: NUL character in command")

SYNTAX_HELO = reply(501, "5.5.4", "Syntax: HELO hostname")
SYNTAX_EHLO = reply(501, "5.5.4", "Syntax: EHLO hostname")
SYNTAX_LHLO = reply(501, "5.5.4", "Syntax: LHLO hostname")
SYNTAX_MAIL = reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
SYNTAX_RCPT = reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
SYNTAX_DATA = reply(501, "5.5.4", "Syntax: DATA")
SYNTAX_RSET = reply(501, "5.5.4", "Syntax: RSET")
SYNTAX_QUIT = reply(501, "5.5.4", "Syntax: QUIT")
SYNTAX_VRFY = reply(501, "5.5.4", "Syntax: VRFY address")
BAD_SENDER_SYNTAX = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = reply(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAMETER = reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
BAD_PARAMETER_VALUE = reply(501, "5.5.4", "Bad parameter value")

RELAY_DENIED = reply(550, "5.7.1", "Relay access denied")
UNKNOWN_USER = reply(550, "5.1.1", "Recipient address rejected: user unknown")
BAD_MAILBOX_NAME = reply(550, "5.1.3", "Recipient address rejected: invalid mailbox name")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Error: message exceeds fixed maximum message size")
SIZE_DECLARED_TOO_BIG = reply(552, "5.3.4", "Error: message size exceeds fixed maximum")
LOCAL_ERROR = reply(451, "4.3.0", "Error: local error in processing; try again later")
#: A stage's permanent refusal without text of its own (`refused_by_stage`).
STAGE_REFUSED_TEXT = "Error: message refused"
# RFC 5321 §4.2.2 452, RFC 3463 X.3.1 "mail system full": the disk or a quota
INSUFFICIENT_STORAGE = reply(452, "4.3.1", "Error: insufficient system storage; try again later")

# STARTTLS (RFC 3207)
STARTTLS_READY = reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = reply(454, "4.7.0", "TLS not available due to temporary reason")
TLS_ALREADY_ACTIVE = reply(503, "5.5.1", "Error: TLS already active")
SYNTAX_STARTTLS = reply(501, "5.5.4", "Syntax: STARTTLS")
TRANSACTION_IN_PROGRESS = reply(503, "5.5.1", "Error: MAIL transaction in progress")

# AUTH (RFC 4954)
AUTH_OK = reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_ALREADY = reply(503, "5.5.1", "Error: already authenticated")
AUTH_NOT_ENABLED = reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")
SYNTAX_AUTH = reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
SENDER_NOT_OWNED = reply(553, "5.7.1", "Sender address rejected: not owned by the logged-in user")
RELAY_UNAVAILABLE = reply(451, "4.3.2", "Relaying is not available yet; try again later")
# The SASL exchange (RFC 4954 §4; geosmtp/protocol/sasl.py)
AUTH_CANCELLED = reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = reply(501, "5.5.2", "Cannot decode response")
AUTH_BAD_RESPONSE = reply(501, "5.5.2", "Malformed authentication response")
AUTH_BAD_MECHANISM = reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_LINE_TOO_LONG = reply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_ASK_USERNAME = reply(334, None, sasl.USERNAME.text)  # base64("Username:"), LOGIN
AUTH_ASK_PASSWORD = reply(334, None, sasl.PASSWORD.text)  # base64("Password:"), LOGIN
AUTH_EMPTY_CHALLENGE = reply(334, None, sasl.EMPTY.text)  # PLAIN without an initial response
#: The SASL exchange's refusals (`sasl.SASLError.problem`) in SMTP's words.
SASL_ERRORS = {
    sasl.Problem.CANCELLED: AUTH_CANCELLED,
    sasl.Problem.BAD_BASE64: AUTH_BAD_BASE64,
    sasl.Problem.BAD_RESPONSE: AUTH_BAD_RESPONSE,
    sasl.Problem.BAD_MECHANISM: AUTH_BAD_MECHANISM,
    sasl.Problem.FAILED: AUTH_FAILED,  # PLAIN acting for another user
}


def challenge(text: str) -> Reply:
    """A SASL challenge (RFC 4954 §4): 334 and the base64 text, no enhanced code."""
    return reply(334, None, text)


# SMTPUTF8 (RFC 6531 §3.5)
NEEDS_SMTPUTF8 = reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")

# CHUNKING (RFC 3030)
SYNTAX_BDAT = reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
BAD_SEQUENCE_DATA_AFTER_BDAT = reply(503, "5.5.1", "Error: DATA is not allowed after BDAT")
BAD_SEQUENCE_BDAT_IN_PROGRESS = reply(503, "5.5.1", "Error: BDAT transaction in progress")

TOO_MANY_ERRORS = reply(421, "4.7.0", "Error: too many errors; closing connection")
TOO_MANY_CLIENTS = reply(421, "4.7.0", "Error: too many connections; try again later")
TIMEOUT = reply(421, "4.4.2", "Error: timeout exceeded; closing connection")
SHUTTING_DOWN = reply(421, "4.3.2", "Server shutting down; closing connection")
INTERNAL_ERROR = reply(421, "4.3.0", "Error: internal server error; closing connection")
TOO_MANY_AUTH_FAILURES = reply(421, "4.7.0", "Error: too many authentication failures")
KICKED = reply(421, "4.7.0", "Connection closed by the administrator")

# Per-client limits (the config's client_limits; the shell counts them across workers)
CLIENT_CONNECTIONS = reply(
    421, "4.7.0", "Error: too many connections from your address; try again later"
)
CLIENT_CONNECTION_RATE = reply(
    421, "4.7.0", "Error: too many connections from your address in a minute; try again later"
)
CLIENT_ERRORS = reply(421, "4.7.0", "Error: too many errors from your address; try again later")
MESSAGE_RATE = reply(450, "4.7.1", "Error: too many messages from your address; try again later")
RECIPIENT_RATE = reply(
    450, "4.7.1", "Error: too many recipients from your address; try again later"
)


# ------------------------------------------------- LMTP (RFC 2033), issue 21


def lmtp_greeting(hostname: str) -> Reply:
    """The 220 banner of an `lmtp` listener."""
    return reply(220, None, f"{hostname} LMTP geosmtp")


def lmtp_delivered(queue_id: str, address: str) -> Reply:
    """One LMTP recipient's message is durable in its mailbox (RFC 2033 §4.2)."""
    return reply(250, "2.0.0", f"Ok: {queue_id} delivered to <{address}>")


#: EHLO or HELO on an LMTP connection (RFC 2033 §4.1: LHLO only).
LHLO_ONLY = reply(500, "5.5.1", "Error: this is LMTP; use LHLO")
#: A command that needs the greeting first (SMTP's BAD_SEQUENCE_HELO).
LHLO_FIRST = reply(503, "5.5.1", "Error: send LHLO first")
#: A recipient outside the local domains: LMTP delivers, it never relays.
NOT_LOCAL = reply(550, "5.1.1", "Recipient address rejected: not a local mailbox")
#: A TCP client an `lmtp` listener does not serve (not trusted, not loopback).
LMTP_NOT_ALLOWED = reply(421, "4.7.0", "Error: LMTP is for the local mail system only")
