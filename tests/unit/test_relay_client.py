"""The pieces of geosmtp.relay.client that need no server: the streaming DATA
writer (CRLF, dot-stuffing), loop detection, the 8-bit scan, reply parsing.
(Delivery to real servers: tests/integration/test_smtp_client.py.)"""

from __future__ import annotations

import dataclasses
import io
import random
import re

import pytest

from geosmtp.relay.client import (
    AttemptResult,
    Outcome,
    RecipientResult,
    RemoteReply,
    Timeouts,
    count_received,
    deliver,
    has_8bit,
    parse_reply,
    printable,
    write_data,
)


def data_bytes(message: bytes, block_size: int = 65536) -> bytes:
    """What write_data sends for `message`, every send joined, checking the count."""
    sent: list[bytes] = []
    n = write_data(io.BytesIO(message), sent.append, block_size=block_size)
    out = b"".join(sent)
    assert n == len(out)
    assert all(sent), "no empty sends"
    return out


def reference(message: bytes) -> bytes:
    """The same, line by line, the obvious way."""
    if not message:
        return b".\r\n"
    # A CR right before a CRLF is dropped (the client's stray CR, kept in storage).
    lines = re.split(rb"\r?\r\n|\r|\n", message)
    if lines[-1] == b"":
        lines.pop()  # the message ended with a line end
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\n", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a\rb", b"a\r\nb\r\n.\r\n"),  # a bare CR is a line end, never sent bare
        (b"a\n\nb\n", b"a\r\n\r\nb\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\n", b"..\r\n.\r\n"),
        (b"..x\n", b"...x\r\n.\r\n"),
        (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),  # SMTP smuggling stays data
        (b"a\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),  # <CR>.<CRLF> cannot end it either
        (b"x.y\n", b"x.y\r\n.\r\n"),  # a dot inside a line is left alone
        (b"\r\r\n", b"\r\n.\r\n"),  # a CR before a CRLF: no empty line made of it
        (b"S: x\r\r\nT: y\n\nb", b"S: x\r\nT: y\r\n\r\nb\r\n.\r\n"),  # (which would end a header)
        (b"a\r\r\r\n", b"a\r\n\r\n.\r\n"),
        (b"h\xc3\xa9\x00\xff\n", b"h\xc3\xa9\x00\xff\r\n.\r\n"),  # octets pass as they are
    ],
)
def test_data_wire_form(message, wire):
    assert data_bytes(message) == wire == reference(message)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 7, 64])
def test_data_wire_form_does_not_depend_on_how_the_file_is_read(block_size):
    rng = random.Random(block_size)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\n.", b"\r.", b"..", b"\xe9"]
    for _ in range(300):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert data_bytes(message, block_size) == reference(message), message


def test_data_is_streamed_in_blocks():
    """A big message is sent as it is read: no send holds more than a block's worth."""
    message = (b"." * 100 + b"\n") * 10_000  # ~1 MB, every line to be stuffed
    sizes: list[int] = []
    out = bytearray()

    def send(b: bytes) -> None:
        sizes.append(len(b))
        out.extend(b)

    write_data(io.BytesIO(message), send, block_size=4096)
    assert bytes(out) == reference(message)
    assert max(sizes) <= 2 * 4096 + 3
    assert len(sizes) > 200


HEADERS = b"Received: from a\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\nreceived :x\nRECEIVED:\ty\n"


def test_received_fields_are_counted_in_the_header_section_only():
    message = HEADERS + b"Subject: Received: no\nX-Received: no\n\nReceived: in the body\n"
    assert count_received(io.BytesIO(message)) == 3


def test_received_counting_with_crlf_and_no_body():
    assert count_received(io.BytesIO(HEADERS.replace(b"\n", b"\r\n"))) == 3
    assert count_received(io.BytesIO(b"")) == 0
    assert count_received(io.BytesIO(b"\nReceived: x\n")) == 0


def test_received_counting_stops_early():
    f = io.BytesIO(b"Received: x\n" * 1000 + b"\nbody\n")
    assert count_received(f, stop_after=51) == 51
    assert f.tell() == 51 * len(b"Received: x\n")


def test_received_counting_survives_a_huge_header_line():
    long_line = b"X-Long: " + b"Received: " * 10_000 + b"\n"  # read in pieces, not as lines
    message = b"Received: 1\n" + long_line + b"Received: 2\n\n"
    assert count_received(io.BytesIO(message)) == 2


def test_8bit_scan():
    assert not has_8bit(io.BytesIO(b"plain\r\n" * 1000))
    assert has_8bit(io.BytesIO(b"plain\n" * 1000 + b"\xe9"))
    assert has_8bit(io.BytesIO(b"x" * 10 + b"\x80"), block_size=3)
    assert not has_8bit(io.BytesIO(b""))


