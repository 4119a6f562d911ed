"""`python -m bench selfcheck`: the bench checks itself, no server needed.

The wire form of each message, un-stuffed and with LF endings the way a
server stores it, must pass the verifier; a flipped byte, a duplicate, a
missing or an extra message must each fail it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from . import messages
from .verify import verify_bench_mail


def store_like_a_server(root: Path, msg: messages.Message, name: str) -> None:
    """What a Maildir server does with the wire bytes: trace header, unstuff, LF."""
    lines = msg.wire().split(b"\r\n")
    assert lines[-1] == b""
    text = b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    data = b"Return-Path: <x>\nReceived: from test\n\tby selfcheck; date\n" + text
    for box in msg.rcpts:
        new = root / box / "new"
        new.mkdir(parents=True, exist_ok=True)
        (new / name).write_bytes(data)
        (root / box / "tmp").mkdir(exist_ok=True)


def main() -> int:
    failures = []
    root = Path(tempfile.mkdtemp(prefix="bench-selfcheck-"))
    try:
        run = "selfcheck-1"
        acked = {}
        sizes = [1, 100, 1024, 70_000, 300_000]
        for n in range(60):
            size = sizes[n % len(sizes)]
            rcpts = messages.recipients(n, 1 + n % 5)
            msg = messages.build(run, n, size, rcpts)
            wire = msg.wire()
            assert msg.wire_len() == len(wire), "wire_len"
            assert b"\r\n.\r\n" not in wire, "an unstuffed lone dot"
            store_like_a_server(root, msg, f"m{n}")
            acked[n] = (size, tuple(rcpts))
        v = verify_bench_mail(root, run, acked)
        if not v.ok:
            failures.append(f"clean store fails: {v.summary()} {v.examples}")

        def expect_failure(what: str, kind: str) -> None:
            v = verify_bench_mail(root, run, acked)
            if v.ok or kind not in v.problems:
                failures.append(f"{what}: not caught ({v.summary()})")

        victim = next((root / "u000" / "new").iterdir())
        good = victim.read_bytes()
        victim.write_bytes(good[:-10] + bytes([good[-10] ^ 1]) + good[-9:])
        expect_failure("flipped byte", "body checksum")
        victim.write_bytes(good)
        shutil.copy(victim, victim.with_name("dup"))
        expect_failure("duplicate", "duplicate")
        victim.with_name("dup").unlink()
        victim.unlink()
        expect_failure("missing", "missing")
        victim.write_bytes(good)
        (root / "u000" / "tmp" / "partial").write_bytes(b"x")
        expect_failure("left in tmp", "left in tmp/")
        (root / "u000" / "tmp" / "partial").unlink()
        extra = messages.build(run, 999, 100, ["u000"])
        store_like_a_server(root, extra, "extra")
        expect_failure("not acknowledged", "not acknowledged")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for f in failures:
        print("selfcheck FAILED:", f)
    if not failures:
        print("selfcheck ok: messages round-trip through un-stuffing; the verifier catches faults")
    return 1 if failures else 0
