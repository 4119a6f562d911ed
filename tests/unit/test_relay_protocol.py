"""The relay's client core (`geosmtp.relay.protocol`), fed bytes without sockets.

Every script runs three ways, as the server cores' tests do: the server's
replies given whole (a server that answers everything at once), octet by
octet, and cut at random points; what the client sends and the events it
gives must be the same each time.
"""

from __future__ import annotations

import base64
import io
import random
import re
from dataclasses import dataclass, field

import pytest

from geosmtp.relay.client import message_size, write_data
from geosmtp.relay.protocol import (
    MAX_REPLY_LINES,
    NEED_DATA,
    ClientConnection,
    ClientError,
    Closed,
    DataEncoder,
    Lost,
    OpenFailed,
    Ready,
    RemoteReply,
    ResetFailed,
    SendMessage,
    StartTLS,
    TransactionDone,
    parse_features,
    xtext,
)
from tests.unit.fuzzing import bytewise, random_cuts, whole

WHERE = "mx.test[192.0.2.1]:25"
GREETING = b"220 mx.test ESMTP\r\n"
EHLO = b"250-mx.test\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
EHLO_PIPE = b"250-mx.test\r\n250-PIPELINING\r\n250-DSN\r\n250 SIZE\r\n"
OK = b"250 2.0.0 ok\r\n"
GO = b"354 go ahead\r\n"
BYE = b"221 2.0.0 bye\r\n"

Envelope = tuple[str, list[str], list[tuple[str, list[str]]]]
ONE: Envelope = ("a@x.test", [], [("b@y.test", []), ("c@y.test", [])])


@dataclass
class Run:
    """What the client sent (each write) and the events it gave."""

    writes: list[bytes] = field(default_factory=list)
    events: list[object] = field(default_factory=list)

    @property
    def sent(self) -> bytes:
        return b"".join(self.writes)

    @property
    def lines(self) -> list[bytes]:
        return self.sent.split(b"\r\n")[:-1]


def drive(phases: list[bytes], envelopes: list[Envelope], cut, **options: object) -> Run:
    """A shell for the core: the server's bytes (one item per TLS phase) cut
    into reads by `cut`; on `Ready` the next envelope is sent (RSET first from
    the second on), and QUIT when there is none; the message is "sent" at once."""
    core = ClientConnection("client.test", where=WHERE, **options)  # type: ignore[arg-type]
    run = Run()
    todo = list(envelopes)
    used = False

    def next_envelope() -> None:
        nonlocal used
        if todo:
            core.send_envelope(*todo.pop(0), reset=used)
            used = True
        else:
            core.quit()

    def drain() -> bool:
        """Events until more input is needed; True at a handshake."""
        while True:
            event = core.next_event()
            out = core.data_to_send()
            if out:
                run.writes.append(out)
            if event is NEED_DATA:
                return False
            run.events.append(event)
            if isinstance(event, Ready):
                next_envelope()
            elif isinstance(event, SendMessage):
                run.writes.append(b"<message>\r\n.\r\n")
                core.message_sent()
            elif isinstance(event, TransactionDone) and event.reusable:
                next_envelope()
            elif isinstance(event, StartTLS):
                run.writes.append(b"<handshake>")
                core.tls_started()
                return True

    drain()
    for n, phase in enumerate(phases):
        for piece in cut(phase) if phase else []:
            core.receive_data(piece)
            if drain():
                break
        if n == len(phases) - 1:
            core.receive_data(b"")
            drain()
    return run


def three_ways(phases: list[bytes], envelopes: list[Envelope] = (), seed: int = 1, **options):  # type: ignore[assignment]
    """Run the script whole, octet by octet and cut at random: all the same."""
    first = drive(phases, list(envelopes), whole, **options)
    for cut, how in ((bytewise, "octet by octet"), (random_cuts(seed), "at random")):
        other = drive(phases, list(envelopes), cut, **options)
        assert other.sent == first.sent, f"the client sent other bytes when cut {how}"
        assert other.events == first.events, f"other events when cut {how}"
    return first


def kinds(run: Run) -> list[str]:
    return [type(e).__name__ for e in run.events]


# ------------------------------------------------------------------ plain


