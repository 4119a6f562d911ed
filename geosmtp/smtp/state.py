"""SMTP session states and the command table (RFC 5321 §4.1.4, §4.3.2).

`SEQUENCE` lists every command the server knows, in the order HELP shows
them, with the states it may run in and the reply a client gets in each other
command state. The session consults it for every command before the
command's handler runs; no handler checks the state itself.
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
    CLOSED = "closed"  # 221 or 421 sent; nothing more is read


#: States in which the session reads command lines.
COMMAND_STATES = frozenset({State.CONNECTED, State.GREETED, State.MAIL, State.RCPT, State.BDAT})
#: States with a transaction (MAIL given) that RSET, EHLO or HELO abandon.
TRANSACTION_STATES = frozenset({State.MAIL, State.RCPT, State.BDAT})


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
