"""What one RETR costs a client that waits for each reply, as a mail program does.

    python bench/experiments/pop3_retr_latency.py [MESSAGES]

Starts the bench's geosmtp (fsync on, a POP3 listener), stores MESSAGES (10)
messages of 2-50 KB for one user over SMTP, then logs in twice with a raw
socket and times each `RETR` to its final dot: once as a plain client, once
with `TCP_QUICKACK` set before every read (the client ACKs at once instead
of delaying the ACK). Before geosmtp set `TCP_NODELAY` on POP3 connections
the plain client waited 40+ ms a RETR (Nagle's algorithm on the server
held the reply's last write back until the client's delayed ACK), the
quick-ACK one under a millisecond (issue 19, found by the soak).
"""

from __future__ import annotations

import smtplib
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import mailboxes, messages
from bench.servers import HOST, Geosmtp, free_port

USER = "p0000"


def session(port: int, count: int, quick_ack: bool) -> list[float]:
    """Milliseconds of each RETR, one after another."""
    sock = socket.create_connection((HOST, port), timeout=30)
    buf = b""

    def until(end: bytes) -> bytes:
        nonlocal buf
        while end not in buf:
            if quick_ack:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buf += data
        at = buf.index(end) + len(end)
        out, buf = buf[:at], buf[at:]
        return out

    until(b"\r\n")
    for command in (f"USER {USER}", f"PASS {mailboxes.password(USER)}"):
        sock.sendall(command.encode() + b"\r\n")
        if not until(b"\r\n").startswith(b"+OK"):
            raise RuntimeError(f"{command.split()[0]} refused")
    times = []
    for i in range(1, count + 1):
        t0 = time.perf_counter()
        sock.sendall(b"RETR %d\r\n" % i)
        until(b"\r\n.\r\n")
        times.append(1000 * (time.perf_counter() - t0))
    sock.sendall(b"QUIT\r\n")
    until(b"\r\n")
    sock.close()
    return times


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    server = Geosmtp(fsync=True)
    server.pop3_port = free_port()
    server.pop3_users = mailboxes.hashes(1, "cheap", say=print)
    server.start()
    try:
        with smtplib.SMTP(HOST, server.port, timeout=30) as client:
            for n in range(count):
                msg = messages.build("retr-latency", n, mailboxes.size(n), (USER,))
                client.sendmail(messages.SENDER, [f"{USER}@{messages.DOMAIN}"], msg.wire())
        for quick in (False, True):
            ms = session(server.pop3_port, count, quick)
            label = "TCP_QUICKACK client" if quick else "plain client       "
            print(
                f"{label} RETR ms: median {statistics.median(ms):.1f}, "
                f"max {max(ms):.1f}  ({', '.join(f'{x:.1f}' for x in ms)})"
            )
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    main()