def test_one_command_at_a_time_without_pipelining():
    server = GREETING + EHLO + OK + OK + b"550 5.1.1 no such user\r\n" + GO + OK + BYE
    run = three_ways([server], [ONE])
    assert run.lines == [
        b"EHLO client.test",
        b"MAIL FROM:<a@x.test>",
        b"RCPT TO:<b@y.test>",
        b"RCPT TO:<c@y.test>",
        b"DATA",
        b"<message>",
        b".",
        b"QUIT",
    ]
    assert kinds(run) == ["Ready", "SendMessage", "TransactionDone", "Closed"]
    done = run.events[2]
    assert done.mail == RemoteReply(250, "2.0.0", "ok")
    assert [r.code for r in done.rcpts] == [250, 550]
    assert done.rcpts[1].status == "5.1.1"
    assert (done.data.code, done.final.code, done.reusable) == (354, 250, True)
    # without PIPELINING, each command waits for the reply to the one before
    slow_run = drive([server], [ONE], bytewise)
    assert [w for w in slow_run.writes if w.startswith((b"MAIL", b"RCPT", b"DATA"))] == [
        b"MAIL FROM:<a@x.test>\r\n",
        b"RCPT TO:<b@y.test>\r\n",
        b"RCPT TO:<c@y.test>\r\n",
        b"DATA\r\n",
    ]


def test_features_of_the_ehlo_reply():
    run = three_ways([GREETING + EHLO_PIPE], [])
    ready = run.events[0]
    assert ready == Ready(True, {"pipelining": "", "dsn": "", "size": ""})
    assert parse_features([b"AUTH=LOGIN", b"AUTH PLAIN LOGIN", b"SIZE 100", b"-bad"]) == {
        "auth": "LOGIN PLAIN LOGIN",
        "size": "100",
    }


def test_helo_after_a_5xx_to_ehlo():
    server = GREETING + b"502 5.5.1 no EHLO here\r\n" + b"250 mx.test\r\n" + OK + OK + OK
    run = three_ways([server + GO + OK + BYE], [ONE])
    assert run.lines[:3] == [b"EHLO client.test", b"HELO client.test", b"MAIL FROM:<a@x.test>"]
    assert run.events[0] == Ready(False, {})


@pytest.mark.parametrize(
    ("server", "status", "quit_sent"),
    [
        (b"554 5.7.1 go away\r\n", "4.7.1", True),  # a 5xx greeting: the next address
        (b"421 busy\r\n", "4.0.0", True),
        (GREETING + b"451 4.3.0 later\r\n", "4.3.0", True),  # EHLO 4xx: no HELO
        (GREETING + b"500 no\r\n" + b"550 5.7.1 no HELO either\r\n", "4.7.1", True),
    ],
)
def test_a_server_that_will_not_talk_is_given_up_before_mail(server, status, quit_sent):
    run = three_ways([server + BYE], [ONE])
    failed = run.events[0]
    assert isinstance(failed, OpenFailed) and failed.status == status
    assert failed.diagnostic.startswith("smtp; ")
    assert (run.lines[-1] == b"QUIT") is quit_sent
    assert b"MAIL" not in run.sent
    assert kinds(run) == ["OpenFailed", "Closed"]


# ------------------------------------------------------------------ pipelining


def test_pipelining_sends_the_envelope_in_one_write():
    server = GREETING + EHLO_PIPE + OK + OK + OK + GO + OK + BYE
    run = three_ways([server], [ONE])
    envelope = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    assert envelope in drive([server], [ONE], whole).writes
    assert envelope in drive([server], [ONE], bytewise).writes
    assert kinds(run) == ["Ready", "SendMessage", "TransactionDone", "Closed"]
    assert run.events[2].reusable


def test_pipelining_with_every_recipient_refused_never_sends_the_message():
    """RFC 2920 §3.1: DATA was sent with the rest; the server refuses it."""
    refused = b"550 5.1.1 no\r\n"
    server = GREETING + EHLO_PIPE + OK + refused + refused + b"554 5.5.1 no valid recipients\r\n"
    run = three_ways([server + BYE], [ONE])
    assert b"<message>" not in run.sent
    done = run.events[1]
    assert isinstance(done, TransactionDone) and done.data.code == 554 and done.final is None
    assert done.reusable and run.lines[-1] == b"QUIT"


def test_pipelining_with_every_recipient_refused_and_a_354_gives_the_connection_up():
    """A server that wants data anyway: neither the message nor a lone "." goes."""
    refused = b"550 5.1.1 no\r\n"
    server = GREETING + EHLO_PIPE + OK + refused + refused + GO
    run = three_ways([server], [ONE, ONE])
    assert b"<message>" not in run.sent and b"\r\n.\r\n" not in run.sent
    assert run.events[1].reusable is False
    assert run.sent.endswith(b"DATA\r\n")  # nothing after: no QUIT into the data either


