"""The relay scenario's remote domain: an SMTP sink that stores no mail but
records, for each message it accepts with 250, its `X-Bench-Id` and the time.

    python bench/sink.py --port P --out ids.txt [--delay SECONDS] [--stats stats.json]

One line per accepted message, `ID TIME` (TIME: `time.time()`, the load
generator's clock), written and flushed before the 250 goes out, so the file
is the sink's received list at every moment. asyncio, one protocol object per
connection, PIPELINING (Postfix's smtp client pipelines; smtplib does not),
no TLS, no AUTH. It answers anything sensible with 250 and keeps nothing else:
its cost per message is a header search and one short write.

`--delay`: a next hop that far away. Every reply, the greeting and EHLO's
included, goes out that many seconds after the sink had it ready; replies
stay in order, and the sink goes on reading and serving every other
connection meanwhile (a round trip of that length, not a slow server). The
replies to a pipelined group leave together, as they would over a long
link.

`--stats`: at exit (SIGTERM), a JSON object: connections opened, messages,
and how many connections carried 0, 1, 2... messages (`per_connection`),
which is how a client's connection reuse shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter, deque
from typing import ClassVar

ID_HEADER = b"\r\nX-Bench-Id: "
EHLO = (
    b"250-sink.remote.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
)


class Sink(asyncio.Protocol):
    out = None  # the record file, shared
    delay = 0.0  # seconds every reply waits before it goes out
    connections = 0  # opened, all connections
    #: Messages a closed connection carried -> how many connections carried that many.
    per_connection: ClassVar[Counter[int]] = Counter()
    live: ClassVar[set[Sink]] = set()  # the open connections

    def __init__(self) -> None:
        self.buf = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.transport: asyncio.Transport | None = None
        self.messages = 0
        self.pending: deque[tuple[float, bytes | None]] = deque()  # (due, reply); None: close
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        Sink.connections += 1
        Sink.live.add(self)
        self.send(b"220 sink.remote.test ESMTP bench sink\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed()

    def closed(self) -> None:
        """Count this connection's messages once (when it ends, or at exit)."""
        if self in Sink.live:
            Sink.live.discard(self)
            Sink.per_connection[self.messages] += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def send(self, data: bytes | None) -> None:
        """Write `data` now, or `delay` seconds from now (None: close the connection)."""
        assert self.transport is not None
        if self.delay <= 0:
            if data is None:
                self.transport.close()
            else:
                self.transport.write(data)
            return
        loop = asyncio.get_running_loop()
        self.pending.append((loop.time() + self.delay, data))
        if self.timer is None:
            self.timer = loop.call_at(self.pending[0][0], self.flush)

    def flush(self) -> None:
        """Write every reply that is due, in order; wait for the next one."""
        self.timer = None
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.pending and self.pending[0][0] <= now:
            _due, data = self.pending.popleft()
            if data is None:
                self.pending.clear()
                self.transport.close()
                return
            self.transport.write(data)
        if self.pending:
            self.timer = loop.call_at(self.pending[0][0], self.flush)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        replies: list[bytes] = []
        while True:
            if self.in_data:
                # The message ends at CRLF.CRLF; DATA's own CRLF precedes its first line.
                end = self.buf.find(b"\r\n.\r\n", self.scan_from)
                if end < 0:
                    self.scan_from = max(0, len(self.buf) - 4)
                    break
                self.record(bytes(self.buf[: end + 2]))
                self.messages += 1
                del self.buf[: end + 5]
                self.in_data = False
                self.scan_from = 0
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self.buf[:nl]).rstrip(b"\r")
            del self.buf[: nl + 1]
            verb = line[:4].upper()
            if verb == b"DATA":
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                # Keep the CRLF before the first line, so ".\r\n" at once ends an empty one.
                self.buf[:0] = b"\r\n"
                self.scan_from = 0
            elif verb == b"EHLO":
                replies.append(EHLO)
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.send(b"".join(replies))
                self.send(None)
                self.buf.clear()
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                replies.append(b"250 2.0.0 Ok\r\n")
            else:
                replies.append(b"502 5.5.2 Not implemented\r\n")
        if replies and self.transport is not None:
            self.send(b"".join(replies))

    def record(self, message: bytes) -> None:
        i = message.find(ID_HEADER)
        if i < 0:
            ident = "-"
        else:
            start = i + len(ID_HEADER)
            ident = message[start : message.find(b"\r\n", start)].decode(errors="replace")
        assert self.out is not None
        self.out.write(f"{ident} {time.time():.6f}\n")
        self.out.flush()


def stats() -> dict:
    """Connections and messages so far (the connections still open counted as they are)."""
    for conn in list(Sink.live):
        conn.closed()
    per = dict(sorted(Sink.per_connection.items()))
    return {
        "connections": Sink.connections,
        "messages": sum(n * k for n, k in per.items()),
        "per_connection": {str(n): k for n, k in per.items()},
    }


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before every reply")
    p.add_argument("--stats", help="write connection and message counts here at exit (JSON)")
    args = p.parse_args()
    Sink.out = open(args.out, "a", buffering=1 << 16)  # noqa: SIM115
    Sink.delay = args.delay
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, args.host, args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats(), f)
    Sink.out.close()


if __name__ == "__main__":
    asyncio.run(main())
