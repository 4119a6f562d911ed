"""A test client for the sans-I/O SMTP core, shared by the session tests.

Every protocol case runs in three modes (see `run`): each step fed whole,
every octet fed on its own, and the whole script pipelined in one chunk
between two other commands. The replies and events must not depend on how
the bytes were cut up.

The harness plays the shell: it stores each message (`on_end`), checks
passwords (`on_auth`), does the TLS handshake where the script says
`HANDSHAKE`, and, like the shell, stops at `CloseConnection`: it feeds nothing
after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from geosmtp.mail.headers import MessageIdSniffer
from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, ConnectionClosed
from geosmtp.smtp import (
    AuthRequest,
    ClientRates,
    Extensions,
    Limits,
    MessageData,
    MessageEnd,
    MessageStart,
    RecipientPolicy,
    Security,
    SMTPConnection,
    StartTLS,
    State,
    TransactionAborted,
    TransactionRejected,
)
from geosmtp.smtp import replies as R

HOST = "mx.example.test"
DOMAIN = "example.test"
OK = b"250 2.0.0 Ok\r\n"
SENDER_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued as Q1\r\n"

MODES = ["whole", "bytewise", "pipelined"]

#: The passwords the harness's "shell" knows.
PASSWORDS = {"alice": "secret", "bob": "hunter2"}


class _Handshake:
    def __repr__(self) -> str:
        return "HANDSHAKE"


#: A step in a script: the TLS handshake happens here (the core must be waiting
#: for it after STARTTLS). Bytes before it were sent in the clear, bytes after it
#: inside TLS; the pipelined mode sends each side in one chunk.
HANDSHAKE = _Handshake()


def make_conn(
    limits: Limits | None = None,
    extensions: Extensions | None = None,
    security: Security | None = None,
    *,
    users: Sequence[str] = ("alice", "bob"),
    accept_unknown: bool = True,
    vrfy: bool = False,
    domains: Sequence[str] = (DOMAIN, "other.example.test"),
    rates: ClientRates | None = None,
) -> SMTPConnection:
    policy = RecipientPolicy(
        local_domains=frozenset(domains),
        users=frozenset(users),
        accept_unknown=accept_unknown,
    )
    return SMTPConnection(HOST, policy, limits, extensions, security, vrfy=vrfy, rates=rates)


@dataclass
class Result:
    conn: SMTPConnection
    replies: bytes
    events: list  # MessageData runs coalesced, so every mode gives the same list

    @property
    def lines(self) -> list[bytes]:
        return self.replies.split(b"\r\n")[:-1]

    @property
    def codes(self) -> list[int]:
        """The code of each complete reply (multi-line replies count once)."""
        return [int(line[:3]) for line in self.lines if line[3:4] == b" "]

    @property
    def reply_lines(self) -> list[list[bytes]]:
        """The replies, each as its list of lines."""
        out: list[list[bytes]] = [[]]
        for line in self.lines:
            out[-1].append(line)
            if line[3:4] == b" ":
                out.append([])
        out.pop()
        return out

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def messages(self) -> list[bytes]:
        """The data of each message that reached MessageEnd."""
        out, current = [], None
        for e in self.events:
            if isinstance(e, MessageStart):
                current = b""
            elif isinstance(e, MessageData):
                assert current is not None, "MessageData outside a message"
                current += e.data
            elif isinstance(e, MessageEnd):
                out.append(current)
                current = None
            elif isinstance(e, TransactionAborted) or (
                isinstance(e, TransactionRejected) and e.stage in ("DATA", "BDAT")
            ):
                current = None
        return out

    @property
    def message_ids(self) -> list[str | None]:
        """The Message-ID the shell's sniffer finds in each message started, in order
        (delivered or refused): what the access log would show."""
        out: list[str | None] = []
        sniffer = None
        for e in self.events:
            if isinstance(e, MessageStart):
                sniffer = MessageIdSniffer()
            elif isinstance(e, MessageData) and sniffer is not None:
                sniffer.feed(e.data)
            elif sniffer is not None and (
                isinstance(e, MessageEnd | TransactionAborted)
                or (isinstance(e, TransactionRejected) and e.stage in ("DATA", "BDAT"))
            ):
                sniffer.close()
                out.append(sniffer.message_id)
                sniffer = None
        return out


def store_q1(conn: SMTPConnection, event: MessageEnd) -> None:
    conn.message_stored("Q1")


def check_password(conn: SMTPConnection, event: AuthRequest) -> None:
    creds = event.credentials
    ok = PASSWORDS.get(creds.login) == creds.password
    conn.auth_result(creds.login if ok else None)


def waiting_for_tls(conn: SMTPConnection, events: list) -> bool:
    """A StartTLS was the last event and the core waits for `tls_started()`."""
    if conn.state is not State.TLS_HANDSHAKE:
        return False
    assert events and isinstance(events[-1], StartTLS)
    return True


def drain(
    conn: SMTPConnection,
    events: list,
    on_end: Callable[[SMTPConnection, MessageEnd], None] = store_q1,
    on_auth: Callable[[SMTPConnection, AuthRequest], None] = check_password,
) -> None:
    """Take events until the core needs data, waits for the handshake, or ends."""
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return
        if event is PAUSED:
            assert waiting_for_tls(conn, events), "paused without an event to answer"
            return
        if isinstance(event, MessageData) and events and isinstance(events[-1], MessageData):
            events[-1] = MessageData(events[-1].data + event.data)
        else:
            events.append(event)
        if isinstance(event, MessageEnd):
            on_end(conn, event)
        elif isinstance(event, AuthRequest):
            on_auth(conn, event)
        elif isinstance(event, CloseConnection | ConnectionClosed):
            assert conn.state is State.CLOSED
            return


def feed(conn: SMTPConnection, data: bytes) -> bool:
    """`receive_data` as a shell does it: not after the session has ended.
    False when it has, and `data` was not given to the core."""
    if conn.state is State.CLOSED:
        return False
    conn.receive_data(data)
    return True


def _phases(steps: Sequence) -> list[list[bytes]]:
    phases: list[list[bytes]] = [[]]
    for step in steps:
        if step is HANDSHAKE:
            phases.append([])
        else:
            phases[-1].append(step)
    return phases


def run(
    steps: Sequence | bytes,
    mode: str,
    conn: SMTPConnection | None = None,
    *,
    on_end: Callable[[SMTPConnection, MessageEnd], None] = store_q1,
    on_auth: Callable[[SMTPConnection, AuthRequest], None] = check_password,
) -> Result:
    """Run a client script through a connection and collect replies and events.

    `steps` are what a careful client sends between waiting for replies, and
    `HANDSHAKE` where the TLS handshake happens.
    whole: each step in one receive_data; bytewise: one octet at a time;
    pipelined: NOOP + all steps + NOOP in a single chunk (one chunk per side
    of a handshake). In pipelined mode the two NOOP replies are checked and
    removed (a NOOP never changes state, so the case is unchanged); the
    trailing one must be missing when the connection was closed or waits for
    a handshake, since nothing after 221/421/220-STARTTLS may be executed.
    """
    if isinstance(steps, bytes):
        steps = [steps]
    conn = conn or make_conn()
    events: list = []
    out = []
    phases = _phases(steps)
    for n, phase in enumerate(phases):
        if conn.state is State.CLOSED:
            break
        if n:
            assert waiting_for_tls(conn, events), "HANDSHAKE without a STARTTLS to answer"
            conn.tls_started()
            drain(conn, events, on_end, on_auth)
            out.append(conn.data_to_send())
        if mode == "pipelined":
            head = b"NOOP\r\n" if n == 0 else b""
            tail = b"NOOP\r\n" if n == len(phases) - 1 else b""
            chunks = [head + b"".join(phase) + tail]
        elif mode == "bytewise":
            chunks = [bytes([b]) for step in phase for b in step]
        elif mode == "whole":
            chunks = list(phase)
        else:  # pragma: no cover
            raise ValueError(mode)
        for chunk in chunks:
            if not feed(conn, chunk):
                break
            drain(conn, events, on_end, on_auth)
            out.append(conn.data_to_send())
    replies = b"".join(out)
    if mode == "pipelined":
        assert not conn.in_data, "a pipelined script must not end inside DATA or BDAT"
        noop = R.OK.to_bytes(conn.extensions.enhancedstatuscodes)
        assert replies.startswith(noop)
        replies = replies[len(noop) :]
        if conn.state is State.CLOSED or waiting_for_tls(conn, events):
            assert not replies.endswith(noop)
        else:
            assert replies.endswith(noop)
            replies = replies[: -len(noop)]
    return Result(conn, replies, events)


EHLO = b"EHLO client.example.org\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<alice@example.test>\r\n"
DATA = b"DATA\r\n"
TXN = [EHLO, MAIL, RCPT, DATA]
EHLO_REPLY_END = b"250 CHUNKING\r\n"


def after_ehlo(res: Result) -> bytes:
    """The replies after the (first) multi-line EHLO reply."""
    i = res.replies.index(EHLO_REPLY_END) + len(EHLO_REPLY_END)
    return res.replies[i:]
