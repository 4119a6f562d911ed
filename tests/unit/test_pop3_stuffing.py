"""The wire form of a stored message (RETR and TOP): CRLF line ends, dots
doubled, the terminator; the same however the file is cut into chunks; and the
size LIST gives equals what RETR sends (RFC 1939 §11)."""

from __future__ import annotations

import itertools
import random

import pytest

from geosmtp.pop3 import MessageEncoder, virtual_size


def reference(message: bytes, body_lines: int | None = None) -> bytes:
    """The rule, one line at a time: a line ends at LF, a CR just before the LF
    belongs to the line end, any other CR is text."""
    lines: list[bytes] = []
    start = 0
    while (nl := message.find(b"\n", start)) >= 0:
        line = message[start:nl]
        lines.append(line[:-1] if line.endswith(b"\r") else line)
        start = nl + 1
    if start < len(message):
        lines.append(message[start:])  # the last line, without a line end
    if body_lines is not None:
        header_end = lines.index(b"") + 1 if b"" in lines else len(lines)
        lines = lines[: header_end + body_lines]
    sent = (b"." + line if line[:1] == b"." else line for line in lines)
    return b"".join(line + b"\r\n" for line in sent) + b".\r\n"


def stuffing_dots(message: bytes, body_lines: int | None = None) -> int:
    """How many dots `reference` doubled."""
    sent = reference(message, body_lines)[:-3]
    return sum(1 for line in sent.split(b"\r\n") if line[:1] == b".")


def encode(chunks: list[bytes], body_lines: int | None = None) -> bytes:
    encoder = MessageEncoder(body_lines)
    out = [encoder.feed(chunk) for chunk in chunks]
    return b"".join(out) + encoder.end()


TRICKY = [
    b"",
    b"\n",
    b"\r\n",
    b"\r",
    b".",
    b".\n",
    b"..\n",
    b".\r\n.\r\n",
    b"a\r\rb\r\n",
    b"a\r\r\n",
    b"a\n\rb\n",
    b"a\r.b\n",  # a dot after a lone CR does not start a line
    b"\r.\n",
    b"Subject: x\n\n.body\n..\n.\n",
    b"Subject: x\r\n\r\n.body\r\n",
    b"no end",
    b"no end\r",
    b"h: v\n\nbody\n\n\nafter blanks\n",
    b"h: v\r\n\n\r\nb\n",
    b"\n\nbody first\n",
    b"h: v\n\r\n\r.x\n",
    b"\r\r\r\n\n\r\n\r",
]


@pytest.mark.parametrize("message", TRICKY)
def test_whole_message(message):
    assert encode([message]) == reference(message)


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\rb", b"a\rb\r\n.\r\n"),
        (b".a\n.\n", b"..a\r\n..\r\n.\r\n"),
        (b"x\n.\n", b"x\r\n..\r\n.\r\n"),
        (b"a\r\r\n", b"a\r\r\n.\r\n"),
        (b"no end", b"no end\r\n.\r\n"),
    ],
)
def test_examples(message, wire):
    assert encode([message]) == wire


@pytest.mark.parametrize("message", TRICKY)
def test_every_cut_in_two_and_three(message):
    """Every pair of cut points, so a chunk may end in CR before an LF, start with
    a dot, or be empty."""
    expected = reference(message)
    n = len(message)
    for i, j in itertools.combinations_with_replacement(range(n + 1), 2):
        chunks = [message[:i], message[i:j], message[j:]]
        assert encode(chunks) == expected, chunks


@pytest.mark.parametrize("message", TRICKY)
def test_byte_by_byte_with_empty_chunks(message):
    chunks = [b""] + [bytes([b]) for b in message for _ in (0, 1)]
    chunks = [c if k % 2 == 0 else b"" for k, c in enumerate(chunks)] + [b""]
    assert encode(chunks) == reference(message)
    assert encode([bytes([b]) for b in message]) == reference(message)


def _random_message(rng: random.Random) -> bytes:
    alphabet = [b"a", b"b", b".", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b" "]
    return b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))


def _random_chunks(rng: random.Random, message: bytes) -> list[bytes]:
    cuts = sorted(rng.randrange(0, len(message) + 1) for _ in range(rng.randrange(0, 8)))
    bounds = [0, *cuts, len(message)]
    return [message[a:b] for a, b in itertools.pairwise(bounds)]


def test_random_messages_and_cuts():
    rng = random.Random(1939)
    for _ in range(3000):
        message = _random_message(rng)
        chunks = _random_chunks(rng, message)
        lines = rng.choice([None, None, 0, 1, 2, 5])
        assert encode(chunks, lines) == reference(message, lines), (chunks, lines)


# -------------------------------------------------------------------- the size


def _sent_size(message: bytes) -> int:
    """Octets RETR sends before the terminator, less the stuffing dots: the
    CRLF added to a message without a final line end belongs to the terminator."""
    wire = encode([message])
    end = b".\r\n" if message.endswith(b"\n") or not message else b"\r\n.\r\n"
    assert wire.endswith(end)
    return len(wire) - len(end) - stuffing_dots(message)


