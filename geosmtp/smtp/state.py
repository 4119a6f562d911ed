"""SMTP session states and the two tables that govern them.

`SEQUENCE` (RFC 5321 §4.1.4, §4.3.2) lists every command the server knows, in
the order HELP shows them, with the states it may run in and the reply a
client gets in each other command state. The session consults it for every
command before the command's handler runs; no handler checks the state itself.
(A few refusals that do not depend on the state, such as STARTTLS with TLS
already on, come before it: see `SMTPConnection._handle_command`.)

`TRANSITIONS` says where each step leads from each state: a command accepted,
a message ended, a verdict from the shell, the end of the connection. Every
change of `SMTPConnection.state` is a step in it; a step the table does not
have from the current state is a misuse of the connection (`ProtocolError`)
and leaves it in `ERROR`, from which only closing is possible. The client
cannot cause one: its commands are checked against `SEQUENCE` first and
refused with a reply.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import replies as R


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


@dataclass(frozen=True)
class Rule:
    """When a command may run: in every command state but those in `refused`,
    which gives the reply for each of them."""

    refused: Mapping[State, R.Reply] = field(default_factory=dict)
    #: Data follows the command whatever the verdict (BDAT's chunk): it is read,
    #: then refused, so that it is never taken for commands (RFC 3030 §3).
    payload: bool = False


_ANY_TIME = Rule()
_NOT_IN_A_TRANSACTION = {state: R.TRANSACTION_IN_PROGRESS for state in TRANSACTION_STATES}

#: verb -> when it may run, for every verb the server knows, in HELP's order.
SEQUENCE: dict[str, Rule] = {
    "EHLO": _ANY_TIME,
    "HELO": _ANY_TIME,
    "MAIL": Rule(
        {
            State.CONNECTED: R.BAD_SEQUENCE_HELO,
            State.MAIL: R.BAD_SEQUENCE_NESTED_MAIL,
            State.RCPT: R.BAD_SEQUENCE_NESTED_MAIL,
            State.BDAT: R.BAD_SEQUENCE_NESTED_MAIL,
        }
    ),
    "RCPT": Rule(
        {
            State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
            State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
            State.BDAT: R.BAD_SEQUENCE_BDAT_IN_PROGRESS,
        }
    ),
    "DATA": Rule(
        {
            State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
            State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
            State.MAIL: R.BAD_SEQUENCE_NEED_RCPT,
            State.BDAT: R.BAD_SEQUENCE_DATA_AFTER_BDAT,
        }
    ),
    "RSET": _ANY_TIME,
    "NOOP": _ANY_TIME,
    "QUIT": _ANY_TIME,
    "VRFY": _ANY_TIME,
    "HELP": _ANY_TIME,
    "BDAT": Rule(
        {
            State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
            State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
            State.MAIL: R.BAD_SEQUENCE_NEED_RCPT,
        },
        payload=True,
    ),
    # RFC 3207 §4 and RFC 4954 §4: not inside a mail transaction.
    "STARTTLS": Rule(_NOT_IN_A_TRANSACTION),
    "AUTH": Rule({State.CONNECTED: R.BAD_SEQUENCE_HELO, **_NOT_IN_A_TRANSACTION}),
}


def sequence_error(verb: str, state: State) -> R.Reply | None:
    """The reply refusing `verb` in `state`, or None when the verb may run now."""
    return SEQUENCE[verb].refused.get(state)


# Reading input, the session may close (QUIT, too many errors, the shell's
# close_with) or find the input at its end (the client closed its side).
_READING = {"close": State.CLOSED, "end_of_input": State.CLOSED}

#: state -> {step: the state it leads to}. Steps: greet (EHLO/HELO accepted),
#: reset (RSET/EHLO/HELO abandon a transaction), mail, rcpt, data, bdat (the
#: first chunk), starttls, auth (the commands accepted), message_end,
#: message_refused (at its end: too big, a line too long), then the shell's
#: calls: message_stored, message_failed, auth_result, tls_started, close, and
#: end_of_input (receive_data(b"") and all complete input before it processed).
TRANSITIONS: dict[State, dict[str, State]] = {
    State.CONNECTED: {
        "greet": State.GREETED,
        "starttls": State.TLS_HANDSHAKE,
        **_READING,
    },
    State.GREETED: {
        "greet": State.GREETED,
        "mail": State.MAIL,
        "starttls": State.TLS_HANDSHAKE,
        "auth": State.AUTHENTICATING,
        **_READING,
    },
    State.MAIL: {"rcpt": State.RCPT, "reset": State.GREETED, **_READING},
    State.RCPT: {
        "rcpt": State.RCPT,
        "data": State.DATA,
        "bdat": State.BDAT,
        "reset": State.GREETED,
        **_READING,
    },
    State.DATA: {
        "message_end": State.DELIVERING,
        "message_refused": State.GREETED,
        **_READING,
    },
    State.BDAT: {
        "message_end": State.DELIVERING,
        "message_refused": State.GREETED,
        "reset": State.GREETED,
        **_READING,
    },
    State.DELIVERING: {
        "message_stored": State.GREETED,
        "message_failed": State.GREETED,
        "close": State.CLOSED,
    },
    State.AUTHENTICATING: {"auth_result": State.GREETED, "close": State.CLOSED},
    State.TLS_HANDSHAKE: {"tls_started": State.CONNECTED, "close": State.CLOSED},
    State.ERROR: {"close": State.CLOSED},
    State.CLOSED: {},
}
