"""The relay scenario's remote domain: an SMTP sink that stores no mail but
records, for each message it accepts with 250, its `X-Bench-Id` and the time.

    python bench/sink.py --port P --out ids.txt

One line per accepted message, `ID TIME` (TIME: `time.time()`, the load
generator's clock), written and flushed before the 250 goes out, so the file
is the sink's received list at every moment. asyncio, one protocol object per
connection, PIPELINING (Postfix's smtp client pipelines; smtplib does not),
no TLS, no AUTH. It answers anything sensible with 250 and keeps nothing else:
its cost per message is a header search and one short write.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

ID_HEADER = b"\r\nX-Bench-Id: "
EHLO = (
    b"250-sink.remote.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
)


class Sink(asyncio.Protocol):
    out = None  # the record file, shared

    def __init__(self) -> None:
        self.buf = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"220 sink.remote.test ESMTP bench sink\r\n")  # type: ignore[attr-defined]

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
                assert self.transport is not None
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                replies.append(b"250 2.0.0 Ok\r\n")
            else:
                replies.append(b"502 5.5.2 Not implemented\r\n")
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

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


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    Sink.out = open(args.out, "a", buffering=1 << 16)  # noqa: SIM115
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, args.host, args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    Sink.out.close()


if __name__ == "__main__":
    asyncio.run(main())
