"""What an idle connection costs a bare gevent server, for comparison with geosmtp.

    python bench/experiments/idle_floor.py [N] [greenlet|watcher]

Starts a minimal `gevent.server.StreamServer` whose handler sends a greeting,
reads one line, answers it, and then waits in `recv` under a `gevent.Timeout`
(what geosmtp's session loop does between commands); opens N client
connections from a second process; prints the server's Rss/Pss growth per
connection. That is the floor that any gevent-per-connection design pays;
whatever geosmtp uses above it is its own per-session state.

`watcher` mode parks each connection as a bare libev io watcher (no greenlet
while it is idle; the callback answers): what a greenlet costs by itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

SERVER = r"""
import gevent, sys, resource
from gevent.server import StreamServer
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
MODE = sys.argv[1]
parked = {}
def on_readable(sock, watcher):
    # No greenlet while idle: a libev io watcher wakes the connection up.
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return
    if not data:
        watcher.stop()
        parked.pop(sock.fileno(), None)
        sock.close()
        return
    if b"\n" in data:
        sock.send(b"250 ok\r\n")
def park(sock, addr):
    import socket as std
    sock = std.socket(fileno=sock.detach())  # the server closes its own object on return
    sock.setblocking(False)
    sock.send(b"220 hi\r\n")
    w = gevent.get_hub().loop.io(sock.fileno(), 1)
    w.start(on_readable, sock, w)
    parked[sock.fileno()] = (sock, w)
def handle(sock, addr):
    if MODE == "watcher":
        return park(sock, addr)
    sock.sendall(b"220 hi\r\n")
    buf = bytearray()
    while True:
        with gevent.Timeout(300):
            data = sock.recv(65536)
        if not data:
            return
        buf += data
        if b"\n" in buf:
            del buf[:]
            sock.sendall(b"250 ok\r\n")
s = StreamServer(("127.0.0.1", 0), handle, backlog=1024)
s.start()
print(s.address[1], flush=True)
gevent.wait()
"""


def mem(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss"):
                out[k] = int(v.split()[0])
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    mode = sys.argv[2] if len(sys.argv) > 2 else "greenlet"
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    srv = subprocess.Popen([sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE)
    try:
        port = int(srv.stdout.readline())  # type: ignore[union-attr]
        warm = socket.create_connection(("127.0.0.1", port))
        warm.recv(100)
        warm.sendall(b"EHLO x\r\n")
        warm.recv(100)
        time.sleep(0.5)
        before = mem(srv.pid)
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.recv(100)
            s.sendall(b"EHLO x\r\n")
            s.recv(100)
            socks.append(s)
        time.sleep(1.0)
        after = mem(srv.pid)
        for k in ("Rss", "Pss"):
            per = (after[k] - before[k]) / n
            print(f"bare gevent server ({mode}), {n} idle connections: {k} {per:.1f} KB each")
        for s in socks:
            s.close()
    finally:
        srv.kill()
        srv.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
