"""Fuzzing the sans-I/O LMTP core (issue 21) with hypothesis, as
test_smtp_fuzz.py does the SMTP one: random LMTP scripts (LHLO, EHLO, MAIL,
RCPT to local, unknown and foreign addresses, DATA with a body, BDAT, RSET,
QUIT, random bytes) through a shell that answers each message with a reply
per recipient (a mailbox named `fail...` fails). Nothing escapes the core,
every reply is well formed, each message is answered with exactly one reply
per accepted recipient in RCPT order, and the same input cut whole, octet by
octet or at random gives the same replies and events.
"""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from geosmtp.lmtp import LMTPConnection, delivered
from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, ConnectionClosed
from geosmtp.smtp import (
    Extensions,
    Limits,
    MessageData,
    MessageEnd,
    RecipientPolicy,
    State,
)
from geosmtp.smtp import replies as R
from tests.unit.fuzzing import assert_split_invariant, fuzz_settings

HOST = "mx.example.test"
REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][\x20-\x7e]*\r\n")


class LMTPShell:
    """Feeds an LMTP core, answers each message per recipient, keeps the
    replies and events, and logs the input for `assert_split_invariant`."""

    def __init__(self) -> None:
        policy = RecipientPolicy(
            local_domains=frozenset({"example.test"}),
            users=frozenset({"alice", "bob", "fail1", "fail2"}),
            accept_unknown=False,
        )
        self.conn = LMTPConnection(HOST, policy, Limits(max_message_size=2000), Extensions())
        self.replies = self.conn.greeting()  # all replies, as one stream
        self.events: list = []
        self.log: list = []
        self.ended = False
        self.answered = 0  # messages answered

    def send(self, data: bytes) -> None:
        if self.ended:
            return
        self.log.append(data)
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            assert event is not PAUSED, f"paused in {self.conn.state} with no verdict asked"
            if isinstance(event, MessageData) and self.events:
                last = self.events[-1]
                if isinstance(last, MessageData):
                    self.events[-1] = MessageData(last.data + event.data)
                    continue
            self.events.append(event)
            if isinstance(event, MessageEnd):
                self._answer(event)
            elif isinstance(event, CloseConnection | ConnectionClosed):
                assert self.conn.state is State.CLOSED
                self.ended = True
                break
        self._take(self.conn.data_to_send())

    def _take(self, out: bytes) -> None:
        for line in out.splitlines(keepends=True):
            assert REPLY_LINE.fullmatch(line), line
        self.replies += out

    def _answer(self, event: MessageEnd) -> None:
        """One reply per recipient; the whole batch must come out in that order."""
        answers = [
            R.LOCAL_ERROR
            if (r.box or "").startswith("fail")
            else delivered("Q1", r.mailbox.address)
            for r in event.envelope.recipients
        ]
        self._take(self.conn.data_to_send())  # what came before: 354, a chunk's 250
        self.conn.recipients_delivered(answers)
        expected = b"".join(a.to_bytes() for a in answers)
        sent = self.conn.data_to_send()
        assert sent == expected
        self._take(sent)
        self.answered += 1


ADDRESS = st.sampled_from(
    [
        "alice@example.test",
        "bob@example.test",
        "fail1@example.test",
        "fail2@example.test",
        "zed@example.test",
        "x@elsewhere.example",
        "postmaster",
        "bad address",
    ]
)
BODY = st.lists(st.sampled_from([b"Subject: x", b"", b".dot", b"text", b"x" * 200]), max_size=5)


def _data(lines: list[bytes]) -> bytes:
    return b"DATA\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"


STEP = st.one_of(
    st.sampled_from(
        [
            b"LHLO mta.example.org\r\n",
            b"EHLO mta.example.org\r\n",
            b"HELO mta.example.org\r\n",
            b"MAIL FROM:<s@example.org>\r\n",
            b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n",
            b"MAIL FROM:<s@example.org> RET=FULL\r\n",
            b"RSET\r\n",
            b"NOOP\r\n",
            b"STARTTLS\r\n",
            b"AUTH PLAIN AGEAYg==\r\n",
            b"BDAT 5\r\nhello",
            b"BDAT 3 LAST\r\nbye",
            b"BDAT x\r\n",
        ]
    ),
    ADDRESS.map(lambda a: f"RCPT TO:<{a}>\r\n".encode()),
    BODY.map(_data),
    st.binary(max_size=40),
    st.just(b"QUIT\r\n"),
)


#: A whole transaction as a careful client sends it, ended by DATA or BDAT LAST.
TXN = st.builds(
    lambda rcpts, body, bdat: (
        b"MAIL FROM:<s@example.org>\r\n"
        + b"".join(f"RCPT TO:<{a}>\r\n".encode() for a in rcpts)
        + (b"BDAT 4 LAST\r\nbody" if bdat else _data(body))
    ),
    st.lists(ADDRESS, min_size=1, max_size=5),
    BODY,
    st.booleans(),
)


@fuzz_settings(120)
@given(
    steps=st.lists(st.one_of(TXN, STEP), max_size=12),
    lhlo=st.booleans(),
    seed=st.integers(0, 2**32),
)
@example(
    steps=[
        b"MAIL FROM:<>\r\nRCPT TO:<fail1@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
        b"RCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n"
    ],
    lhlo=True,
    seed=0,
)
def test_lmtp_core_fuzz(steps: list[bytes], lhlo: bool, seed: int) -> None:
    if lhlo:
        steps = [b"LHLO mta.example.org\r\n", *steps]
    assert_split_invariant(LMTPShell, steps, seed)
