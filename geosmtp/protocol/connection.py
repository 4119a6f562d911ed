"""The h11-style contract every protocol core keeps with its shell (SMTP in
`geosmtp.smtp`, POP3 in `geosmtp.pop3`, LMTP beside them).

Input waits in a buffer until the core processes it; replies wait in a queue
until the shell takes them; every change of state is a step in the core's
transition table; a call the table does not allow is a misuse: the connection
enters its error state and the shell gets a `ProtocolError`. The states, the
table and what a step means are each core's own; the mechanics are here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from . import sasl
from .replies import ReplyValue


class ProtocolError(Exception):
    """The shell called the connection at a time it may not (h11's
    LocalProtocolError): a verdict nobody asked for, input after the end.

    The connection is left in its error state (a closed one stays closed),
    where it reads nothing and the only thing left to do is `close_with()`.
    The client's mistakes never raise: they get replies.
    """


@dataclass(frozen=True)
class CloseConnection:
    """The server ends the session; `reply` (the last one) is queued, if any."""

    reply: ReplyValue | None


@dataclass(frozen=True)
class ConnectionClosed:
    """End of input: the client closed its side (or the session has ended)."""


class Sentinel:
    """What `next_event()` returns when it has no event: `NEED_DATA`, `PAUSED`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: next_event(): all complete input is processed; read more.
NEED_DATA = Sentinel("NEED_DATA")
#: next_event(): the connection waits for the shell's verdict (or, in its error
#: state, for `close_with()`).
PAUSED = Sentinel("PAUSED")


class _TooLong(enum.Enum):
    """A one-member enum, so that `line is LINE_TOO_LONG` narrows the type."""

    LINE_TOO_LONG = "LINE_TOO_LONG"

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


#: `_read_line()`: the line was longer than the limit, and is skipped to its end.
LINE_TOO_LONG = _TooLong.LINE_TOO_LONG


class SansIOConnection:
    """The mechanics of a protocol core's connection; subclasses set the class
    attributes and, in `__init__`, every instance attribute named below."""

    #: state -> {step: the state it leads to}
    TRANSITIONS: ClassVar[Mapping[Any, Mapping[Any, Any]]]
    #: The state of a session that is over, and the one a misuse leaves it in.
    CLOSED: ClassVar[enum.Enum]
    ERROR: ClassVar[enum.Enum]

    state: Any
    #: The state the session was in when it closed or failed (ERROR); None before.
    closed_in: Any
    _buf: bytearray  # input not yet processed
    _out: list[bytes]  # replies not yet taken by data_to_send()
    _events: list[Any]  # events not yet taken by next_event()
    _end_of_input: bool  # receive_data(b""): the client closed its side
    _discarding_line: bool  # an over-long line is being skipped to its LF
    #: Command lines taken from the input so far (over-long ones too): the shell
    #: sees by it whether a read finished a line or only added to one.
    lines_read: int
    _sasl: sasl.SASLExchange | None  # an AUTH exchange wants a response

    def data_to_send(self) -> bytes:
        """The replies queued since the last call, as bytes to write (b"" if none).

        May be called in any state, the error state and the closed one
        included (replies to commands processed before a misuse, the reply of
        `close_with()`). The shell calls it before it reads, so a pipelined
        batch is answered in one write, and before it closes.
        """
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the client, in order; `b""` when the client has closed
        its side (end of input). Nothing is processed until `next_event()`.

        May be called whenever the connection is open, also while it waits for
        a verdict (the input waits in turn; after STARTTLS or STLS it is
        discarded). Raises `ProtocolError` once the connection is closed or in
        its error state, and for data after the end of input (another `b""` is
        harmless).
        """
        state = self.state
        if state is self.CLOSED or state is self.ERROR:
            raise self._misuse(f"receive_data() in state {state.name}")
        if not data:
            self._end_of_input = True
        elif self._end_of_input:
            raise self._misuse("receive_data() after the end of input")
        else:
            self._buf += data

    def close_with(self, reply: ReplyValue) -> None:
        """The shell ends the session (timeout, shutdown, kick, too many failed
        logins, its own error): queue `reply` and close.

        May be called in any state: it is the one way out of the error state,
        and it works while the connection waits for a verdict. The next event
        is the `CloseConnection`; flush `data_to_send()` and close the socket.
        On a connection that is already closed it does nothing, so a shell may
        call it from every error path without asking first.
        """
        if self.state is not self.CLOSED:
            self._close(reply)

    def _close(self, reply: Any) -> None:
        """Queue `reply` (a reply value of the core's own form), take the step
        "close" and queue the `CloseConnection`."""
        raise NotImplementedError

    def _move(self, step: str) -> None:
        """Take `step` in the transition table: every change of state goes here.

        A step the table does not have from the current state is a misuse:
        `ProtocolError`, and the connection is in its error state.
        """
        state = self.state
        after = self.TRANSITIONS[state].get(step)
        if after is None:
            raise self._misuse(f"{step} is not possible in state {state.name}")
        if after is self.CLOSED:
            self.closed_in = self.closed_in or state
        self.state = after

    def _misuse(self, what: str) -> ProtocolError:
        """Enter the error state (a closed connection stays closed) and return
        the exception to raise. Nothing more is read or handed out; replies
        already queued stay queued, for `close_with()` to follow."""
        if self.state is not self.CLOSED:
            self.closed_in = self.closed_in or self.state
            self.state = self.ERROR
            self._buf.clear()
            self._events.clear()
            self._sasl = None
        return ProtocolError(what)

    def _read_line(self, limit: int) -> bytes | _TooLong | None:
        """The next complete line from the input, without its CRLF or bare LF;
        None when there is none yet. A line of more than `limit` octets is
        `LINE_TOO_LONG` once it has ended: it is dropped as it arrives, so the
        buffer never holds more than a line of `limit` octets and a CR."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > limit + 1:  # +1: a CR may be waiting for its LF
                self._discarding_line = True
                del buf[:]
            return None
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        self.lines_read += 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._discarding_line or len(line) > limit:
            self._discarding_line = False
            return LINE_TOO_LONG
        return line
