"""A test client for the sans-I/O POP3 core, shared by the POP3 session tests.

Every protocol case runs in three modes (see `run`): each step fed whole,
every octet fed on its own, and all steps pipelined in one chunk. The
replies and events must not depend on how the bytes were cut up.

The harness plays the shell: it checks passwords (`on_auth`) and lists a
fixed maildrop (`MESSAGES`), streams a message after RETR and TOP through a
`MessageEncoder` as the shell will, answers UPDATE, does the TLS handshake
where the script says `HANDSHAKE`, and stops feeding at `CloseConnection`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from geosmtp.pop3 import (
    AuthRequest,
    Listing,
    LoginFailure,
    MessageEncoder,
    POP3Connection,
    POP3Security,
    Retrieve,
    StartTLS,
    State,
    Update,
    virtual_size,
)
from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, ConnectionClosed

HOST = "pop.example.test"
MODES = ["whole", "bytewise", "pipelined"]

#: The passwords the harness's "shell" knows.
PASSWORDS = {"alice": "secret", "bob": "two words"}

#: alice's maildrop, as stored (LF line ends; one with CRLF, one with a dot line).
MESSAGES = [
    b"Subject: one\nFrom: a@example.test\n\nHello.\nSecond line.\n",
    b"Subject: two\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n",
    b"Subject: three\n\nno final line end",
]
LISTING = [Listing(virtual_size(m), f"uid-{n}") for n, m in enumerate(MESSAGES, 1)]
TOTAL = sum(entry.size for entry in LISTING)

#: Security of the usual test connection: plaintext logins allowed, STLS offered.
PLAIN_OK = POP3Security(tls_available=True, auth_plaintext=True)
#: A plain listener where logins need STLS first.
NEEDS_TLS = POP3Security(tls_available=True)
#: An implicit-TLS listener (pop3s).
IMPLICIT = POP3Security(tls_available=True, tls_active=True)

USER = b"USER alice\r\n"
PASS = b"PASS secret\r\n"
LOGIN = [USER, PASS]
USER_OK = b"+OK Send the password with PASS.\r\n"
LOGGED_IN = b"+OK Logged in.\r\n"
LOGIN_REPLIES = USER_OK + LOGGED_IN
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
UNKNOWN = b"-ERR Unknown command.\r\n"
NOT_LOGGED_IN = b"-ERR Log in first (USER and PASS, or AUTH).\r\n"


class _Handshake:
    def __repr__(self) -> str:
        return "HANDSHAKE"


#: A step in a script: the TLS handshake happens here (the core must be waiting
#: for it after STLS). The pipelined mode sends each side in one chunk.
HANDSHAKE = _Handshake()


def make_conn(security: POP3Security = PLAIN_OK, **kwargs: int) -> POP3Connection:
    return POP3Connection(HOST, security, **kwargs)


def encoded(message: bytes, lines: int | None = None) -> bytes:
    """What the shell streams after `retrieve_result(True)`."""
    encoder = MessageEncoder(lines)
    return encoder.feed(message) + encoder.end()


def check_password(conn: POP3Connection, event: AuthRequest) -> None:
    creds = event.credentials
    if PASSWORDS.get(creds.login) == creds.password:
        conn.login_ok(LISTING if creds.login == "alice" else [])
    else:
        conn.login_failed(LoginFailure.AUTH)


@dataclass
class Result:
    conn: POP3Connection
    replies: bytes
    events: list = field(default_factory=list)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def kinds(self) -> list[type]:
        return [type(e) for e in self.events]


def waiting_for_tls(conn: POP3Connection, events: list) -> bool:
    if conn.state is not State.TLS_HANDSHAKE:
        return False
    assert events and isinstance(events[-1], StartTLS)
    return True


def drain(
    conn: POP3Connection,
    events: list,
    out: list[bytes],
    on_auth: Callable[[POP3Connection, AuthRequest], None] = check_password,
    messages: Sequence[bytes] = MESSAGES,
) -> None:
    """Take events until the core needs data, waits for the handshake, or ends;
    the replies, and the messages streamed, go to `out` in the order the
    shell would write them."""
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return
        if event is PAUSED:
            assert waiting_for_tls(conn, events), "paused without an event to answer"
            return
        events.append(event)
        if isinstance(event, AuthRequest):
            on_auth(conn, event)
        elif isinstance(event, Retrieve):
            conn.retrieve_result(True)
            out.append(conn.data_to_send())
            out.append(encoded(messages[event.index], event.lines))
        elif isinstance(event, Update):
            conn.update_result(True)
        elif isinstance(event, CloseConnection | ConnectionClosed):
            assert conn.state is State.CLOSED
            return


def feed(conn: POP3Connection, data: bytes) -> bool:
    """`receive_data` as a shell does it: not after the session has ended."""
    if conn.state is State.CLOSED:
        return False
    conn.receive_data(data)
    return True


def run(
    steps: Sequence | bytes,
    mode: str,
    conn: POP3Connection | None = None,
    *,
    on_auth: Callable[[POP3Connection, AuthRequest], None] = check_password,
    messages: Sequence[bytes] = MESSAGES,
) -> Result:
    """Run a client script through a connection and collect replies and events.

    whole: each step in one receive_data; bytewise: one octet at a time;
    pipelined: all the steps before (and after) a `HANDSHAKE` in one chunk.
    """
    if isinstance(steps, bytes):
        steps = [steps]
    conn = conn or make_conn()
    events: list = []
    out: list[bytes] = []
    phases: list[list[bytes]] = [[]]
    for step in steps:
        if step is HANDSHAKE:
            phases.append([])
        else:
            phases[-1].append(step)
    for n, phase in enumerate(phases):
        if conn.state is State.CLOSED:
            break
        if n:
            assert waiting_for_tls(conn, events), "HANDSHAKE without an STLS to answer"
            out.append(conn.data_to_send())
            conn.tls_started()
        if mode == "pipelined":
            chunks = [b"".join(phase)]
        elif mode == "bytewise":
            chunks = [bytes([b]) for step in phase for b in step]
        elif mode == "whole":
            chunks = list(phase)
        else:  # pragma: no cover
            raise ValueError(mode)
        for chunk in chunks:
            if not feed(conn, chunk):
                break
            drain(conn, events, out, on_auth, messages)
    out.append(conn.data_to_send())
    return Result(conn, b"".join(out), events)


def logged_in(security: POP3Security = PLAIN_OK, **kwargs: int) -> POP3Connection:
    """A connection in TRANSACTION as alice, its replies so far taken."""
    conn = make_conn(security, **kwargs)
    run(LOGIN, "whole", conn)
    assert conn.state is State.TRANSACTION
    return conn