@pytest.mark.parametrize(
    ("code", "raw", "reply"),
    [
        (250, b"2.0.0 Ok: queued as X", RemoteReply(250, "2.0.0", "Ok: queued as X")),
        (250, b"Ok", RemoteReply(250, None, "Ok")),
        (
            550,
            b"5.1.1 <bob@x>: no such user\n5.1.1 try another",
            RemoteReply(550, "5.1.1", "<bob@x>: no such user try another"),
        ),
        (451, b"5.1.1 class mismatch", RemoteReply(451, None, "5.1.1 class mismatch")),
        (421, b"", RemoteReply(421, None, "")),
        (550, b"5.7.1", RemoteReply(550, "5.7.1", "")),
        (550, b"bad\x1b[31m\rtext \xff", RemoteReply(550, None, "bad?[31m?text \ufffd")),
    ],
)
def test_replies(code, raw, reply):
    assert parse_reply(code, raw) == reply


def test_reply_status_and_text():
    assert RemoteReply(550, "5.1.1", "no").status == "5.1.1"
    assert RemoteReply(550, None, "no").status == "5.0.0"
    assert RemoteReply(451, None, "later").status == "4.0.0"
    assert RemoteReply(-1, None, "?").status == "4.5.0"
    assert str(RemoteReply(550, "5.1.1", "no such user")) == "550 5.1.1 no such user"
    assert str(RemoteReply(250, None, "")) == "250"


def test_printable_bounds_and_cleans():
    assert printable("a\r\nb\u2028c\x85") == "a??b?c?"
    assert len(printable("x" * 5000)) == 2000


def test_timeouts_default_to_rfc_5321_and_can_all_be_one():
    t = Timeouts()
    assert (t.greeting, t.mail, t.rcpt, t.data_init, t.data_block, t.data_end) == (
        300,
        300,
        300,
        120,
        180,
        600,
    )
    assert set(dataclasses.astuple(Timeouts.all(3))) == {3}


def test_a_looping_message_fails_before_any_connection():
    """No host at all: a connection attempt would say "no host to deliver to"."""
    message = io.BytesIO(b"Received: x\n" * 51 + b"Subject: loop\n\nbody\n")
    result = deliver([], 25, "a@x.test", ["b@y.test", "c@y.test"], message, helo_name="me.test")
    assert result.permanent == ["b@y.test", "c@y.test"]
    assert {r.status for r in result.recipients} == {"5.4.6"}
    assert "more than 50 Received:" in result.recipients[0].diagnostic
    assert result.remote_mta is None and result.relay == "none"


def test_fifty_received_fields_are_not_a_loop():
    message = io.BytesIO(b"Received: x\n" * 50 + b"\nbody\n")
    result = deliver([], 25, "a@x.test", ["b@y.test"], message, helo_name="me.test")
    assert result["b@y.test"] == RecipientResult(
        "b@y.test", Outcome.TEMPORARY, "4.4.4", "x-geosmtp; no host to deliver to"
    )


def test_max_received_is_configurable():
    message = io.BytesIO(b"Received: x\n" * 3 + b"\nbody\n")
    result = deliver([], 25, "", ["b@y.test"], message, helo_name="me.test", max_received=2)
    assert result.permanent == ["b@y.test"]


def test_addresses_that_cannot_be_sent_fail_alone():
    result = deliver(
        [], 25, "a@x.test", ["ok@y.test", "bad>@y.test", "x\r\n@y"], io.BytesIO(b"\n"),
        helo_name="me.test",
    )  # fmt: skip
    assert result.permanent == ["bad>@y.test", "x\r\n@y"]
    assert result["bad>@y.test"].status == "5.1.3"
    assert result.temporary == ["ok@y.test"]
    bad_sender = deliver([], 25, "a\n@x", ["b@y.test"], io.BytesIO(b""), helo_name="me.test")
    assert bad_sender["b@y.test"].status == "5.1.7"


def test_argument_errors():
    with pytest.raises(ValueError):
        deliver([], 25, "", [], io.BytesIO(b""), helo_name="me.test")
    with pytest.raises(ValueError):
        deliver([], 25, "", ["b@y"], io.BytesIO(b""), helo_name="me.test", tls="maybe")  # type: ignore[arg-type]


def test_result_lookup():
    r = AttemptResult(
        (RecipientResult("a@x", Outcome.DELIVERED, "2.0.0", "smtp; 250 ok"),),
        remote_host="mx.x",
        remote_address="192.0.2.1",
        remote_port=25,
    )
    assert r.relay == "mx.x[192.0.2.1]:25" and r.remote_mta == "dns; mx.x"
    assert r.delivered == ["a@x"] and r.temporary == r.permanent == []
    with pytest.raises(KeyError):
        r["b@x"]
