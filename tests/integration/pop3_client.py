"""Helpers for the POP3 tests: mail in over SMTP, a raw POP3 client, the decoding of RETR."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time

from tests.integration.wire import Wire

#: What every helper waits for a reply at most.
TIMEOUT = 10.0


def send_mail(port: int, to: str, body: bytes, sender: str = "sender@example.org") -> None:
    """One message into the server over SMTP (the mx listener), as a client would send it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.sendmail(sender, [to], body)


def stored_as_sent(raw: bytes) -> bytes:
    """The bytes POP3 must send for a stored file: LF not after CR becomes CRLF."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class POP3Wire(Wire):
    """A raw POP3 client: send lines, read `+OK`/`-ERR` lines and dot-ended lists
    (the SMTP test client's socket handling, POP3's replies)."""

    @classmethod
    def connect(  # type: ignore[override]
        cls, port: int, *, context: ssl.SSLContext | None = None, greet: bool = True
    ) -> POP3Wire:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        wire = cls(sock, TIMEOUT)
        if greet:
            assert wire.line().startswith(b"+OK")
        return wire

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        return self._line(time.monotonic() + TIMEOUT)

    def cmd(self, text: str) -> bytes:  # type: ignore[override]
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