def test_pipelining_mail_refused_reads_every_reply_and_stays_usable():
    server = GREETING + EHLO_PIPE + b"550 5.7.1 not you\r\n" + b"503 5.5.1 MAIL first\r\n" * 2
    run = three_ways([server + b"503 5.5.1 no\r\n" + BYE], [ONE])
    done = run.events[1]
    assert done.mail.code == 550 and [r.code for r in done.rcpts] == [503, 503]
    assert done.data.code == 503 and done.reusable and run.lines[-1] == b"QUIT"


def test_421_to_a_recipient_ends_the_transaction_and_the_connection():
    server = GREETING + EHLO + OK + b"421 4.3.2 shutting down\r\n"
    run = three_ways([server], [ONE])
    done = run.events[1]
    assert done.rcpts[0].code == 421 and done.rcpts[1] is None and not done.reusable
    assert b"QUIT" not in run.sent and b"RCPT TO:<c@y.test>" not in run.sent


def test_mail_refused_without_pipelining_sends_no_rcpt():
    server = GREETING + EHLO + b"451 4.3.0 later\r\n" + BYE
    run = three_ways([server], [ONE])
    assert run.lines == [b"EHLO client.test", b"MAIL FROM:<a@x.test>", b"QUIT"]
    assert run.events[1].rcpts == (None, None)


# ------------------------------------------------------------------ reuse


def test_a_second_transaction_starts_with_rset_pipelined_with_the_envelope():
    tx = OK + OK + OK + GO + OK
    server = GREETING + EHLO_PIPE + tx + OK + tx + BYE
    run = three_ways([server], [ONE, ONE])
    assert kinds(run) == [
        "Ready", "SendMessage", "TransactionDone", "SendMessage", "TransactionDone", "Closed",
    ]  # fmt: skip
    writes = drive([server], [ONE, ONE], whole).writes
    assert (
        b"RSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
        in writes
    )


def test_rset_without_pipelining_waits_for_its_reply():
    tx = OK + OK + OK + GO + OK
    server = GREETING + EHLO + tx + OK + tx + BYE
    run = three_ways([server], [ONE, ONE])
    assert run.lines.count(b"RSET") == 1
    assert run.lines[6:9] == [b".", b"RSET", b"MAIL FROM:<a@x.test>"]
    writes = drive([server], [ONE, ONE], bytewise).writes
    assert b"RSET\r\n" in writes and b"MAIL FROM:<a@x.test>\r\n" in writes


@pytest.mark.parametrize("after", [b"", b"421 4.4.2 idle too long\r\n", b"500 what\r\n"])
def test_a_reused_connection_that_does_not_answer_rset_is_stale(after):
    tx = OK + OK + OK + GO + OK
    run = three_ways([GREETING + EHLO_PIPE + tx + after], [ONE, ONE])
    assert kinds(run)[-1] == "ResetFailed"
    assert run.events[-1] == ResetFailed(RemoteReply(*_code(after)) if after else None)
    assert run.sent.count(b"<message>") == 1


def _code(line: bytes) -> tuple[int, str | None, str]:
    code, _, text = line.decode().strip().partition(" ")
    status, _, rest = text.partition(" ")
    if re.fullmatch(r"\d\.\d\.\d", status):
        return int(code), status, rest
    return int(code), None, text


# ------------------------------------------------------------------ TLS and AUTH


def test_starttls_forgets_what_came_before_the_handshake():
    """RFC 3207 §4.2: a reply injected behind the 220 in plaintext is never read."""
    before = GREETING + b"250-mx.test\r\n250 STARTTLS\r\n" + b"220 go\r\n" + b"250 injected\r\n"
    after = b"250-mx.test\r\n250 AUTH PLAIN\r\n" + OK + OK + OK + GO + OK + BYE
    run = three_ways([before, after], [ONE], tls="opportunistic")
    assert run.lines[:3] == [b"EHLO client.test", b"STARTTLS", b"<handshake>EHLO client.test"]
    assert run.events[0] == StartTLS()
    assert run.events[1] == Ready(True, {"auth": "PLAIN"})


