"""`geosmtp ctl` and the API report every failure on one line: a port that does not speak
HTTP, a server's multi-line message, a reload of a file that is not YAML."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import wait_until
from tests.integration.adminapi import TOKEN, admin_of, ctl, with_admin


@contextmanager
def fake_server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback TCP server that runs `answer` on each connection; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    answer(conn)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def smtp_banner(conn: socket.socket) -> None:
    conn.sendall(b"220 mx.example ESMTP\r\n")
    conn.recv(4096)  # the HTTP request, then close


def close_at_once(conn: socket.socket) -> None:
    pass


def binary_noise(conn: socket.socket) -> None:
    conn.sendall(b"\x00\xff\x16\x03\x01\r\n\r\n")


def http_reply(status: str, body: bytes, kind: str = "application/json"):
    def answer(conn: socket.socket) -> None:
        conn.recv(65536)
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    return answer


def assert_one_line_error(result, *starts: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert lines[0].isprintable(), lines[0]
    assert lines[0].startswith(starts), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "answer", [smtp_banner, close_at_once, binary_noise], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("command", [["stats"], ["reload"], ["config", "get"]], ids=" ".join)
def test_ctl_against_a_port_that_is_not_http(answer, command):
    with fake_server(answer) as port:
        url = f"http://127.0.0.1:{port}"
        result = ctl("/nonexistent.yaml", "--url", url, "--token", TOKEN, *command)
    assert_one_line_error(result, f"geosmtp ctl: cannot reach the admin API at {url}: ")


def test_ctl_against_an_smtp_listener(shared_server):
    server = shared_server
    url = f"http://127.0.0.1:{server.port}"
    result = ctl("/nonexistent.yaml", "--url", url, "--token", TOKEN, "stats")
    line = assert_one_line_error(result, f"geosmtp ctl: cannot reach the admin API at {url}: ")
    assert "not an HTTP reply" in line


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (
            "400 Bad Request",
            b'{"error": "first line\\nsecond line"}',
            "application/json",
            "geosmtp ctl: 400: first line second line",
        ),
        (
            "500 Internal Server Error",
            b"<html>\r\n<b>oops</b>\r\n</html>",
            "text/html",
            "geosmtp ctl: 500: Internal Server Error",
        ),
        (
            "200 OK",
            b"{not json",
            "application/json",
            "geosmtp ctl: the admin API at http://127.0.0.1:",
        ),
        (
            "200 OK",
            b'["not", "an object"]',
            "application/json",
            "geosmtp ctl: the admin API at http://127.0.0.1:",
        ),
    ],
    ids=["multi-line error", "html 500", "bad json", "wrong shape"],
)
def test_ctl_prints_any_server_error_on_one_line(status, body, kind, message):
    with fake_server(http_reply(status, body, kind)) as port:
        url = f"http://127.0.0.1:{port}"
        result = ctl("/nonexistent.yaml", "--url", url, "--token", TOKEN, "stats")
    assert_one_line_error(result, message)


# ------------------------------------------------- reload of invalid YAML


def test_reload_of_invalid_yaml_is_one_line_everywhere(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    before = api.config()
    server.config_path.write_text("domains: [a.example\nlimits:\n  max_errors: 5\n")
    path = server.config_path
    expected = f"{path}: invalid YAML at line 2, column 7: "

    reply = api.request("POST", "/api/v1/reload")
    assert reply.status == 400
    assert "\n" not in reply.error and reply.error.startswith(expected), reply.error

    url = f"http://127.0.0.1:{api.port}"
    result = ctl("/nonexistent.yaml", "--url", url, "--token", TOKEN, "reload")
    assert_one_line_error(result, f"geosmtp ctl: 400: {expected}")

    # Without --url and --token, ctl reads the same broken file: one line, exit 2.
    own = ctl(server, "reload")
    assert own.returncode == 2 and "Traceback" not in own.stderr
    assert own.stderr.splitlines() == [f"geosmtp ctl: {reply.error}"]

    # The server log has each refusal on a line of its own.
    def refusals() -> list[str]:
        return [line for line in server.server_log().splitlines() if "reload refused" in line]

    wait_until(lambda: len(refusals()) == 2, what="both refusals logged")
    for line in refusals():
        assert line.endswith(f"reload refused, configuration unchanged: {reply.error}"), line
    assert api.config() == before
