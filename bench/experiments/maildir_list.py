"""What listing a big maildrop costs: `Maildir.list()` on N files (20,000 by default).

    python bench/experiments/maildir_list.py [N] [ROUNDS]

Three maildrops of N files each, half in new/, half in cur/ with `:2,S`:
geosmtp's names (`<base>,S=<size>,W=<vsize>`: nothing stat'ed), foreign names
without fields (each file stat'ed; vsize unknown until read), and the foreign
ones again once their vsize is cached. Prints the best of ROUNDS (5) wall times
per maildrop, warm page cache, and the `virtual_size` of all foreign files read
once. With strace on PATH, also the syscalls of one listing of each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geosmtp.storage import Maildir
from geosmtp.storage.maildir import VIRTUAL_SIZES

BODY = b"Subject: x\n\n" + b"a line of text\n" * 60  # ~1 KB


def fill(root: Path, n: int, fields: bool) -> Maildir:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True)
    vsize = len(BODY) + BODY.count(b"\n")
    for i in range(n):
        base = f"{1_700_000_000 + i}.M{i % 1_000_000}P{i}Q1.host"
        name = f"{base},S={len(BODY)},W={vsize}" if fields else base
        path = root / "new" / name if i % 2 else root / "cur" / f"{name}:2,S"
        path.write_bytes(BODY)
    return Maildir(root)


def best(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _strace(code: str) -> dict[str, int]:
    done = subprocess.run(
        ["strace", "-f", "-c", "-e", "trace=%file,%desc", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    counts = {}
    for line in done.stderr.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[3].isdigit() and cols[-1] != "total":
            counts[cols[-1]] = int(cols[3])
    return counts


def syscalls(path: Path) -> str:
    """The syscalls one `list()` makes: a run with it less a run without."""
    if shutil.which("strace") is None:
        return "(no strace)"
    setup = f"from geosmtp.storage import Maildir; box = Maildir({str(path)!r})"
    base, listed = _strace(setup), _strace(setup + "; box.list()")
    diff = {k: v - base.get(k, 0) for k, v in listed.items() if v - base.get(k, 0) > 0}
    return ", ".join(f"{k} {v}" for k, v in sorted(diff.items())) or "none"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory() as tmp:
        ours = fill(Path(tmp) / "ours", n, True)
        foreign = fill(Path(tmp) / "foreign", n, False)
        assert len(ours.list()) == n and all(m.vsize is not None for m in ours.list())
        print(f"{n} messages, best of {rounds}:")
        print(f"  list(), geosmtp names (S=, W=):   {best(ours.list, rounds) * 1000:7.1f} ms")
        print(f"  list(), foreign names (stat):     {best(foreign.list, rounds) * 1000:7.1f} ms")
        t = time.perf_counter()
        for m in foreign.list():
            foreign.virtual_size(m)
        read_all = time.perf_counter() - t
        print(f"  virtual_size() of all, read once: {read_all * 1000:7.1f} ms")
        cached = foreign.list()
        assert all(m.vsize is not None for m in cached)
        print(f"  list(), foreign names, cached:    {best(foreign.list, rounds) * 1000:7.1f} ms")
        VIRTUAL_SIZES.clear()
        os.sync()
        print(f"  syscalls, geosmtp names: {syscalls(ours.path)}")
        print(f"  syscalls, foreign names: {syscalls(foreign.path)}")


if __name__ == "__main__":
    main()
