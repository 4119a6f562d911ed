"""The messages the bench sends: deterministic, each with a unique id and a checksum.

Message `n` of run `run_id` is a pure function of `(run_id, n, size, recipients)`,
so the verifier can rebuild exactly what the client sent without keeping it.
Bodies are slices of a fixed pool of text blocks (made once from a fixed seed),
so building a 1 KB or a 25 MB message costs a few slices, not a loop over lines.
The pool has lines that start with a dot, lines that are only a dot and empty
lines, so dot-stuffing and un-stuffing are exercised on every run.

Two forms of every message:

- the wire form: CRLF line endings, dot-stuffed, what the client sends;
- the canonical form: LF line endings, not stuffed, what a Maildir holds
  (geosmtp, the aiosmtpd peer and Postfix all store LF-terminated files).

Headers, in this order, each at the start of a line:

    X-Bench-Id: <run_id>.<n>
    X-Bench-Sum: sha256:<first 32 hex digits of sha256(canonical body)>
    Message-ID: <n.run_id@bench.test>
    Date, From, To, Subject

Servers put their trace headers (Return-Path, Received) before ours; the
verifier reads from `X-Bench-Id:` on.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

DOMAIN = "bench.test"
SENDER = f"bench@{DOMAIN}"
MAILBOXES = 100  # recipients are u000 .. u099
BLOCK_TARGET = 64 * 1024
N_BLOCKS = 32
DATE = "Thu, 01 Jan 2026 00:00:00 +0000"


def mailbox(i: int, boxes: int = MAILBOXES) -> str:
    return f"u{i % boxes:03d}"


def recipients(n: int, count: int, boxes: int = MAILBOXES) -> list[str]:
    """Mailbox names for message `n`, spread over `boxes` mailboxes (distinct while
    count <= boxes)."""
    return [mailbox(n * count + j, boxes) for j in range(count)]


class _Block:
    __slots__ = ("lf", "lf_offsets", "n_lines", "wire", "wire_offsets")

    def __init__(self, lines: list[bytes]) -> None:
        self.n_lines = len(lines)
        lf_offsets = [0]
        wire_offsets = [0]
        lf_parts = []
        wire_parts = []
        for line in lines:
            lf_parts.append(line + b"\n")
            w = (b"." + line if line.startswith(b".") else line) + b"\r\n"
            wire_parts.append(w)
            lf_offsets.append(lf_offsets[-1] + len(line) + 1)
            wire_offsets.append(wire_offsets[-1] + len(w))
        self.lf = b"".join(lf_parts)
        self.wire = b"".join(wire_parts)
        self.lf_offsets = lf_offsets
        self.wire_offsets = wire_offsets


def _make_pool() -> list[_Block]:
    rng = random.Random(0x5EED5)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 10)))
        for _ in range(2000)
    ]
    punct = [".", ",", ";", ":", "!", "?", "-", "(x)", "'q'", '"z"', "@", "#1", "100%", "a=b"]
    blocks = []
    for _ in range(N_BLOCKS):
        lines: list[bytes] = []
        size = 0
        while size < BLOCK_TARGET:
            r = rng.random()
            if r < 0.01:
                line = "."  # a lone dot: stuffed to ".." on the wire
            elif r < 0.03:
                line = "." + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            elif r < 0.05:
                line = ""
            else:
                parts = []
                length = 0
                limit = rng.randint(1, 76)
                while length < limit:
                    w = rng.choice(words) if rng.random() > 0.1 else rng.choice(punct)
                    parts.append(w)
                    length += len(w) + 1
                line = " ".join(parts)[:76].rstrip()
            lines.append(line.encode("ascii"))
            size += len(line) + 2
        blocks.append(_Block(lines))
    return blocks


_POOL: list[_Block] | None = None


def pool() -> list[_Block]:
    global _POOL
    if _POOL is None:
        _POOL = _make_pool()
    return _POOL


@dataclass(frozen=True)
class Message:
    """One bench message; `wire_chunks()` and `canonical_*` are consistent by construction."""

    run_id: str
    n: int
    rcpts: tuple[str, ...]
    header_wire: bytes
    header_lf: bytes
    # The body as (block index, first line, end line) pieces.
    pieces: tuple[tuple[int, int, int], ...]
    body_sum: str

    @property
    def bench_id(self) -> str:
        return f"{self.run_id}.{self.n}"

    def wire_chunks(self) -> Iterator[bytes]:
        """The dot-stuffed, CRLF message, without the final `.` line, in pieces."""
        yield self.header_wire
        blocks = pool()
        for b, start, end in self.pieces:
            blk = blocks[b]
            yield blk.wire[blk.wire_offsets[start] : blk.wire_offsets[end]]

    def wire(self) -> bytes:
        return b"".join(self.wire_chunks())

    def canonical_body_chunks(self) -> Iterator[bytes]:
        blocks = pool()
        for b, start, end in self.pieces:
            blk = blocks[b]
            yield blk.lf[blk.lf_offsets[start] : blk.lf_offsets[end]]

    def canonical_body_len(self) -> int:
        blocks = pool()
        return sum(blocks[b].lf_offsets[e] - blocks[b].lf_offsets[s] for b, s, e in self.pieces)

    def wire_len(self) -> int:
        blocks = pool()
        return len(self.header_wire) + sum(
            blocks[b].wire_offsets[e] - blocks[b].wire_offsets[s] for b, s, e in self.pieces
        )


def _body_pieces(n: int, body_size: int) -> tuple[tuple[int, int, int], ...]:
    """Whole lines from the pool, starting at a place that depends on n, ~body_size wire octets."""
    blocks = pool()
    mix = (n * 2654435761) & 0xFFFFFFFF
    b = mix % N_BLOCKS
    blk = blocks[b]
    start = (mix >> 8) % max(1, blk.n_lines // 2)
    pieces = []
    left = body_size
    while left > 0:
        blk = blocks[b]
        base = blk.wire_offsets[start]
        # First line end whose wire offset reaches base + left.
        end = bisect.bisect_left(blk.wire_offsets, base + left, lo=start + 1)
        if end > blk.n_lines:
            end = blk.n_lines
        if end <= start:
            break
        pieces.append((b, start, end))
        left -= blk.wire_offsets[end] - base
        b = (b + 7) % N_BLOCKS
        start = 0
    return tuple(pieces)


def build(run_id: str, n: int, size: int, rcpts: list[str] | tuple[str, ...]) -> Message:
    """Message `n` of run `run_id`, about `size` octets on the wire."""
    to = ", ".join(f"<{r}@{DOMAIN}>" for r in rcpts)
    tail = (
        f"Message-ID: <{n}.{run_id}@{DOMAIN}>\n"
        f"Date: {DATE}\n"
        f"From: Bench <{SENDER}>\n"
        f"To: {to}\n"
        f"Subject: bench {run_id} message {n}\n"
        "\n"
    )
    header_guess = 120 + len(tail)
    pieces = _body_pieces(n, max(1, size - header_guess))
    h = hashlib.sha256()
    blocks = pool()
    for b, s, e in pieces:
        blk = blocks[b]
        h.update(blk.lf[blk.lf_offsets[s] : blk.lf_offsets[e]])
    body_sum = h.hexdigest()[:32]
    header_lf = (f"X-Bench-Id: {run_id}.{n}\nX-Bench-Sum: sha256:{body_sum}\n" + tail).encode()
    header_wire = header_lf.replace(b"\n", b"\r\n")
    return Message(run_id, n, tuple(rcpts), header_wire, header_lf, pieces, body_sum)
