"""After a run: does the Maildir hold exactly what the server acknowledged?

Every acknowledged message must be in `new/` of each of its recipients exactly
once, byte for byte (from our first header `X-Bench-Id:` to the end: the server
may only put trace headers in front); nothing else may be there, and `tmp/`
must be empty. A message the server refused must not be stored.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import messages

ID_HEADER = b"X-Bench-Id: "


@dataclass
class Verdict:
    ok: bool = True
    files: int = 0
    expected: int = 0
    problems: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[str] = field(default_factory=list)
    skipped: str | None = None

    def fail(self, kind: str, example: str) -> None:
        self.ok = False
        self.problems[kind] += 1
        if len(self.examples) < 8:
            self.examples.append(f"{kind}: {example}")

    def summary(self) -> str:
        if self.skipped:
            return f"not checked ({self.skipped})"
        if self.ok:
            return f"ok: {self.files} files, all {self.expected} expected deliveries, byte-exact"
        probs = ", ".join(f"{k}={v}" for k, v in sorted(self.problems.items()))
        return f"FAILED: {self.files} files for {self.expected} expected; {probs}"


def mail_files(root: Path) -> dict[str, list[Path]]:
    boxes: dict[str, list[Path]] = {}
    if not root.is_dir():
        return boxes
    for box in sorted(root.iterdir()):
        new = box / "new"
        if new.is_dir():
            boxes[box.name] = sorted(new.iterdir())
    return boxes


def tmp_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/tmp/*")) if root.is_dir() else []


def count_files(root: Path) -> int:
    return sum(len(v) for v in mail_files(root).values())


class _Expected:
    """Rebuilds the canonical form of message n, once per n."""

    def __init__(self, run_id: str, sizes: dict[int, int], rcpts: dict[int, tuple[str, ...]]):
        self.run_id = run_id
        self.sizes = sizes
        self.rcpts = rcpts
        self._cache: dict[int, tuple[bytes, int, str]] = {}

    def get(self, n: int) -> tuple[bytes, int, str]:
        """(canonical header, body length, body checksum)."""
        hit = self._cache.get(n)
        if hit is None:
            msg = messages.build(self.run_id, n, self.sizes[n], self.rcpts[n])
            hit = (msg.header_lf, msg.canonical_body_len(), msg.body_sum)
            if len(self._cache) < 200_000:
                self._cache[n] = hit
        return hit


def verify_bench_mail(
    root: Path,
    run_id: str,
    acked: dict[int, tuple[int, tuple[str, ...]]],
    refused: set[int] | frozenset[int] = frozenset(),
    strict_headers: bool = True,
) -> Verdict:
    """`acked`: message number -> (size, recipients) for every message answered 250.

    `refused` holds numbers the server answered with an error: they must be absent.
    Messages whose fate is unknown (connection lost after the final dot) are
    in neither and may be present once.
    """
    v = Verdict()
    expected_boxes: dict[str, set[int]] = defaultdict(set)
    for n, (_size, rcpts) in acked.items():
        for box in rcpts:
            expected_boxes[box].add(n)
    v.expected = sum(len(s) for s in expected_boxes.values())
    exp = _Expected(
        run_id, {n: s for n, (s, _r) in acked.items()}, {n: r for n, (_s, r) in acked.items()}
    )
    for path in tmp_files(root):
        v.fail("left in tmp/", str(path))
    seen: dict[str, set[int]] = defaultdict(set)
    for box, files in mail_files(root).items():
        for path in files:
            v.files += 1
            data = path.read_bytes()
            at = data.find(ID_HEADER)
            if at < 0 or (at > 0 and data[at - 1] != 0x0A):
                v.fail("no X-Bench-Id", str(path))
                continue
            eol = data.find(b"\n", at)
            ident = data[at + len(ID_HEADER) : eol].decode("ascii", "replace").strip()
            run, _, num = ident.rpartition(".")
            if run != run_id or not num.isdigit():
                v.fail("foreign message", f"{path}: {ident}")
                continue
            n = int(num)
            if n in refused:
                v.fail("stored although refused", f"{box}: {ident}")
                continue
            if n not in acked:
                v.fail("not acknowledged", f"{box}: {ident}")
                continue
            if box not in acked[n][1]:
                v.fail("wrong mailbox", f"{box}: {ident}")
                continue
            if n in seen[box]:
                v.fail("duplicate", f"{box}: {ident}")
                continue
            seen[box].add(n)
            header, body_len, body_sum = exp.get(n)
            split = data.find(b"\n\n", at)
            if split < 0:
                v.fail("no body", f"{box}: {ident}")
                continue
            body = memoryview(data)[split + 2 :]
            if len(body) != body_len:
                v.fail("body length", f"{box}: {ident}: {len(body)} != {body_len}")
                continue
            if hashlib.sha256(body).hexdigest()[:32] != body_sum:
                v.fail("body checksum", f"{box}: {ident}")
                continue
            if b"X-Bench-Sum: sha256:" + body_sum.encode() not in data[at:split]:
                v.fail("checksum header", f"{box}: {ident}")
                continue
            if strict_headers and data[at : split + 2] != header:
                v.fail("header bytes", f"{box}: {ident}")
    for box, ns in expected_boxes.items():
        missing = len(ns - seen.get(box, set()))
        if missing:
            some = sorted(ns - seen.get(box, set()))[:3]
            v.fail("missing", f"{box}: {missing} missing, e.g. {some}")
            v.problems["missing"] += missing - 1
    return v


def verify_count(root: Path, expected: int) -> Verdict:
    """For foreign clients (smtp-source): the right number of whole, identical bodies."""
    v = Verdict(expected=expected)
    for path in tmp_files(root):
        v.fail("left in tmp/", str(path))
    bodies: dict[bytes, int] = defaultdict(int)
    for _box, files in mail_files(root).items():
        for path in files:
            v.files += 1
            data = path.read_bytes()
            split = data.find(b"\n\n")
            bodies[hashlib.sha256(data[split + 2 :]).digest()] += 1
    if v.files != expected:
        v.fail("count", f"{v.files} files, expected {expected}")
    if len(bodies) > 1:
        v.fail("bodies differ", f"{len(bodies)} different bodies")
    return v
