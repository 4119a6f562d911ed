"""How fast the POP3 message encoder (geosmtp/pop3/stuffing.py) streams a message.

    python bench/experiments/pop3_encoder.py [MEGABYTES] [ROUNDS]

Builds a message of about MEGABYTES (100 by default) in memory, as a Maildir file
holds it, in three kinds: LF line ends (what geosmtp stores), CRLF line ends
(what another program may have written), and LF with a lone CR in every
100th line (the slow path: the CRLFs are undone and redone). About one line
in 50 starts with a dot, so byte-stuffing has work to do. Each is fed to a
`MessageEncoder` in chunks of 16, 64 and 256 KiB, as the shell reads a file;
the best of ROUNDS (3) is reported in MB/s of stored message, by the wall
clock and by the process's CPU time (the steadier figure on a shared
machine), with TOP 10 of the same message for comparison (it stops after the
header and ten lines).
Pure CPU: no file or socket is involved, so this is the encoder's own cost.
"""

from __future__ import annotations

import random
import sys
import time

from geosmtp.pop3 import MessageEncoder, virtual_size


def build(megabytes: int, kind: str) -> bytes:
    """A message of about `megabytes` MB: a 1 MB block of text lines, repeated."""
    rng = random.Random(1939)
    words = [b"lorem", b"ipsum", b"dolor.", b"sit", b"amet,", b"mail", b"geosmtp", b"pop3"]
    lines = []
    size = 0
    while size < 1_000_000:
        line = b" ".join(rng.choice(words) for _ in range(rng.randrange(2, 14)))
        if len(lines) % 50 == 7:
            line = b"." + line
        if kind == "lone-cr" and len(lines) % 100 == 3:
            line = line + b"\rtail"
        lines.append(line)
        size += len(line) + 1
    end = b"\r\n" if kind == "crlf" else b"\n"
    header = end.join([b"From: a@example.test", b"Subject: big", b""]) + end
    return header + (end.join(lines) + end) * megabytes


def encode(message: bytes, chunk: int, lines: int | None = None) -> int:
    encoder = MessageEncoder(lines)
    sent = 0
    view = memoryview(message)
    for k in range(0, len(message), chunk):
        sent += len(encoder.feed(bytes(view[k : k + chunk])))
        if encoder.done:
            break
    return sent + len(encoder.end())


def best_of(rounds: int, func, *args) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The shortest wall-clock time and the shortest CPU time of `rounds` runs."""
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        func(*args)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def main() -> None:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(f"message {megabytes} MB, best of {rounds}; MB/s of stored message")
    print(f"{'kind':8} {'chunk':>7} {'RETR MB/s':>10} {'(CPU)':>7} {'TOP 10 ms':>10}")
    for kind in ("lf", "crlf", "lone-cr"):
        message = build(megabytes, kind)
        sent = encode(message, 65536)
        dots = sent - virtual_size(message) - 3
        if dots <= 0:  # every message here ends with a line end: no CRLF added
            raise SystemExit(f"{kind}: no stuffing happened ({sent} octets sent)")
        for chunk in (16384, 65536, 262144):
            seconds, cpu = best_of(rounds, encode, message, chunk)
            top, _ = best_of(rounds, encode, message, chunk, 10)
            mbps, cpu_mbps = len(message) / seconds / 1e6, len(message) / cpu / 1e6
            print(
                f"{kind:8} {chunk // 1024:>5}Ki {mbps:>10.0f} {cpu_mbps:>7.0f} {top * 1000:>10.3f}"
            )


if __name__ == "__main__":
    main()
