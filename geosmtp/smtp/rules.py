"""The parts of the command table: when a command may run (RFC 5321 §4.1.4,
§4.3.2; RFC 3207 §4, RFC 4954 §4, RFC 3030), and who handles it.

`SMTPConnection.COMMANDS` maps every verb the connection knows, in the order
HELP shows them, to its `Rule`; it is the one place that answers "may this
verb run now". A verb not in it, or whose extension is off (`enabled`), is an
unknown command. Otherwise the refusals come in this order:

1. `first`: refusals that come before the state, because the command cannot be
   taken at all on this connection (TLS already on, AUTH not enabled) or its
   argument decides how to read on (a BDAT whose size is unreadable);
2. `refused`: the reply for each state the command may not run in;
3. `then`: refusals that hold once the state is right (STARTTLS not offered,
   TLS needed before AUTH, AUTH needed before MAIL).

A command with a `payload` (BDAT's chunk) refused at 2 or 3 still has its
payload read, so that it is never taken for commands (RFC 3030 §3). What is
left to the handler is its argument's syntax and the policy on its value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ..mail.limits import Extensions
from ..protocol import Reply
from . import replies as R
from .readers import chunk_header
from .state import TRANSACTION_STATES, State


class Settings(Protocol):
    """What the guards read of the connection's security settings."""

    @property
    def auth_available(self) -> bool: ...
    @property
    def auth_required(self) -> bool: ...


class SMTPConnection(Protocol):
    """What the rules read of the connection (`session.SMTPConnection`); a
    protocol of their own, so that this module does not import the session."""

    @property
    def state(self) -> State: ...
    @property
    def tls(self) -> bool: ...
    @property
    def esmtp(self) -> bool: ...
    @property
    def auth_user(self) -> str | None: ...
    @property
    def extensions(self) -> Extensions: ...
    @property
    def security(self) -> Settings: ...
    @property
    def starttls_offered(self) -> bool: ...
    @property
    def auth_offered(self) -> bool: ...


#: A command handler: an `SMTPConnection` method (or a subclass's) taking the argument.
Handler = Callable[[Any, bytes], None]
#: A test on the connection and the command's argument.
Test = Callable[[SMTPConnection, bytes], bool]


@dataclass(frozen=True)
class Guard:
    """A refusal that the state alone does not decide: `reply` when `test` holds."""

    test: Test
    reply: Reply
    #: A policy refusal, which the access log records (`TransactionRejected`).
    logged: bool = False


class Refusal(NamedTuple):
    reply: Reply
    logged: bool = False  # the shell logs it: a TransactionRejected goes with it
    payload: bool = False  # the command's payload is read before the reply is sent


@dataclass(frozen=True)
class Rule:
    """A verb's handler and when it may run (see the module docstring)."""

    handler: Handler
    refused: Mapping[State, Reply] = field(default_factory=dict)
    first: tuple[Guard, ...] = ()
    then: tuple[Guard, ...] = ()
    payload: bool = False
    #: The verb exists on this connection (its extension is on); None: always.
    enabled: Callable[[SMTPConnection], bool] | None = None
    #: HELP lists it: it may succeed now; None: when enabled.
    offered: Callable[[SMTPConnection], bool] | None = None

    def check(self, conn: SMTPConnection, arg: bytes) -> Refusal | None:
        """Why the command may not run now on `conn`, or None when it may."""
        for guard in self.first:
            if guard.test(conn, arg):
                return Refusal(guard.reply, guard.logged)
        reply = self.refused.get(conn.state)
        if reply is not None:
            return Refusal(reply, payload=self.payload)
        for guard in self.then:
            if guard.test(conn, arg):
                return Refusal(guard.reply, guard.logged, self.payload)
        return None

    def is_offered(self, conn: SMTPConnection) -> bool:
        test = self.offered or self.enabled
        return test is None or test(conn)


