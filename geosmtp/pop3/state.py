"""POP3 session states (RFC 1939 §3) and the two tables that govern them.

`SEQUENCE` lists every command the server knows, in the order of RFC 1939
and its extensions, with the reply a client gets in each command state where
the command may not run. The session consults it for every command before
the command's handler runs; no handler checks the state itself.

`TRANSITIONS` says where each step leads from each state: a command accepted,
a verdict from the shell, a close, the end of the input. Every change of
`POP3Connection.state` is a step in it; a step the table does not have from
the current state is a misuse of the connection (`ProtocolError`, from the shared
protocol base) and leaves it in `ERROR`, from which only closing leads out.
The client cannot cause one: its commands are checked against `SEQUENCE`
first and refused with a reply.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..protocol import StatusReply
from . import replies as R

__all__ = [
    "COMMAND_STATES",
    "SEQUENCE",
    "TRANSITIONS",
    "WAITING_STATES",
    "Rule",
    "State",
]


class State(enum.Enum):
    AUTHORIZATION = "authorization"  # greeting sent, nobody logged in (RFC 1939 §4)
    AUTHENTICATING = "authenticating"  # AuthRequest given; waiting for login_ok()/login_failed()
    TLS_HANDSHAKE = "tls_handshake"  # StartTLS given (+OK queued); waiting for tls_started()
    TRANSACTION = "transaction"  # logged in, the maildrop locked (RFC 1939 §5)
    RETRIEVING = "retrieving"  # Retrieve given; waiting for retrieve_result()
    UPDATE = "update"  # QUIT in TRANSACTION, Update given; waiting for update_result() (§6)
    CLOSED = "closed"  # the last reply is queued, or the client closed; nothing more is read
    ERROR = "error"  # the shell misused the connection (ProtocolError); it may only close

    # Identity hash, as in the SMTP core: Enum's own __hash__ is a Python call.
    __hash__ = object.__hash__


#: States in which the session reads command lines.
COMMAND_STATES = frozenset({State.AUTHORIZATION, State.TRANSACTION})
#: States in which the connection waits for the shell; nothing is read meanwhile.
WAITING_STATES = frozenset(
    {State.AUTHENTICATING, State.TLS_HANDSHAKE, State.RETRIEVING, State.UPDATE, State.ERROR}
)


@dataclass(frozen=True)
class Rule:
    """When a command may run: in every command state but those in `refused`,
    which gives the reply for each of them."""

    refused: Mapping[State, StatusReply] = field(default_factory=dict)


_ANY_TIME = Rule()
_BEFORE_LOGIN = Rule({State.TRANSACTION: R.ALREADY_LOGGED_IN})
_LOGGED_IN = Rule({State.AUTHORIZATION: R.NOT_LOGGED_IN})

#: verb -> when it may run, for every verb the server knows.
SEQUENCE: dict[str, Rule] = {
    "CAPA": _ANY_TIME,  # RFC 2449 §5: in every state
    "QUIT": _ANY_TIME,
    "USER": _BEFORE_LOGIN,
    "PASS": _BEFORE_LOGIN,
    "AUTH": _BEFORE_LOGIN,  # RFC 5034 §4: AUTHORIZATION only
    "STLS": Rule({State.TRANSACTION: R.STLS_AFTER_LOGIN}),  # RFC 2595 §4
    "STAT": _LOGGED_IN,
    "LIST": _LOGGED_IN,
    "RETR": _LOGGED_IN,
    "DELE": _LOGGED_IN,
    "NOOP": _LOGGED_IN,  # RFC 1939 §5: TRANSACTION only
    "RSET": _LOGGED_IN,
    "TOP": _LOGGED_IN,
    "UIDL": _LOGGED_IN,
}

# Reading input, the session may close (QUIT before login, too many bad
# commands, the shell's close_with) or find the input at its end.
_READING = {"close": State.CLOSED, "end_of_input": State.CLOSED}

#: state -> {step: the state it leads to}. Steps: auth (PASS or an AUTH
#: exchange gave credentials), stls, retrieve (RETR or TOP), quit (QUIT after
#: login), then the shell's calls: login_ok, login_failed, tls_started,
#: retrieve_result, update_result, close, and end_of_input (receive_data(b"")
#: and all complete input before it processed).
TRANSITIONS: dict[State, dict[str, State]] = {
    State.AUTHORIZATION: {
        "auth": State.AUTHENTICATING,
        "stls": State.TLS_HANDSHAKE,
        **_READING,
    },
    State.AUTHENTICATING: {
        "login_ok": State.TRANSACTION,
        "login_failed": State.AUTHORIZATION,
        "close": State.CLOSED,
    },
    State.TLS_HANDSHAKE: {"tls_started": State.AUTHORIZATION, "close": State.CLOSED},
    State.TRANSACTION: {"retrieve": State.RETRIEVING, "quit": State.UPDATE, **_READING},
    State.RETRIEVING: {"retrieve_result": State.TRANSACTION, "close": State.CLOSED},
    State.UPDATE: {"update_result": State.CLOSED, "close": State.CLOSED},
    State.ERROR: {"close": State.CLOSED},
    State.CLOSED: {},
}