def test_required_starttls_not_offered():
    run = three_ways([GREETING + EHLO + BYE], [ONE], tls="starttls")
    assert run.events[0] == OpenFailed(
        "4.7.4", f"x-geosmtp; TLS is required, but was not offered by {WHERE}"
    )


def test_opportunistic_starttls_refused_goes_on_in_plaintext():
    server = GREETING + b"250-mx.test\r\n250 STARTTLS\r\n" + b"454 4.7.0 no TLS now\r\n"
    run = three_ways([server + OK + OK + OK + GO + OK + BYE], [ONE], tls="opportunistic")
    assert kinds(run)[:2] == ["Ready", "SendMessage"]
    # the plaintext retry of a failed handshake does not ask again
    run = three_ways([GREETING + b"250-mx.test\r\n250 STARTTLS\r\n" + BYE], [], starttls=False,
                     tls="opportunistic")  # fmt: skip
    assert b"STARTTLS" not in run.sent


def auth_session(mechanisms: bytes, replies: bytes, tls: str = "tls") -> Run:
    server = GREETING + b"250-mx.test\r\n250 AUTH " + mechanisms + b"\r\n" + replies
    return three_ways([server + BYE], [], tls=tls, auth=("joe", "pässword"))


def test_auth_plain_with_an_initial_response():
    run = auth_session(b"LOGIN PLAIN", b"235 2.7.0 ok\r\n")
    token = base64.b64encode("\0joe\0pässword".encode()).decode()
    assert run.lines[1] == f"AUTH PLAIN {token}".encode()
    assert kinds(run) == ["Ready", "Closed"]


def test_auth_plain_when_the_server_asks_again_and_login():
    run = auth_session(b"PLAIN", b"334 \r\n235 ok\r\n")
    token = base64.b64encode("\0joe\0pässword".encode())
    assert run.lines[2] == token and kinds(run) == ["Ready", "Closed"]
    run = auth_session(b"LOGIN", b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 ok\r\n")
    assert run.lines[1:4] == [b"AUTH LOGIN", b"am9l", base64.b64encode("pässword".encode())]
    assert kinds(run) == ["Ready", "Closed"]


@pytest.mark.parametrize(
    ("mechanisms", "replies", "status", "words"),
    [
        (b"PLAIN", b"535 5.7.8 bad credentials\r\n", "4.7.8", "smtp; 535"),
        (b"LOGIN", b"334 a\r\n334 b\r\n334 c\r\n501 cancelled\r\n", "4.7.0", "did not end"),
        (b"CRAM-MD5", b"", "4.7.0", "no AUTH mechanism in common"),
    ],
)
def test_auth_failures_are_temporary(mechanisms, replies, status, words):
    run = auth_session(mechanisms, replies)
    failed = run.events[0]
    assert isinstance(failed, OpenFailed) and failed.status == status and words in failed.diagnostic
    assert run.lines[-1] == b"QUIT"


def test_credentials_never_go_in_plaintext_unless_told():
    run = auth_session(b"PLAIN", b"", tls="opportunistic")
    assert run.events[0] == OpenFailed(
        "4.7.0", f"x-geosmtp; not sending credentials to {WHERE} without TLS"
    )
    assert b"AUTH" not in run.sent
    run = auth_session(b"PLAIN", b"235 ok\r\n", tls="none")
    assert kinds(run) == ["Ready", "Closed"]


# ------------------------------------------------------------------ bad replies


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        (b"250-x\r\n" * MAX_REPLY_LINES + b"250 x\r\n", "reply with too many lines"),
        (b"250-" + b"x" * 9000 + b"\r\n", "reply too long"),
        (b"250-" + b"x" * 8000 + b"\r\n" + (b"250-" + b"x" * 8000 + b"\r\n") * 9, "reply too long"),
    ],
)
def test_a_reply_that_never_ends_is_cut_off(reply, detail):
    run = three_ways([GREETING + reply], [ONE])
    assert run.events == [Lost("performing the EHLO handshake", detail)]


def test_a_line_that_is_no_reply_ends_the_reply():
    run = three_ways([GREETING + b"hello\r\n" + BYE], [ONE])
    assert run.events[0] == OpenFailed("4.5.0", "smtp; -1 o")  # (the text after 4 octets)


def test_the_connection_lost_in_a_transaction_keeps_the_replies_that_came():
    server = GREETING + EHLO + OK + b"550 5.1.1 no\r\n"
    run = three_ways([server], [ONE])
    assert run.events[1] == Lost(
        "sending RCPT TO",
        "connection closed by the server",
        mail=RemoteReply(250, "2.0.0", "ok"),
        rcpts=(RemoteReply(550, "5.1.1", "no"),),
    )


