"""The pop3 scenario's data: full mailboxes, their users, and the checks.

Mailbox `i` is `p0000`.. (`box(i)`), its user has the same name and the
password `password(box)`. It holds `per_box` messages: message `k` of
mailbox `i` is bench message `n = i * per_box + k` (`bench.messages`, so a
client can rebuild it from its `X-Bench-Id`), stored in `new/` in the form
geosmtp's delivery stores it (LF line endings, a geosmtp-style unique name,
mode 0600). Sizes are a fixed mix: log-uniform between 2 and 50 KB
(median about 10 KB, mean about 15 KB), a pure function of `n`.

Passwords reach the servers as argon2id hashes (geosmtp's `users:` takes
nothing else; Dovecot checks the same strings as `{ARGON2ID}`):

- `passwd`: what `geosmtp passwd` prints (argon2-cffi's defaults, RFC 9106's
  low-memory choice: t=3, m=64 MiB, p=4), i.e. what a real deployment has.
  Each login costs about 0.25 s of CPU here, which is most of a session.
- `cheap`: t=1, m=1 MiB, p=1, about a millisecond: the POP3 data path alone.
  No deployment should use it.

Making 1,000 `passwd` hashes takes minutes, so they are kept in
`bench/.cache/` (keyed by the hasher's parameters) and reused.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import messages

PER_BOX = 20
MIN_SIZE = 2 * 1024
MAX_SIZE = 50 * 1024
CACHE = Path(__file__).resolve().parent / ".cache"
HASHES = ("passwd", "cheap")


def box(i: int) -> str:
    return f"p{i:04d}"


def password(name: str) -> str:
    return f"{name}-bench-pw"


def size(n: int) -> int:
    """Wire size of message n: log-uniform in [MIN_SIZE, MAX_SIZE]."""
    return int(MIN_SIZE * (MAX_SIZE / MIN_SIZE) ** random.Random(n).random())


def content(run_id: str, n: int, name: str, fixed_size: int | None = None) -> bytes:
    """Message n as the Maildir file holds it (LF, not stuffed)."""
    msg = messages.build(run_id, n, fixed_size or size(n), (name,))
    return msg.header_lf + b"".join(msg.canonical_body_chunks())


def populate(
    mail_dir: Path,
    run_id: str,
    boxes: int,
    per_box: int = PER_BOX,
    fixed_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Fill `boxes` Maildirs; (files, octets). Synced to disk before it returns,
    so no server pays for writing back what the bench wrote."""
    files = octets = 0
    base = int(time.time())
    pid = os.getpid()
    for i in range(boxes):
        name = box(i)
        root = mail_dir / name
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        for k in range(per_box):
            n = i * per_box + k
            data = content(run_id, n, name, fixed_size)
            # <sec>.M<usec>P<pid>Q<n>.<host>, like geosmtp's delivery names
            path = root / "new" / f"{base + k}.M{n % 1_000_000:06d}P{pid}Q{n + 1}.bench.test"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            files += 1
            octets += len(data)
        if progress is not None:
            progress(i + 1)
    os.sync()
    return files, octets


def decode(block: bytes) -> bytes:
    """A RETR response's lines (CRLF, dot-stuffed, without the final `.` line)
    back to the stored form (LF, not stuffed)."""
    if block.startswith(b"."):
        block = block[1:]
    return block.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n")


def crlf_size(stored: bytes) -> int:
    """The size POP3 reports for a message (RFC 1939 §11: line ends count as CRLF)."""
    return len(stored) + stored.count(b"\n")


# ------------------------------------------------------------ users


def _hash_function(kind: str) -> Callable[[str], str]:
    if kind == "passwd":
        from geosmtp.auth import hash_password  # what `geosmtp passwd` prints

        return hash_password
    if kind == "cheap":
        from argon2 import PasswordHasher

        return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash
    raise ValueError(f"hash: one of {', '.join(HASHES)}")


def hashes(boxes: int, kind: str, say: Callable[[str], None] = print) -> dict[str, str]:
    """User -> argon2id hash of its password, for `boxes` users (cached)."""
    from argon2 import extract_parameters

    fn = _hash_function(kind)
    p = extract_parameters(fn("probe"))
    params = f"t={p.time_cost},m={p.memory_cost},p={p.parallelism}"
    path = CACHE / f"pop3-users-{params}.json"
    known: dict[str, str] = {}
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    names = [box(i) for i in range(boxes)]
    todo = [n for n in names if n not in known]
    if todo:
        say(f"  hashing {len(todo):,} passwords (argon2id {params}), once: kept in {path}")
        t0 = time.monotonic()
        for j, name in enumerate(todo, 1):
            known[name] = fn(password(name))
            if j % 100 == 0:
                say(f"  {j:,}/{len(todo):,} hashed ({time.monotonic() - t0:.0f} s)")
        CACHE.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)
    return {n: known[n] for n in names}


# ------------------------------------------------------------ the check


@dataclass
class Emptied:
    """After the run: is every Maildir empty, nothing left behind?"""

    boxes: int = 0
    left_new: int = 0
    left_cur: int = 0
    left_tmp: int = 0
    broken: int = 0  # mailboxes without their new/, cur/ or tmp/
    other: list[str] = field(default_factory=list)  # files besides cur/new/tmp (indexes, locks)
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.left_new == self.left_cur == self.left_tmp == self.broken == 0

    def summary(self) -> str:
        left = self.left_new + self.left_cur + self.left_tmp
        text = (
            f"{self.boxes:,} Maildirs empty"
            if self.ok
            else f"FAILED: {left:,} files left (new/ {self.left_new:,}, cur/ {self.left_cur:,}, "
            f"tmp/ {self.left_tmp:,}; {self.broken:,} Maildirs broken)"
        )
        if self.other:
            text += f"; {len(self.other):,} other files: {', '.join(sorted(set(self.other))[:4])}"
        return text


def check_emptied(mail_dir: Path, boxes: int) -> Emptied:
    """Count every file in each mailbox's new/, cur/ and tmp/ (all must be empty),
    and name anything else in the mailbox folders."""
    e = Emptied(boxes=boxes)
    for i in range(boxes):
        root = mail_dir / box(i)
        missing = [sub for sub in ("new", "cur", "tmp") if not (root / sub).is_dir()]
        if missing:
            e.broken += 1
            if len(e.examples) < 8:
                e.examples.append(f"{box(i)}: no {', '.join(missing)}/")
        for top, _dirs, files in os.walk(root):
            rel = os.path.relpath(top, root)
            sub = rel.split(os.sep)[0]
            for name in files:
                if sub in ("new", "cur", "tmp"):
                    setattr(e, f"left_{sub}", getattr(e, f"left_{sub}") + 1)
                    if len(e.examples) < 8:
                        e.examples.append(f"left in {box(i)}/{rel}/{name}")
                else:
                    e.other.append(os.path.normpath(os.path.join(rel, name)))
    return e
