"""A reload must not break a running listener: the effective config (the file's values,
with the restart-only keys at their running values) passes the start's whole-config
check, or the reload is refused, logged at ERROR, and nothing changes."""

from __future__ import annotations

import signal
import socket
import ssl

import yaml

from tests.conftest import listeners, wait_until
from tests.integration.adminapi import TOKEN, admin_of, ctl, with_admin
from tests.integration.wire import Wire

REFUSAL = (
    "reload refused, configuration unchanged: "
    "listeners[1].role: submissions needs tls.cert and tls.key (or tls.self_signed) "
    "(keeping the running listeners, which need a restart to change)"
)


def _tls_greeting(port: int) -> str:
    """Handshake on the implicit-TLS listener and read the greeting."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the self-signed certificate
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw) as tls:
        w = Wire(tls)
        code, text = w.reply()
        w.expect("QUIT", 221)
    return f"{code} {text}"


def _turn_tls_off(server) -> None:
    """A file valid on its own: TLS off, and no submissions listener (restart-only)."""
    data = yaml.safe_load(server.config_path.read_text())
    data["tls"]["self_signed"] = False
    data["listeners"] = [li for li in data["listeners"] if li["role"] != "submissions"]
    data["max_clients"] = 7  # a change that would be applied with it
    server.config_path.write_text(yaml.safe_dump(data))


def _log_lines(server, text: str) -> list[str]:
    return [line for line in server.server_log().splitlines() if text in line]


def test_reload_that_would_leave_submissions_without_tls_is_refused(make_server):
    server = make_server(
        with_admin(
            {"listeners": listeners("mx", "submissions"), "tls": {"self_signed": True}},
        )
    )
    api = admin_of(server)
    port = server.ports["submissions"]
    assert _tls_greeting(port).startswith("220 ")
    before = api.config()
    _turn_tls_off(server)

    # SIGHUP: the refusal is in the log, at ERROR, on one line.
    server.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: _log_lines(server, "reload refused") or _log_lines(server, "reloaded"),
        what="the reload's outcome in the log",
    )
    (line,) = _log_lines(server, "reload refused")
    assert " ERROR " in line and line.endswith(REFUSAL), line
    assert _log_lines(server, "reloaded") == []
    assert api.config() == before
    assert _tls_greeting(port).startswith("220 ")  # still a TLS listener

    # POST /api/v1/reload: 400 with the same message, logged too.
    reply = api.request("POST", "/api/v1/reload")
    assert reply.status == 400, reply.body
    assert reply.error == REFUSAL.split(": ", 1)[1]
    wait_until(lambda: len(_log_lines(server, "reload refused")) == 2, what="second refusal")
    assert api.config() == before

    # geosmtp ctl reload says it on one line, exit 1.
    url = f"http://127.0.0.1:{api.port}"
    result = ctl("/nonexistent.yaml", "--url", url, "--token", TOKEN, "reload")
    assert result.returncode == 1
    assert result.stderr == f"geosmtp ctl: 400: {REFUSAL.split(': ', 1)[1]}\n"
    assert api.config() == before
    assert _tls_greeting(port).startswith("220 ")
    with Wire.connect("127.0.0.1", server.ports["mx"]) as w:
        assert "STARTTLS" in w.expect("EHLO x.example", 250)  # the TLS context was kept


def test_patch_turning_tls_off_under_submissions_is_refused(make_server):
    server = make_server(
        with_admin({"listeners": listeners("submissions"), "tls": {"self_signed": True}})
    )
    api = admin_of(server)
    before = api.config()
    reply = api.request("PATCH", "/api/v1/config", {"tls": {"self_signed": False}})
    assert reply.status == 400
    assert reply.error == (
        "listeners[0].role: submissions needs tls.cert and tls.key (or tls.self_signed)"
    )
    assert api.config() == before
    assert _tls_greeting(server.ports["submissions"]).startswith("220 ")