def test_timeouts_follow_the_step():
    core = ClientConnection("client.test")
    assert core.waiting_for == "greeting"
    core.receive_data(GREETING)
    assert core.next_event() is NEED_DATA and core.waiting_for == "helo"
    core.receive_data(EHLO_PIPE)
    assert isinstance(core.next_event(), Ready)
    core.data_to_send()
    core.send_envelope(*ONE)
    assert core.waiting_for == "mail"
    core.receive_data(OK)
    assert core.next_event() is NEED_DATA and core.waiting_for == "rcpt"
    core.receive_data(OK + OK)
    assert core.next_event() is NEED_DATA and core.waiting_for == "data_init"
    core.receive_data(GO)
    assert isinstance(core.next_event(), SendMessage) and core.waiting_for == "data_block"
    with pytest.raises(ClientError):
        core.quit()  # not in the middle of the message
    core.message_sent()
    assert core.waiting_for == "data_end"
    with pytest.raises(ClientError):
        core.send_envelope(*ONE)


def test_a_reused_connections_rset_waits_on_its_own_timeout():
    # Postfix's smtp_rset_timeout: a cached peer that vanished is given up
    # after the RSET's 20 s, not the 5 minutes a MAIL may take.
    core = ClientConnection("client.test")
    core.receive_data(GREETING + EHLO)
    assert isinstance(core.next_event(), Ready)
    core.send_envelope(*ONE)
    core.receive_data(OK + OK + OK + GO)
    assert isinstance(core.next_event(), SendMessage)
    core.message_sent()
    core.receive_data(OK)
    assert isinstance(core.next_event(), TransactionDone)
    core.data_to_send()
    core.send_envelope(*ONE, reset=True)
    assert core.data_to_send().startswith(b"RSET\r\n")
    assert core.waiting_for == "rset"
    core.receive_data(OK)
    assert core.next_event() is NEED_DATA and core.waiting_for == "mail"


def test_bytes_after_the_last_reply_are_counted_as_unread():
    # The shell drops an idle connection the server spoke on unasked (a 421
    # as it times the session out) instead of sending it an RSET.
    for cut in (None, 1):
        core = ClientConnection("client.test")
        core.receive_data(GREETING + EHLO)
        assert isinstance(core.next_event(), Ready)
        core.send_envelope(*ONE)
        core.receive_data(OK + OK + OK + GO)
        assert isinstance(core.next_event(), SendMessage)
        core.message_sent()
        unasked = b"421 4.4.2 idle too long\r\n"
        if cut is None:
            core.receive_data(OK + unasked)  # in one read with the last reply
        else:
            core.receive_data(OK)
            assert isinstance(core.next_event(), TransactionDone) and core.unread == 0
            core.receive_data(unasked)  # later, while the connection is idle
        if cut is None:
            assert isinstance(core.next_event(), TransactionDone)
        assert core.unread == len(unasked)


def test_lost_connection_reported_by_the_shell():
    core = ClientConnection("client.test")
    core.connection_lost("timed out", timed_out=True)
    assert core.next_event() == Lost("receiving the initial server greeting", "timed out", True)
    core.connection_lost("again")
    assert core.next_event() is NEED_DATA
    quitting = ClientConnection("client.test")
    quitting.receive_data(GREETING + EHLO)
    assert isinstance(quitting.next_event(), Ready)
    quitting.quit()
    quitting.connection_lost("reset")
    assert quitting.next_event() == Closed()


def test_xtext():
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert xtext("bob@y.test") == "bob@y.test"


# ------------------------------------------------------------------ the content


