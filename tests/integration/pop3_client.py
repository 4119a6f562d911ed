"""Helpers for the POP3 tests: mail in over SMTP, a raw POP3 client, the decoding of RETR."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time

#: What every helper waits for a reply at most.
TIMEOUT = 10.0


def send_mail(port: int, to: str, body: bytes, sender: str = "sender@example.org") -> None:
    """One message into the server over SMTP (the mx listener), as a client would send it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.sendmail(sender, [to], body)


def stored_as_sent(raw: bytes) -> bytes:
    """The bytes POP3 must send for a stored file: LF not after CR becomes CRLF."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class POP3Wire:
    """A raw POP3 client: send lines, read `+OK`/`-ERR` lines and dot-ended lists."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(TIMEOUT)

    @classmethod
    def connect(
        cls, port: int, *, context: ssl.SSLContext | None = None, greet: bool = True
    ) -> POP3Wire:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        wire = cls(sock)
        if greet:
            assert wire.line().startswith(b"+OK")
        return wire

    def __enter__(self) -> POP3Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        deadline = time.monotonic() + TIMEOUT
        while b"\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete line; have {self.buf[-200:]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; have {self.buf[-200:]!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, text: str) -> bytes:
        """Send one command, return its status line."""
        self.send(text.encode() + b"\r\n")
        return self.line()

    def lines(self) -> list[bytes]:
        """The body of a multi-line reply, dot-unstuffed, up to the lone "."."""
        out = []
        while True:
            line = self.line()
            if line == b".":
                return out
            out.append(line[1:] if line.startswith(b".") else line)

    def multi(self, text: str) -> tuple[bytes, list[bytes]]:
        status = self.cmd(text)
        return status, (self.lines() if status.startswith(b"+OK") else [])

    def closed(self) -> bool:
        """Whether the server has closed the connection (after what is buffered)."""
        try:
            self.sock.settimeout(TIMEOUT)
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True
