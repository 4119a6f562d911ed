"""SMTP session states and the table of steps between them.

`TRANSITIONS` says where each `Step` leads from each state: a command accepted,
a message ended, a verdict from the shell, the end of the connection. Every
change of `SMTPConnection.state` is a step in it; a step the table does not
have from the current state is a misuse of the connection (`ProtocolError`)
and leaves it in `ERROR`, from which only closing is possible. The client
cannot cause one: its commands are checked against the connection's command
table (`SMTPConnection.COMMANDS`, whose parts are in `rules.py`) first and
refused with a reply.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    CONNECTED = "connected"  # greeting sent, no EHLO/HELO yet
    GREETED = "greeted"  # EHLO/HELO accepted, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading the message after 354
    BDAT = "bdat"  # a message is arriving in BDAT chunks (RFC 3030); commands between
    DELIVERING = "delivering"  # end of data seen; waiting for the shell's verdict
    AUTHENTICATING = "authenticating"  # AuthRequest given; waiting for auth_result()
    TLS_HANDSHAKE = "tls_handshake"  # StartTLS given (220 queued); waiting for tls_started()
    CLOSED = "closed"  # 221 or 421 sent, or the client closed its side; nothing more is read
    ERROR = "error"  # the shell misused the connection (ProtocolError); it may only close

    # Members are singletons compared by identity, so the identity hash agrees
    # with ==; Enum's own __hash__ is a Python call, paid on every table lookup.
    __hash__ = object.__hash__


#: States in which the session reads command lines.
COMMAND_STATES = frozenset({State.CONNECTED, State.GREETED, State.MAIL, State.RCPT, State.BDAT})
#: States with a transaction (MAIL given) that RSET, EHLO or HELO abandon.
TRANSACTION_STATES = frozenset({State.MAIL, State.RCPT, State.BDAT})
#: States in which the connection waits for the shell; nothing is read meanwhile.
WAITING_STATES = frozenset(
    {State.DELIVERING, State.AUTHENTICATING, State.TLS_HANDSHAKE, State.ERROR}
)


class Step(enum.StrEnum):
    """A step in `TRANSITIONS`: a command accepted, a message ended or refused, a
    verdict or call of the shell, the end of the connection."""

    GREET = "greet"  # EHLO/HELO accepted
    RESET = "reset"  # RSET/EHLO/HELO abandon a transaction
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    BDAT = "bdat"  # the first chunk of a message
    STARTTLS = "starttls"
    AUTH = "auth"
    MESSAGE_END = "message_end"
    MESSAGE_REFUSED = "message_refused"  # at its end: too big, a line too long
    MESSAGE_STORED = "message_stored"
    MESSAGE_FAILED = "message_failed"
    AUTH_RESULT = "auth_result"
    TLS_STARTED = "tls_started"
    CLOSE = "close"
    END_OF_INPUT = "end_of_input"  # receive_data(b"") and all complete input before it processed


# Reading input, the session may close (QUIT, too many errors, the shell's
# close_with) or find the input at its end (the client closed its side).
_READING = {Step.CLOSE: State.CLOSED, Step.END_OF_INPUT: State.CLOSED}

#: state -> {step: the state it leads to}.
TRANSITIONS: dict[State, dict[Step, State]] = {
    State.CONNECTED: {
        Step.GREET: State.GREETED,
        Step.STARTTLS: State.TLS_HANDSHAKE,
        **_READING,
    },
    State.GREETED: {
        Step.GREET: State.GREETED,
        Step.MAIL: State.MAIL,
        Step.STARTTLS: State.TLS_HANDSHAKE,
        Step.AUTH: State.AUTHENTICATING,
        **_READING,
    },
    State.MAIL: {Step.RCPT: State.RCPT, Step.RESET: State.GREETED, **_READING},
    State.RCPT: {
        Step.RCPT: State.RCPT,
        Step.DATA: State.DATA,
        Step.BDAT: State.BDAT,
        Step.RESET: State.GREETED,
        **_READING,
    },
    State.DATA: {
        Step.MESSAGE_END: State.DELIVERING,
        Step.MESSAGE_REFUSED: State.GREETED,
        **_READING,
    },
    State.BDAT: {
        Step.MESSAGE_END: State.DELIVERING,
        Step.MESSAGE_REFUSED: State.GREETED,
        Step.RESET: State.GREETED,
        **_READING,
    },
    State.DELIVERING: {
        Step.MESSAGE_STORED: State.GREETED,
        Step.MESSAGE_FAILED: State.GREETED,
        Step.CLOSE: State.CLOSED,
    },
    State.AUTHENTICATING: {Step.AUTH_RESULT: State.GREETED, Step.CLOSE: State.CLOSED},
    State.TLS_HANDSHAKE: {Step.TLS_STARTED: State.CONNECTED, Step.CLOSE: State.CLOSED},
    State.ERROR: {Step.CLOSE: State.CLOSED},
    State.CLOSED: {},
}
