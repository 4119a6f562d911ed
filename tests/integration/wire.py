"""A raw SMTP client over a plain socket, for the sequences smtplib will not send."""

from __future__ import annotations

import socket
import time


class Wire:
    """Send raw bytes, read whole (possibly multi-line) replies; every read is bounded."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buf = b""
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 10.0, greet: bool = True) -> Wire:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect((host, port))
        wire = cls(sock, timeout)
        if greet:
            code, text = wire.reply()
            assert code == 220, (code, text)
        return wire

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self, deadline: float) -> bytes:
        while b"\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete reply line; have {self.buf!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; have {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self, timeout: float | None = None) -> tuple[int, str]:
        """The next reply: (code, text of all lines joined by newlines)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        lines = []
        while True:
            line = self._line(deadline)
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def expect(self, line: str | bytes, code: int) -> str:
        got, text = self.cmd(line)
        assert got == code, f"{line[:200]!r}: expected {code}, got {got} {text}"
        return text

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within `timeout` (after any data)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.buf += chunk