@pytest.mark.parametrize("message", TRICKY)
def test_virtual_size_is_what_retr_sends(message):
    assert virtual_size(message) == _sent_size(message)


def test_virtual_size_on_random_messages():
    rng = random.Random(11)
    for _ in range(3000):
        message = _random_message(rng)
        assert virtual_size(message) == _sent_size(message), message


@pytest.mark.parametrize(
    ("message", "size"),
    [(b"", 0), (b"a\n", 3), (b"a\r\n", 3), (b"a\r", 2), (b"a\r\r\n", 4), (b".\n", 3)],
)
def test_virtual_size_examples(message, size):
    assert virtual_size(message) == size


# ------------------------------------------------------------------------- TOP

MAIL = b"From: a\nSubject: s\n\nline 1\n.line 2\nline 3\n"


@pytest.mark.parametrize(
    ("lines", "wire"),
    [
        (0, b"From: a\r\nSubject: s\r\n\r\n.\r\n"),
        (1, b"From: a\r\nSubject: s\r\n\r\nline 1\r\n.\r\n"),
        (2, b"From: a\r\nSubject: s\r\n\r\nline 1\r\n..line 2\r\n.\r\n"),
        (3, b"From: a\r\nSubject: s\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n.\r\n"),
        (1000, b"From: a\r\nSubject: s\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n.\r\n"),
    ],
)
def test_top(lines, wire):
    assert encode([MAIL], lines) == wire


@pytest.mark.parametrize(
    ("message", "lines", "wire"),
    [
        (b"Subject: only headers\nX: y\n", 3, b"Subject: only headers\r\nX: y\r\n.\r\n"),
        (b"Subject: no end", 0, b"Subject: no end\r\n.\r\n"),
        (b"\nbody 1\nbody 2\n", 1, b"\r\nbody 1\r\n.\r\n"),
        (b"\nbody 1\nbody 2\n", 0, b"\r\n.\r\n"),
        (b"h: v\n\nlast without end", 1, b"h: v\r\n\r\nlast without end\r\n.\r\n"),
        (b"h: v\n\nlast without end", 0, b"h: v\r\n\r\n.\r\n"),
        (b"h: v\r\n\r\n\r\nblank first\r\n", 1, b"h: v\r\n\r\n\r\n.\r\n"),
        (b"", 0, b".\r\n"),
    ],
)
def test_top_edges(message, lines, wire):
    assert encode([message], lines) == wire
    assert reference(message, lines) == wire


@pytest.mark.parametrize("message", [MAIL, *TRICKY])
@pytest.mark.parametrize("lines", [0, 1, 2, 4])
def test_top_every_cut(message, lines):
    expected = reference(message, lines)
    for i, j in itertools.combinations_with_replacement(range(len(message) + 1), 2):
        chunks = [message[:i], message[i:j], message[j:]]
        assert encode(chunks, lines) == expected, chunks


def test_top_is_done_early_and_then_ignores_the_rest():
    encoder = MessageEncoder(1)
    assert not encoder.done
    head = encoder.feed(b"Subject: s\n\nfirst\nsec")
    assert head == b"Subject: s\r\n\r\nfirst\r\n" and encoder.done
    assert encoder.feed(b"ond\n" * 1000) == b""
    assert encoder.end() == b".\r\n"


def test_top_done_with_a_cr_held_back():
    encoder = MessageEncoder(0)
    assert encoder.feed(b"h: v\n\nbody\r") == b"h: v\r\n\r\n" and encoder.done
    assert encoder.end() == b".\r\n"


def test_retr_is_never_done_before_the_end():
    encoder = MessageEncoder()
    encoder.feed(b"h: v\n\nbody\n")
    assert not encoder.done
    encoder.end()
    assert encoder.done


def test_misuse_raises():
    encoder = MessageEncoder()
    encoder.end()
    with pytest.raises(ValueError):
        encoder.feed(b"x")
    with pytest.raises(ValueError):
        encoder.end()
    with pytest.raises(ValueError):
        MessageEncoder(-1)


def test_a_large_message_in_chunks():
    """A message of many chunks: the same output as the reference, in pieces
    no larger than a chunk's worth (bounded memory is the shell's to keep)."""
    rng = random.Random(5)
    lines = [
        rng.choice([b"", b".", b"..dots", b"text line", b"\r", b"x" * 200]) for _ in range(20000)
    ]
    message = b"Subject: big\n\n" + b"\n".join(lines) + b"\n"
    encoder = MessageEncoder()
    pieces = []
    for k in range(0, len(message), 4096):
        piece = encoder.feed(message[k : k + 4096])
        assert len(piece) <= 2 * 4096 + 1
        pieces.append(piece)
    pieces.append(encoder.end())
    assert b"".join(pieces) == reference(message)