@pytest.mark.parametrize("block_size", [1, 7, 1000, 65536])
def test_long_lines_are_folded_as_postfix_does(block_size):
    subject = b"Subject: " + b" ".join([b"word"] * 300)  # 1508 octets, spaces to fold at
    token = b"X-Token: " + b"t" * 1500  # no space: CRLF and a space inserted
    body_line = b"." + b"b" * 2499  # a body line, starting with a dot
    message = subject + b"\n" + token + b"\n\n" + body_line + b"\nshort\n"
    out = bytearray()
    write_data(io.BytesIO(message), out.extend, block_size=block_size)
    wire = bytes(out)
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    for line in lines:
        unstuffed = line[1:] if line.startswith(b".") else line
        assert len(unstuffed) <= 998, "a line of more than 998 octets went out"
    head, _, body = wire.partition(b"\r\n\r\n")
    # the header section unfolds to what it was (RFC 5322 §2.2.3), less the
    # space inserted where there was none to fold at
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", head)
    # (X-Token is folded at its only space, then broken with CRLF and a space)
    assert unfolded == subject + b"\r\n" + b"X-Token: " + b"t" * 997 + b" " + b"t" * 503
    assert lines[0] == subject[: subject.rfind(b" ", 0, 999)]
    # the body is broken at 998 octets, each piece stuffed where it starts with a dot
    assert body == b"." + body_line[:998] + b"\r\n" + b"b" * 998 + b"\r\n" + b"b" * 504 + (
        b"\r\nshort\r\n.\r\n"
    )
    assert message_size(io.BytesIO(message)) == len(wire) - len(b".\r\n") - 1


def test_folding_does_not_depend_on_the_blocks():
    rng = random.Random(20)
    alphabet = [b"a" * 400, b" ", b"\n", b".", b"\r\n", b"\t", b"b" * 700, b"\r"]
    for _ in range(60):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        outs = set()
        for block_size in (1, 3, 64, 999, 65536):
            out = bytearray()
            write_data(io.BytesIO(message), out.extend, block_size=block_size)
            outs.add(bytes(out))
        assert len(outs) == 1, message
        wire = outs.pop()
        for line in wire.split(b"\r\n"):
            assert len(line[1:] if line.startswith(b".") else line) <= 998
        assert b"\r" not in wire.replace(b"\r\n", b"") and b"\n" not in wire.replace(b"\r\n", b"")
        encoder = DataEncoder(stuff=False)
        plain = encoder.feed(message) + encoder.end()
        stuffed = wire[: -len(b".\r\n")]
        assert plain == re.sub(rb"(^|\r\n)\.", rb"\1", stuffed)
        assert message_size(io.BytesIO(message)) == len(plain)


# ------------------------------------------------------------ review (issue 20)


@pytest.mark.parametrize(
    "tx",
    [
        OK + OK + OK + GO + b"hello there\r\n" + OK,  # a line that is no reply, then one
        OK + OK + OK + b"DATA ok\r\n" + GO,  # no reply code to DATA
        OK + OK + b"2.1.5 ok\r\n" + OK + GO,  # no reply code to a pipelined RCPT
    ],
    ids=["end-of-data", "data", "rcpt"],
)
def test_a_line_that_is_no_reply_in_a_transaction_ends_the_connection(tx):
    """After a line without a reply code the replies may no longer match the
    commands (RFC 5321 §4.2: every reply starts with its code): the
    connection carries no other transaction (its RSET would be answered by
    what was meant for another command)."""
    run = three_ways([GREETING + EHLO_PIPE + tx + OK + tx + BYE], [ONE, ONE])
    done = [e for e in run.events if isinstance(e, TransactionDone)]
    assert len(done) == 1 and not done[0].reusable
    assert b"RSET" not in run.sent and run.sent.count(b"MAIL FROM") == 1


# ------------------------------------------------------------------ LMTP (RFC 2033)

LHLO = b"250-lmtp.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
LHLO_PLAIN = b"250-lmtp.test\r\n250 ENHANCEDSTATUSCODES\r\n"
LMTP_GREETING = b"220 lmtp.test LMTP ready\r\n"
THREE: Envelope = ("a@x.test", [], [("b@y.test", []), ("c@y.test", []), ("d@y.test", [])])


def test_lmtp_says_lhlo_and_reads_one_reply_per_recipient_in_rcpt_order():
    """RFC 2033 §4.2: after the end of data, a reply for each recipient that
    RCPT accepted, in RCPT order: 250, 452 and 550 each go to their own."""
    finals = b"250 2.0.0 <b@y.test> saved\r\n452 4.2.2 c is over quota\r\n"
    server = LMTP_GREETING + LHLO_PLAIN + OK + OK + OK + OK + GO + finals
    server += b"550 5.1.1 d unknown\r\n" + BYE
    run = three_ways([server], [THREE], lmtp=True)
    assert run.lines == [
        b"LHLO client.test",
        b"MAIL FROM:<a@x.test>",
        b"RCPT TO:<b@y.test>",
        b"RCPT TO:<c@y.test>",
        b"RCPT TO:<d@y.test>",
        b"DATA",
        b"<message>",
        b".",
        b"QUIT",
    ]
    assert kinds(run) == ["Ready", "SendMessage", "TransactionDone", "Closed"]
    done = run.events[2]
    assert done.final is None and done.reusable
    assert [(r.code, r.status) for r in done.finals] == [
        (250, "2.0.0"),
        (452, "4.2.2"),
        (550, "5.1.1"),
    ]
    assert done.finals[0].text == "<b@y.test> saved"


