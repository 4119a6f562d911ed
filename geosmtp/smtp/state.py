"""SMTP session states and the command sequencing table (RFC 5321 §4.1.4, §4.3.2).

The table says, for each verb that depends on the transaction state, in which
states it is accepted and which reply a client gets when it is not. Verbs not
in the table (RSET, NOOP, QUIT, HELP, VRFY, EHLO, HELO) are valid in any
command state.
"""

from __future__ import annotations

import enum

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


#: verb -> (states where it is accepted, {other command state: reply})
SEQUENCE: dict[str, tuple[frozenset[State], dict[State, R.Reply]]] = {
    "MAIL": (
        frozenset({State.GREETED}),
        {
            State.CONNECTED: R.BAD_SEQUENCE_HELO,
            State.MAIL: R.BAD_SEQUENCE_NESTED_MAIL,
            State.RCPT: R.BAD_SEQUENCE_NESTED_MAIL,
            State.BDAT: R.BAD_SEQUENCE_NESTED_MAIL,
        },
    ),
    "RCPT": (
        frozenset({State.MAIL, State.RCPT}),
        {
            State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
            State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
            State.BDAT: R.BAD_SEQUENCE_BDAT_IN_PROGRESS,
        },
    ),
    "DATA": (
        frozenset({State.RCPT}),
        {
            State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
            State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
            State.MAIL: R.BAD_SEQUENCE_NEED_RCPT,
            State.BDAT: R.BAD_SEQUENCE_DATA_AFTER_BDAT,
        },
    ),
    # BDAT's chunk is read whatever the state; its handler asks this table after.
    "BDAT": (
        frozenset({State.RCPT, State.BDAT}),
        {
            State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
            State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
            State.MAIL: R.BAD_SEQUENCE_NEED_RCPT,
        },
    ),
}


def sequence_error(verb: str, state: State) -> R.Reply | None:
    """The 503 reply for `verb` in `state`, or None when the verb may run now."""
    rule = SEQUENCE.get(verb)
    if rule is None or state in rule[0]:
        return None
    return rule[1][state]


#: States in which the session reads command lines.
COMMAND_STATES = frozenset({State.CONNECTED, State.GREETED, State.MAIL, State.RCPT, State.BDAT})
#: States with a transaction (MAIL given) that RSET, EHLO or HELO abandon.
TRANSACTION_STATES = frozenset({State.MAIL, State.RCPT, State.BDAT})