# The states a verb may not run in, and the reply for each.
NEED_HELO = {
    State.CONNECTED: R.BAD_SEQUENCE_HELO,
    State.MAIL: R.BAD_SEQUENCE_NESTED_MAIL,
    State.RCPT: R.BAD_SEQUENCE_NESTED_MAIL,
    State.BDAT: R.BAD_SEQUENCE_NESTED_MAIL,
}
NEED_MAIL = {
    State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
    State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
    State.BDAT: R.BAD_SEQUENCE_BDAT_IN_PROGRESS,
}
NEED_RCPT = {
    State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
    State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
    State.MAIL: R.BAD_SEQUENCE_NEED_RCPT,
    State.BDAT: R.BAD_SEQUENCE_DATA_AFTER_BDAT,
}
NEED_RCPT_OR_BDAT = {
    State.CONNECTED: R.BAD_SEQUENCE_NEED_MAIL,
    State.GREETED: R.BAD_SEQUENCE_NEED_MAIL,
    State.MAIL: R.BAD_SEQUENCE_NEED_RCPT,
}
# RFC 3207 §4 and RFC 4954 §4: not inside a mail transaction.
NO_TRANSACTION = {state: R.TRANSACTION_IN_PROGRESS for state in TRANSACTION_STATES}
NEED_HELO_NO_TRANSACTION = {State.CONNECTED: R.BAD_SEQUENCE_HELO, **NO_TRANSACTION}


# The tests of the guards and of `enabled`/`offered`.


def has_argument(conn: SMTPConnection, arg: bytes) -> bool:
    return bool(arg)


def tls_on(conn: SMTPConnection, arg: bytes) -> bool:
    return conn.tls


def starttls_not_offered(conn: SMTPConnection, arg: bytes) -> bool:
    return not conn.starttls_offered


def auth_not_enabled(conn: SMTPConnection, arg: bytes) -> bool:
    return not (conn.extensions.auth and conn.security.auth_available)


def helo_not_ehlo(conn: SMTPConnection, arg: bytes) -> bool:
    """AUTH needs EHLO (RFC 4954 §4); the state does not tell it from HELO."""
    return not conn.esmtp


def logged_in(conn: SMTPConnection, arg: bytes) -> bool:
    return conn.auth_user is not None


def auth_not_offered(conn: SMTPConnection, arg: bytes) -> bool:
    """What is left of AUTH's refusals once the others passed: TLS first."""
    return not conn.auth_offered


def login_required(conn: SMTPConnection, arg: bytes) -> bool:
    """A submission listener: AUTH before MAIL."""
    return conn.security.auth_required and conn.auth_user is None


def bad_chunk_header(conn: SMTPConnection, arg: bytes) -> bool:
    """Without a size the chunk cannot be skipped: what follows is read as commands."""
    return chunk_header(arg) is None


def chunking_on(conn: SMTPConnection) -> bool:
    return conn.extensions.chunking


def starttls_on(conn: SMTPConnection) -> bool:
    return conn.extensions.starttls


def starttls_offered(conn: SMTPConnection) -> bool:
    return conn.starttls_offered


def auth_offered(conn: SMTPConnection) -> bool:
    return conn.auth_offered


# The guards of the verbs that have them, in the order they are checked.
LOGIN_FIRST = (Guard(login_required, R.AUTH_REQUIRED, logged=True),)
CHUNK_SIZE = (Guard(bad_chunk_header, R.SYNTAX_BDAT),)
STARTTLS_POSSIBLE = (Guard(has_argument, R.SYNTAX_STARTTLS), Guard(tls_on, R.TLS_ALREADY_ACTIVE))
STARTTLS_OFFERED = (Guard(starttls_not_offered, R.TLS_NOT_AVAILABLE),)
AUTH_POSSIBLE = (
    Guard(auth_not_enabled, R.AUTH_NOT_ENABLED),
    Guard(helo_not_ehlo, R.BAD_SEQUENCE_HELO),
    Guard(logged_in, R.AUTH_ALREADY),
)
AUTH_OFFERED = (Guard(auth_not_offered, R.AUTH_NEEDS_TLS),)