def test_lmtp_replies_after_data_skip_the_recipients_rcpt_refused():
    """A recipient refused at RCPT gets no reply after the data: the replies
    that come are the accepted ones', and the refused one's place is None."""
    server = LMTP_GREETING + LHLO + OK + b"550 5.1.1 b unknown\r\n" + OK + OK + GO
    server += b"452 4.2.2 c over quota\r\n" + b"250 2.0.0 d saved\r\n" + BYE
    run = three_ways([server], [THREE], lmtp=True)
    done = run.events[2]
    assert [r.code for r in done.rcpts] == [550, 250, 250]
    assert done.finals[0] is None
    assert [r.code for r in done.finals[1:]] == [452, 250]
    assert done.reusable


def test_lmtp_pipelined_transactions_on_one_connection_with_rset():
    tx = OK + OK + OK + OK + GO + OK + OK + OK
    server = LMTP_GREETING + LHLO + tx + OK + tx + BYE
    run = three_ways([server], [THREE, THREE], lmtp=True)
    assert kinds(run) == [
        "Ready", "SendMessage", "TransactionDone", "SendMessage", "TransactionDone", "Closed",
    ]  # fmt: skip
    assert all(e.finals == (RemoteReply(250, "2.0.0", "ok"),) * 3 for e in run.events[2::2][:2])
    writes = drive([server], [THREE, THREE], whole, lmtp=True).writes
    envelope = b"MAIL FROM:<a@x.test>\r\n" + b"".join(
        b"RCPT TO:<%s@y.test>\r\n" % n for n in (b"b", b"c", b"d")
    )
    assert envelope + b"DATA\r\n" in writes  # one write: PIPELINING
    assert b"RSET\r\n" + envelope + b"DATA\r\n" in writes


def test_lmtp_never_falls_back_to_helo():
    """RFC 2033 §4.1: a 5xx to LHLO is no SMTP server to say HELO to."""
    run = three_ways([LMTP_GREETING + b"500 5.5.1 say EHLO\r\n" + BYE], [THREE], lmtp=True)
    assert run.lines == [b"LHLO client.test", b"QUIT"]
    assert run.events[0] == OpenFailed("4.5.1", "smtp; 500 5.5.1 say EHLO")


def test_lmtp_connection_lost_among_the_replies_keeps_those_that_came():
    """The first recipient's 250 came, the second's did not: the first is
    delivered (never sent again), the second is unknown."""
    server = LMTP_GREETING + LHLO + OK + OK + OK + OK + GO + b"250 2.0.0 b saved\r\n"
    run = three_ways([server], [THREE], lmtp=True)
    lost = run.events[2]
    assert isinstance(lost, Lost) and lost.stage == "waiting for the reply to the end of data"
    assert lost.finals == (RemoteReply(250, "2.0.0", "b saved"), None, None)


def test_lmtp_a_garbled_reply_counts_for_its_recipient_and_ends_the_connection():
    server = LMTP_GREETING + LHLO + OK + OK + OK + OK + GO
    server += b"250 2.0.0 b saved\r\nsaved c too\r\n250 2.0.0 d saved\r\n" + OK + BYE
    run = three_ways([server], [THREE, THREE], lmtp=True)
    done = run.events[2]
    assert [r.code for r in done.finals] == [250, -1, 250]
    assert not done.reusable
    assert b"RSET" not in run.sent and run.sent.count(b"MAIL FROM") == 1


def test_lmtp_a_421_among_the_replies_closes_the_connection():
    server = LMTP_GREETING + LHLO + OK + OK + OK + OK + GO
    server += b"250 2.0.0 b saved\r\n421 4.3.2 shutting down\r\n421 4.3.2 shutting down\r\n"
    run = three_ways([server], [THREE, THREE], lmtp=True)
    done = run.events[2]
    assert [r.code for r in done.finals] == [250, 421, 421] and not done.reusable
    assert b"RSET" not in run.sent
