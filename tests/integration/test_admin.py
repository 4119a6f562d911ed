"""The management API against the real server: token, config, reload, sessions, errors."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import smtplib
import socket
import time

import pytest
import yaml

from geosmtp import __version__
from geosmtp import config as cfg
from tests.conftest import (
    free_port,
    password_hash,
    run_cli,
    users,
    wait_until,
    write_config,
)
from tests.integration.adminapi import TOKEN, admin_of, ctl, with_admin
from tests.integration.wire import Wire

ENDPOINTS = [
    ("GET", "/metrics"),
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/config"),
    ("PATCH", "/api/v1/config"),
    ("POST", "/api/v1/reload"),
    ("GET", "/api/v1/sessions"),
    ("GET", "/api/v1/runtime"),
    ("DELETE", "/api/v1/sessions/1"),
    ("GET", "/api/v1/nope"),
]


@pytest.fixture(scope="module")
def shared(make_module_server):
    """One server for the tests that change nothing."""
    server = make_module_server(with_admin({"users": users(alice="secret pw", bob=None)}))
    return server, admin_of(server)


def test_every_request_needs_the_token(shared):
    server, api = shared
    before = api.config()
    for method, path in ENDPOINTS:
        for token in (None, "x" * 32, TOKEN[:-1], TOKEN + "x", ""):
            reply = api.request(method, path, {"max_clients": 1}, token=token)
            assert reply.status == 401, (method, path, token, reply.body)
            assert reply.headers["www-authenticate"] == "Bearer"
            assert reply.error == "missing or wrong bearer token"
        basic = api.request(method, path, headers={"Authorization": f"Basic {TOKEN}"}, token=None)
        assert basic.status == 401, (method, path)
    # Nothing those requests asked for happened.
    assert api.config() == before
    assert api.request("GET", "/api/v1/stats").status == 200
    server.logged("admin API listening")


def test_the_admin_listeners_own_log_goes_to_the_server_log(shared):
    """gevent's WSGI server logs requests and bad input; those lines reach log.txt."""
    server, api = shared
    port = api.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert api.request("GET", "/api/v1/stats").status == 200
    # Two connections, maybe two workers: each one's lines come in their own time.
    log = wait_until(
        lambda: (
            (text := server.server_log())
            and "GET /api/v1/stats" in text
            and "Invalid HTTP method" in text
            and text
        ),
        what="the admin request and the bad one in the server log",
    )
    assert "WARNING admin: " in log
    assert "NOT HTTP AT ALL" in log


def test_stats_snapshot(shared):
    _, api = shared
    stats = api.stats()
    assert stats["version"] == __version__
    assert stats["uptime_seconds"] > 0
    assert set(stats["connections"]) == {"current", "total", "refused"}
    assert set(stats["messages"]) == {"accepted", "rejected", "recipients"}
    assert set(stats["bytes"]) == {"received", "sent"}
    assert "geosmtp_connections_total" in stats["metrics"]
    later = api.stats()
    assert later["uptime_seconds"] >= stats["uptime_seconds"]


def test_runtime_counts_what_sessions_hold_and_give_back(shared):
    """Each worker's greenlets, descriptors and memory: up while clients are
    connected, back where they were once they leave (what a leak would break)."""
    server, api = shared

    def totals() -> dict:
        workers = api.get("/api/v1/runtime")["workers"]
        assert workers and all(w["rss_bytes"] > 0 for w in workers), workers
        return {k: sum(w[k] for w in workers) for k in ("greenlets", "descriptors", "sessions")}

    # An idle worker's greenlet count moves by one now and then (a timer's
    # greenlet of the queue or the connection cache comes and goes), so the
    # idle level is a range seen over a few readings, not one reading.
    # The server is ready once one worker answers; the others may still be
    # starting, and a baseline taken without them would be half the total.
    count = cfg.load(server.config_path).worker_count
    wait_until(
        lambda: len(api.get("/api/v1/runtime")["workers"]) == count,
        what=f"all {count} workers in the runtime",
    )
    wait_until(lambda: totals()["sessions"] == 0, what="no sessions")
    idle = [totals() for _ in range(5)]
    low = min(t["greenlets"] for t in idle)
    high = max(t["greenlets"] for t in idle)
    before = idle[-1]
    clients = [Wire.connect(server.host, server.port) for _ in range(6)]
    try:
        for w in clients:
            w.expect("EHLO client.example", 250)
        held = wait_until(lambda: (t := totals())["sessions"] == 6 and t, what="6 sessions")
        assert held["greenlets"] >= low + 6, (idle, held)
        assert held["descriptors"] >= before["descriptors"] + 6, (before, held)
    finally:
        for w in clients:
            w.close()
    wait_until(
        lambda: (
            (t := totals())["sessions"] == 0
            and t["descriptors"] == before["descriptors"]
            and t["greenlets"] <= high
        ),
        what=f"the counts back to {before} (greenlets at most {high})",
    )
    shown = ctl(server, "runtime")
    assert shown.returncode == 0 and "GREENLETS" in shown.stdout, shown


def test_config_never_shows_secrets(shared):
    server, api = shared
    reply = api.request("GET", "/api/v1/config")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    text = reply.body.decode()
    written = yaml.safe_load(server.config_path.read_text())
    alice_hash = written["users"]["alice"]["password"]
    assert alice_hash.startswith("$argon2")
    assert alice_hash not in text and "$argon2" not in text
    assert TOKEN not in text
    config = reply.json
    assert config["admin"]["token"] == "<redacted>"
    assert config["users"]["alice"]["password"] == "<redacted>"
    assert config["users"]["bob"]["password"] is None  # nothing to hide: shown as unset
    # The rest is the effective configuration, defaults included.
    assert config["hostname"] == written["hostname"]
    assert config["listeners"][0]["port"] == server.port
    assert config["limits"]["max_recipients"] == 100
    assert config["mail_dir"] == str(server.mail_dir)


def test_token_file_is_made_and_never_shown(make_server):
    server = make_server({"admin": {"enabled": True, "port": free_port(), "token_file": "tok"}})
    path = server.root / "tok"
    wait_until(path.exists, what="token file")
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32
    api = admin_of(server, token=token)
    config = api.config()
    assert config["admin"]["token"] is None
    assert config["admin"]["token_file"] == str(path)
    reply = api.request("GET", "/api/v1/config")
    assert token not in reply.body.decode()
    assert api.request("GET", "/api/v1/stats", token=TOKEN).status == 401


def test_non_loopback_admin_without_token_does_not_start(tmp_path):
    port = free_port()
    path = write_config(tmp_path, {"admin": {"enabled": True, "address": "0.0.0.0"}}, port=port)
    result = run_cli("-c", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("geosmtp: admin.token:"), result.stderr
    assert "token_file" in result.stderr
    assert not (tmp_path / "mail_dir").exists()


def test_token_file_that_cannot_be_made_stops_the_start(tmp_path):
    path = write_config(
        tmp_path, {"admin": {"enabled": True, "port": free_port(), "token_file": "no/such/tok"}}
    )
    result = run_cli("-c", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(
        f"geosmtp: admin.token_file: cannot create '{tmp_path / 'no/such/tok'}': "
        "No such file or directory"
    ), result.stderr


# ------------------------------------------------------------ PATCH /config


def test_patch_changes_live_settings(make_server):
    server = make_server(with_admin({"log": {"dir": "logs", "level": "INFO"}}))
    api = admin_of(server)
    with Wire.connect(server.host, server.port) as held:
        assert "CHUNKING" in held.expect("EHLO held.example", 250)
        patch = {
            "max_clients": 50,
            "limits": {"max_recipients": 2, "max_errors": 5},
            "timeouts": {"data_block": 60},
            "log": {"level": "DEBUG"},
            "extensions": {"chunking": False},
        }
        result = api.ok("PATCH", "/api/v1/config", patch)
        assert result["changed"] == [
            "extensions.chunking",
            "limits.max_errors",
            "limits.max_recipients",
            "log.level",
            "max_clients",
            "timeouts.data_block",
        ]
        assert result["config"]["limits"]["max_recipients"] == 2
        assert result["config"]["admin"]["token"] == "<redacted>"
        # The open session was not dropped, and keeps the settings it started with.
        assert "CHUNKING" in held.expect("EHLO again.example", 250)
        held.expect("MAIL FROM:<a@remote.example>", 250)
        for i in range(3):
            held.expect(f"RCPT TO:<u{i}@test.example>", 250)
        held.expect("QUIT", 221)
    config = api.config()
    assert config["max_clients"] == 50 and config["log"]["level"] == "DEBUG"
    assert config["extensions"]["chunking"] is False
    # A new session gets the new settings.
    with Wire.connect(server.host, server.port) as w:
        assert "CHUNKING" not in w.expect("EHLO new.example", 250)
        (session,) = [s for s in api.sessions() if s["helo"] == "new.example"]
        w.expect("MAIL FROM:<a@remote.example>", 250)
        w.expect("RCPT TO:<u0@test.example>", 250)
        w.expect("RCPT TO:<u1@test.example>", 250)
        w.expect("RCPT TO:<u2@test.example>", 452)
    # Log level DEBUG (was INFO): session detail now reaches the log.
    wait_until(
        lambda: f"session {session['id']} connect from" in server.server_log(), what="debug line"
    )
    server.logged("configuration changed: extensions.chunking")
    # The same PATCH again changes nothing.
    assert api.ok("PATCH", "/api/v1/config", patch)["changed"] == []


def test_patch_max_clients_applies_to_the_next_connection(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    api.quiet()  # the start-up probe's session is over
    with Wire.connect(server.host, server.port) as held:
        held.expect("EHLO held.example", 250)
        assert api.ok("PATCH", "/api/v1/config", {"max_clients": 1})["changed"] == ["max_clients"]
        with Wire.connect(server.host, server.port, greet=False) as extra:
            code, text = extra.reply()
            assert code == 421 and text.startswith("4.7.0"), text
            assert extra.is_closed()
        held.expect("NOOP", 250)  # the open one is still served
        api.ok("PATCH", "/api/v1/config", {"max_clients": 2})
        with Wire.connect(server.host, server.port) as second:
            second.expect("QUIT", 221)
        held.expect("QUIT", 221)
    assert api.stats()["connections"]["refused"] == 1


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"listeners": [{"address": "127.0.0.1", "port": 1}]}, "listeners"),
        ({"mail_dir": "/tmp/elsewhere"}, "mail_dir"),
        ({"hostname": "other.example"}, "hostname"),
        ({"fsync": False}, "fsync"),
        ({"log": {"dir": "/tmp/elsewhere"}}, "log.dir"),
        ({"admin": {"port": 1}}, "admin.port"),
        ({"admin": {"token": "y" * 32}}, "admin.token"),
        ({"admin": {"enabled": False}}, "admin.enabled"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_patch_refuses_restart_only_keys(shared, patch, key):
    _, api = shared
    before = api.config()
    reply = api.request("PATCH", "/api/v1/config", {"max_clients": 7, **patch})
    assert reply.status == 400, reply.body
    assert reply.error == f"{key}: cannot change while running; restart geosmtp"
    assert api.config() == before  # all or nothing: max_clients did not change either


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b'{"max_clients": ', 400, "invalid JSON: Expecting value"),
        (b"\xff\xfe{", 400, "invalid JSON"),
        (b"[1, 2]", 400, "the body must be a JSON object"),
        (b"", 400, "the body must be a JSON object"),
        (b'"max_clients"', 400, "the body must be a JSON object"),
        (b'{"bogus": 1}', 400, "bogus: unknown key"),
        (b'{"limits": {"max_recipient": 3}}', 400, "limits.max_recipient: unknown key"),
        (b'{"max_clients": "10"}', 400, "max_clients: expected a positive integer, got '10'"),
        (b'{"max_clients": 0}', 400, "max_clients: expected a positive integer, got 0"),
        (b'{"max_clients": true}', 400, "max_clients: expected a positive integer, got True"),
        (b'{"max_clients": 1.5}', 400, "max_clients: expected a positive integer, got 1.5"),
        (b'{"limits": 5}', 400, "limits: expected a mapping, got 5"),
        (b'{"log": {"level": "LOUD"}}', 400, "log.level: expected one of TRACE"),
        (b'{"extensions": {"chunking": "no"}}', 400, "extensions.chunking: expected true or"),
        (b'{"timeouts": {"command": -1}}', 400, "timeouts.command: expected a positive number"),
        (b'{"users": {"x": {"password": "plain"}}}', 400, "users.x.password: expected a passw"),
        (b"x" * (64 * 1024 + 1), 413, "the body may be at most 65536 octets"),
        # Nesting: the parser recursed until Python's limit (a 500 once).
        (b"[" * 60000, 400, "invalid JSON: nested deeper than 32 levels"),
        (b'{"a": ' * 2000 + b"1" + b"}" * 2000, 400, "invalid JSON: nested deeper than 32"),
        (b'{"limits": ' + b"[" * 33 + b"]" * 33 + b"}", 400, "invalid JSON: nested deeper"),
    ],
    ids=lambda v: v.decode(errors="replace")[:30] if isinstance(v, bytes) else None,
)
def test_patch_bad_requests(shared, raw, status, message):
    _, api = shared
    before = api.config()
    reply = api.request("PATCH", "/api/v1/config", raw=raw)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert reply.error.startswith(message), reply.error
    assert api.config() == before


# Keys that name programs, modules, files or accounts change only through the
# file and a reload: PATCH refuses them (403) before it reads, runs or imports
# anything they name, and all or nothing (max_clients does not change either).
REFUSED = "not changeable through the API"
RELOAD = "change it in the config file and reload"


def _refused(api, path: str, patch: dict, key: str) -> None:
    before = api.config()
    reply = api.request("PATCH", path, patch)
    assert reply.status == 403, reply.body
    assert reply.error.startswith(f"{key}: {REFUSED}"), reply.error
    assert reply.error.endswith(RELOAD), reply.error
    assert api.config() == before


def test_patch_cannot_add_a_program(shared):
    """The finding: a filter with `/bin/sh -c` ran for the next message."""
    server, api = shared
    marker = server.root / "pwned"
    shell = {"name": "sh", "command": ["/bin/sh", "-c", f"touch {marker}; cat"]}
    _refused(api, "/api/v1/config", {"max_clients": 7, "filters": [shell]}, "filters")
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO x.example", 250)
        w.expect("MAIL FROM:<a@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        w.expect("Subject: t\r\n\r\nhi\r\n.", 250)
    assert not marker.exists()
    assert api.get("/api/v1/filters")["count"] == 0


def test_patch_cannot_add_a_module(shared):
    _, api = shared
    stage = {"name": "py", "call": "os:getcwd"}
    _refused(api, "/api/v1/config", {"filters": [stage]}, "filters")


def test_patch_cannot_change_a_stages_program_or_callable(make_server):
    server = make_server(
        with_admin({"filters": [{"name": "cat", "command": ["cat"], "mail": "local"}]})
    )
    api = admin_of(server)
    shell = ["/bin/sh", "-c", "id"]
    _refused(api, "/api/v1/filters/cat", {"command": shell}, "filters[0].command")
    _refused(api, "/api/v1/filters/cat", {"call": "os:getcwd"}, "filters[0].call")
    running = api.config()["filters"][0]
    _refused(
        api, "/api/v1/config", {"filters": [{**running, "command": shell}]}, "filters[0].command"
    )
    # A second stage, or one moved or renamed: the list itself.
    second = {**running, "name": "dog"}
    _refused(api, "/api/v1/config", {"filters": [running, second]}, "filters")
    _refused(api, "/api/v1/config", {"filters": []}, "filters")
    # A stage's runtime-safe keys still change, through either endpoint.
    changed = api.ok("PATCH", "/api/v1/filters/cat", {"timeout": 30, "enabled": False})
    assert changed["changed"] == ["enabled", "timeout"]
    stage = api.config()["filters"][0]
    result = api.ok("PATCH", "/api/v1/config", {"filters": [{**stage, "on_failure": "pass"}]})
    assert result["changed"] == ["filters"]
    assert api.get("/api/v1/filters/cat")["on_failure"] == "pass"


def test_patch_cannot_point_at_a_file(shared, certs):
    """Each of these was taken before (the file read as the server, or as root)."""
    server, api = shared
    users_file = server.root / "more-users.yaml"
    users_file.write_text(yaml.safe_dump({"users": {"mallory": {}}}))
    for patch, key in [
        (
            {"auth_checks": {"public_suffix_list": "/etc/hostname"}},
            "auth_checks.public_suffix_list",
        ),
        ({"auth": {"users_file": str(users_file)}}, "auth.users_file"),
        ({"tls": certs.tls_config}, "tls.cert, tls.key"),
        (
            {"dkim": {"domains": {"test.example": {"selector": "s", "key_file": str(certs.key)}}}},
            "dkim.domains.test.example",
        ),
    ]:
        _refused(api, "/api/v1/config", patch, key)


def test_patch_cannot_give_accounts_or_relay(shared):
    _, api = shared
    mallory = {"mallory": {"password": password_hash("pw")}}
    _refused(api, "/api/v1/config", {"users": mallory}, "users.mallory")
    alice = {"alice": {"password": password_hash("pw")}}
    _refused(api, "/api/v1/config", {"users": alice}, "users.alice.password")
    # A user with no password is still an account (a mailbox under
    # unknown_recipients: reject); null was once taken for "no change".
    patch = {"unknown_recipients": "reject", "users": {"eve": None}}
    _refused(api, "/api/v1/config", patch, "users.eve")
    assert "eve" not in api.config()["users"]
    _refused(api, "/api/v1/config", {"trusted_networks": ["127.0.0.0/8"]}, "trusted_networks")
    _refused(api, "/api/v1/config", {"postmaster": "bob"}, "postmaster")
    _refused(api, "/api/v1/config", {"domains": ["test.example", "victim.example"]}, "domains")
    # The account the server runs as needs a restart (as before).
    for patch, key in (({"user": "nobody"}, "user"), ({"group": "nogroup"}, "group")):
        reply = api.request("PATCH", "/api/v1/config", patch)
        assert (reply.status, reply.error) == (
            400,
            f"{key}: cannot change while running; restart geosmtp",
        )


def test_patch_runtime_safe_keys_still_change(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    patch = {
        "vrfy": True,
        "unknown_recipients": "reject",
        "auth": {"max_failures": 3},
        "auth_checks": {"max_signatures": 2},
        "tls": {"handshake_timeout": 5},
        "filter_concurrency": 4,
        "client_limits": {"max_connections": 7},
        "stress": {"command_timeout": 5},
    }
    result = api.ok("PATCH", "/api/v1/config", patch)
    assert result["changed"] == [
        "auth.max_failures",
        "auth_checks.max_signatures",
        "client_limits.max_connections",
        "filter_concurrency",
        "stress.command_timeout",
        "tls.handshake_timeout",
        "unknown_recipients",
        "vrfy",
    ]
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO x.example", 250)
        w.expect("VRFY alice", 250)


def test_patch_validation_is_the_loaders(shared, tmp_path):
    """The API's message for a bad value is the one `geosmtp -c` gives for it in the file."""
    _, api = shared
    bad = {"limits": {"command_line": 100}}
    with pytest.raises(cfg.ConfigError) as at_load:
        cfg.from_mapping(bad, tmp_path)
    reply = api.request("PATCH", "/api/v1/config", bad)
    assert reply.status == 400
    assert (
        reply.error == str(at_load.value) == "limits.command_line: expected at least 512, got 100"
    )


# ----------------------------------------------------------- HTTP errors


def test_unknown_paths_and_methods(shared):
    _, api = shared
    reply = api.request("GET", "/api/v2/stats")
    assert reply.status == 404 and reply.error == "no such endpoint: /api/v2/stats"
    assert api.request("GET", "/").status == 404
    assert api.request("GET", "/api/v1/sessions/zz").status == 404
    cases = [
        ("POST", "/api/v1/stats", "GET, HEAD"),
        ("DELETE", "/api/v1/config", "GET, HEAD, PATCH"),
        ("GET", "/api/v1/reload", "POST"),
        ("PUT", "/api/v1/sessions", "GET, HEAD"),
        ("GET", "/api/v1/sessions/1A", "DELETE"),
        ("POST", "/metrics", "GET, HEAD"),
    ]
    for method, path, allowed in cases:
        reply = api.request(method, path)
        assert reply.status == 405, (method, path, reply.body)
        assert reply.headers["allow"] == allowed
        assert reply.error == f"{method} {path}: use {allowed}"
    reply = api.request("DELETE", "/api/v1/sessions/FFFFFF")
    assert reply.status == 404 and reply.error == "no open session FFFFFF"


# ------------------------------------------------------------ reload / SIGHUP


def _rewrite(server, **changes) -> dict:
    data = yaml.safe_load(server.config_path.read_text())
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            data.setdefault(section, {})[sub] = value
        else:
            data[key] = value
    server.config_path.write_text(yaml.safe_dump(data))
    return data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("domains: [\n", "invalid YAML"),
        ("limits:\n  max_recipients: many\n", "limits.max_recipients: expected a positive integer"),
        ("limits:\n  max_recipent: 3\n", "limits.max_recipent: unknown key"),
        ("admin:\n  enabled: true\n", "admin.token: the admin listener needs a token"),
    ],
    ids=["yaml", "type", "unknown", "admin"],
)
def test_reload_with_a_broken_file_changes_nothing(make_server, text, message):
    server = make_server(with_admin())
    api = admin_of(server)
    before = api.config()
    good = server.config_path.read_text()
    server.config_path.write_text(text)
    reply = api.request("POST", "/api/v1/reload")
    assert reply.status == 400, reply.body
    assert message in reply.error
    assert api.config() == before
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.noop()[0] == 250
    # Fixed, it reloads.
    server.config_path.write_text(good)
    assert api.ok("POST", "/api/v1/reload") == {
        "reloaded": True,
        "changed": [],
        "restart_needed": [],
    }


def test_reload_applies_the_rest_and_reports_restart_needed(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    new_port = free_port()
    _rewrite(
        server,
        max_clients=3,
        limits__max_recipients=7,
        listeners=[{"address": "127.0.0.1", "port": new_port}],
        fsync=False,
    )
    result = api.ok("POST", "/api/v1/reload")
    assert result["reloaded"] is True
    assert result["changed"] == ["limits.max_recipients", "max_clients"]
    assert result["restart_needed"] == ["fsync", "listeners"]
    config = api.config()
    assert config["max_clients"] == 3 and config["limits"]["max_recipients"] == 7
    assert config["listeners"][0]["port"] == server.port and config["fsync"] is True
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.noop()[0] == 250
    # Reloading the same file again reports the same (nothing more changes).
    again = api.ok("POST", "/api/v1/reload")
    assert again["changed"] == [] and again["restart_needed"] == ["fsync", "listeners"]


def test_sighup_with_a_broken_file_keeps_the_server_running(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    before = api.config()
    server.config_path.write_text("limits:\n  max_recipients: many\n")
    server.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            "reload refused, configuration unchanged: limits.max_recipients" in server.server_log()
        ),
        what="refusal in the log",
    )
    assert server.process.poll() is None
    assert api.config() == before
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.noop()[0] == 250


def test_sighup_applies_a_valid_change(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    before = set(server.workers())
    _rewrite(server, limits__max_recipients=2, max_clients=9)
    server.process.send_signal(signal.SIGHUP)
    server.old_workers_gone(before)  # then every answer is the new config's
    config = api.config()
    assert config["limits"]["max_recipients"] == 2
    assert config["max_clients"] == 9
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO x.example", 250)
        w.expect("MAIL FROM:<a@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("RCPT TO:<bob@test.example>", 250)
        w.expect("RCPT TO:<carol@test.example>", 452)
    wait_until(lambda: f"reloaded {server.config_path}" in server.server_log(), what="log")
    server.logged("configuration changed: limits.max_recipients, max_clients")


# ---------------------------------------------------------------- sessions


def test_sessions_list_and_kick(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    api.quiet()
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO lister.example", 250)
        w.expect("MAIL FROM:<a@remote.example>", 250)
        (info,) = api.sessions()
        assert info["peer"] == "127.0.0.1"
        assert info["port"] == w.sock.getsockname()[1]
        assert info["listener"] == f"mx:[127.0.0.1]:{server.port}"
        assert info["state"] == "mail"
        assert 0 <= info["age_seconds"] < 30
        assert info["user"] is None and info["tls"] is False
        assert info["helo"] == "lister.example"
        assert info["bytes_in"] == len(b"EHLO lister.example\r\nMAIL FROM:<a@remote.example>\r\n")
        assert info["bytes_out"] > 0
        assert json.dumps(info)  # plain JSON data
        listing = api.get("/api/v1/sessions")
        assert listing["count"] == 1

        assert api.ok("DELETE", f"/api/v1/sessions/{info['id']}") == {"closed": info["id"]}
        code, text = w.reply()
        assert code == 421 and text == "4.7.0 Connection closed by the administrator"
        assert w.is_closed()
    wait_until(lambda: api.sessions() == [], what="session gone")
    reply = api.request("DELETE", f"/api/v1/sessions/{info['id']}")
    assert reply.status == 404 and reply.error == f"no open session {info['id']}"
    server.logged(f"admin closed session {info['id']} ([127.0.0.1])")


def test_admin_port_in_use_stops_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, {"admin": {"enabled": True, "port": port, "token": TOKEN}})
        result = run_cli("-c", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"geosmtp: cannot listen on [127.0.0.1]:{port}: Address already in use"
    )


def test_reload_keeps_the_command_line_overrides(make_server, tmp_path):
    """Started with -p and -d, a reload of the unchanged file changes nothing."""
    port = free_port()
    server = make_server(
        with_admin({"listeners": [{"address": "127.0.0.1", "port": port}]}),
        extra_args=["-p", str(port), "-d", str(tmp_path / "elsewhere")],
    )
    reply = admin_of(server).ok("POST", "/api/v1/reload")
    assert reply["restart_needed"] == []
    assert reply["changed"] == []


# ------------------------------------------------------------ the read token

READ_TOKEN = "read-token-0123456789abcdefghij"
READS = [
    "/metrics",
    "/api/v1/stats",
    "/api/v1/config",
    "/api/v1/sessions",
    "/api/v1/queue",
    "/api/v1/filters",
]
WRITES = [
    ("PATCH", "/api/v1/config", {"max_clients": 7}),
    ("POST", "/api/v1/reload", None),
    ("DELETE", "/api/v1/sessions/1A", None),
    ("POST", "/api/v1/queue/flush", None),
    ("POST", "/api/v1/queue/X/hold", None),
    ("DELETE", "/api/v1/queue/X", None),
    ("PATCH", "/api/v1/filters/cat", {"enabled": False}),
]


def test_the_read_token_may_only_read(make_server):
    """Prometheus gets the read token: /metrics and the GET endpoints, nothing else."""
    server = make_server(
        with_admin({"filters": [{"name": "cat", "command": ["cat"]}]}, read_token=READ_TOKEN)
    )
    api = admin_of(server)
    before = api.config()
    assert before["admin"]["read_token"] == "<redacted>"
    assert READ_TOKEN not in api.request("GET", "/api/v1/config").body.decode()
    for path in [*READS, "/api/v1/filters/cat"]:
        for token in (READ_TOKEN, TOKEN):  # the write token reads too
            reply = api.request("GET", path, token=token)
            assert reply.status == 200, (path, token, reply.body)
    for method, path, body in WRITES:
        reply = api.request(method, path, body, token=READ_TOKEN)
        assert reply.status == 403, (method, path, reply.body)
        assert reply.error == (
            f"{method} {path}: the read-only token may only GET; this needs the admin (write) token"
        )
    assert api.config() == before  # nothing those asked for happened
    assert api.request("POST", "/api/v1/reload", token=READ_TOKEN[:-1]).status == 401
    assert api.ok("PATCH", "/api/v1/config", {"max_clients": 7})["changed"] == ["max_clients"]


def test_the_read_token_file_is_made_and_the_two_must_differ(make_server, tmp_path):
    server = make_server(with_admin(read_token_file="read.tok"))
    path = server.root / "read.tok"
    wait_until(path.exists, what="read token file")
    assert path.stat().st_mode & 0o777 == 0o600
    read = path.read_text().strip()
    assert len(read) >= 32 and read != TOKEN
    api = admin_of(server)
    assert api.request("GET", "/metrics", token=read).status == 200
    assert api.request("POST", "/api/v1/reload", token=read).status == 403
    server.logged("admin read token written to")
    # The same secret in both files: the read token would write; refused at the start.
    (tmp_path / "w.tok").write_text("same-token-0123456789abcdefghij\n")
    (tmp_path / "r.tok").write_text("same-token-0123456789abcdefghij\n")
    admin = {"enabled": True, "port": free_port(), "token_file": "w.tok"}
    config = write_config(tmp_path, {"admin": {**admin, "read_token_file": "r.tok"}})
    result = run_cli("-c", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(
        "geosmtp: admin.read_token_file: holds the write token; the two must differ"
    ), result.stderr


def test_ctl_reads_with_the_read_token_when_it_has_only_that(make_server):
    server = make_server(
        {
            "admin": {
                "enabled": True,
                "port": free_port(),
                "token_file": "tok",
                "read_token": READ_TOKEN,
            }
        }
    )
    admin_of(server, token=READ_TOKEN)
    (server.root / "tok").unlink()  # as for a user who may not read the write token
    stats = ctl(server, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["version"] == __version__
    reload = ctl(server, "reload")
    assert (reload.returncode, reload.stdout) == (1, "")
    assert reload.stderr == (
        "geosmtp ctl: 403: POST /api/v1/reload: the read-only token may only GET; "
        "this needs the admin (write) token\n"
    )


# ------------------------------------------------------- the listener's limits


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection."""
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


def _raw_patch(port: int, fields: bytes, body: bytes) -> bytes:
    """A `PATCH /api/v1/config` with the write token, `fields` (CRLF-ended
    header lines) and `body` as they are; all the server sends until it closes."""
    with _raw(port) as sock:
        sock.sendall(
            b"PATCH /api/v1/config HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + fields
            + b"\r\n"
            + body
        )
        return _until_closed(sock)


def test_idle_and_half_sent_connections_are_closed(make_server):
    server = make_server(with_admin(idle_timeout=0.3, request_timeout=0.3))
    api = admin_of(server)
    port = api.port
    with _raw(port) as idle:  # a new connection that sends nothing
        assert _until_closed(idle) == b""
    with _raw(port) as half:  # headers that never end
        half.sendall(b"GET /api/v1/stats HTTP/1.1\r\nHost: x\r\n")
        assert _until_closed(half).startswith(b"HTTP/1.1 400 ")
    with _raw(port) as slow:  # a request line that never ends
        slow.sendall(b"GET /api/v1/st")
        assert _until_closed(slow).startswith(b"HTTP/1.1 400 ")
    # A kept-alive connection, idle after its request.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("Connection") != "close"
    reply.read()
    assert conn.sock.recv(1) == b""  # closed by the server
    conn.close()
    log = wait_until(
        lambda: "request headers not in after 0.3 s" in (t := server.server_log()) and t
    )
    assert "WARNING admin: " in log


def test_a_short_body_is_400_once_the_request_times_out(make_server):
    server = make_server(with_admin(request_timeout=0.3))
    api = admin_of(server)
    before = api.config()
    fields = b"Content-Type: application/json\r\nContent-Length: 100\r\n"
    answer = _raw_patch(api.port, fields, b'{"max_cli')
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"Connection: close" in head
    assert json.loads(body)["error"] == (
        "the body is shorter than its Content-Length (100 octets): "
        "the body did not arrive within 0.3 s"
    )
    assert api.config() == before


def test_a_body_without_content_length_is_411(shared):
    """A chunked body (Transfer-Encoding, no Content-Length) is refused, not
    read: once it was taken as an empty body (400 'must be a JSON object')."""
    _, api = shared
    before = api.config()
    body = json.dumps({"max_clients": 7}).encode()
    fields = b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    answer = _raw_patch(api.port, fields, f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 "), answer
    assert b"Connection: close" in head
    assert json.loads(text)["error"] == (
        "a request body needs a Content-Length (no Transfer-Encoding)"
    )
    assert api.config() == before


def _one_reply(answer: bytes) -> tuple[bytes, bytes]:
    """The head and body of the only reply in `answer` (nothing after its body)."""
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))[15:]
    )
    assert rest[length:] == b"", answer  # a second reply: the rest was taken as a request
    return head, rest[:length]


@pytest.mark.parametrize(
    "fields, body, error",
    [
        # Two lengths: the first was used, and the rest of the body (`{"vrfy":true}`,
        # a JSON body here) was parsed as the next request on the connection.
        (b"Content-Length: 2\r\nContent-Length: 14\r\n", b'{}{"vrfy":true}', "2 Content-Length"),
        (b"Content-Length: 2\r\ncontent-length: 2\r\n", b"{}", "2 Content-Length headers"),
        (b"Content-Length: +2\r\n", b"{}", "Content-Length is not a number of octets: '+2'"),
        (b"Content-Length: 1_4\r\n", b'{"vrfy": true}', "Content-Length is not a number of "),
        (b"Content-Length: 2, 2\r\n", b"{}", "Content-Length is not a number of octets: '2, 2'"),
        (b"Content-Length: -1\r\n", b"{}", "Content-Length is not a number of octets: '-1'"),
        # Header lines that hide the fields after them, or fold a field's value.
        (b"Content-Length : 2\r\n", b"{}", "a header line that is not a header field"),
        (b"From x\r\nContent-Length: 2\r\n", b"{}", "a header line that is not a header field"),
        (b"Content-Length: 2\r\nFrom x\r\n", b"{}", "a header line that is not a header field"),
        (b": x\r\nContent-Length: 2\r\n", b"{}", "a header line that is not a header field"),
        (b"X-Note: a\r\nContent-Length: 2\r\n 14\r\n", b"{}", "a header field folded over"),
        (b"X-Note: a\r\n b\r\nContent-Length: 2\r\n", b"{}", "a header field folded over"),
    ],
    ids=lambda v: v.decode()[:24] if isinstance(v, bytes) else None,
)
def test_a_request_whose_framing_is_in_doubt_is_400_and_closed(shared, fields, body, error):
    """RFC 9112 §6.3: several Content-Length values, one that is not digits, a
    malformed or folded header line: 400 and close, and nothing after the
    header section is read as a request."""
    _, api = shared
    before = api.config()
    head, text = _one_reply(
        _raw_patch(api.port, b"Content-Type: application/json\r\n" + fields, body)
    )
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"Connection: close" in head
    assert json.loads(text)["error"].startswith(error)
    assert api.config() == before


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 0002\r\n",  # leading zeros
        b"Content-Length:\t 2 \r\n",  # white space around the value
        b"Content-Type: multipart/mixed\r\nContent-Length: 2\r\n",  # no parts: no matter
    ],
    ids=lambda v: v.decode()[:24],
)
def test_a_request_whose_framing_is_fine_is_served(shared, fields):
    _, api = shared
    head, text = _one_reply(_raw_patch(api.port, b"Connection: close\r\n" + fields, b"{}"))
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(text)["changed"] == []


def test_a_request_line_dribbled_past_the_request_timeout_is_400(make_server):
    """A byte now and then does not keep a request line open past
    request_timeout: 400 and close, and one WARNING line (once: a plain end of
    stream and no line)."""
    server = make_server(with_admin(idle_timeout=5, request_timeout=0.5))
    port = admin_of(server).port
    line = b"GET /api/v1/stats HTTP/1.1"
    with _raw(port) as sock, selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        for i in range(len(line)):  # at most 27 bytes: 5.4 s, past the 0.5 s timeout
            if sel.select(0.2):
                break  # the server answered (or closed)
            sock.sendall(line[i : i + 1])
        answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"\r\nConnection: close\r\n" in answer
    log = wait_until(lambda: "request line not in after 0.5 s" in (t := server.server_log()) and t)
    assert "WARNING admin: " in log
    assert log.count("request line not in after") == 1


def test_head_is_served_wherever_get_is(make_server):
    """HEAD: GET's status and headers with no body, for the read token too (it
    was 403); the reply's end is where the next one begins."""
    server = make_server(with_admin(read_token=READ_TOKEN))
    api = admin_of(server)
    get = api.request("GET", "/api/v1/config", token=READ_TOKEN)
    assert get.status == 200
    for token in (READ_TOKEN, TOKEN):
        for path, status in [("/api/v1/config", 200), ("/metrics", 200), ("/api/v1/reload", 405)]:
            with _raw(api.port) as sock:
                sock.sendall(
                    f"HEAD {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
                    "GET /api/v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
                answer = _until_closed(sock)
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), (path, answer)
            assert rest.startswith(b"HTTP/1.1 401 "), (path, answer)  # no body in between
            if path == "/api/v1/config":
                assert f"Content-Length: {len(get.body)}".encode() in head
            if status == 405:
                assert b"Allow: POST\r\n" in head


def test_a_flood_of_idle_connections_holds_no_descriptors_the_mail_needs(make_server):
    """150 idle or half-sent connections (bounded: the admin backlog is 128
    beyond the cap): the worker holds at most the cap of them, mail is still
    answered, all are closed after the timeout, and a new client is served."""
    cap = 20
    server = make_server(
        with_admin({"workers": 1}, max_connections=cap, idle_timeout=1, request_timeout=1)
    )
    api = admin_of(server)
    api.quiet()
    fds = f"/proc/{server.worker}/fd"
    baseline = len(os.listdir(fds))
    flood = []
    try:
        for i in range(150):
            sock = _raw(api.port)
            if i % 2:
                sock.sendall(b"GET /api/v1/stats HTTP/1.1\r\nHost: x\r\n")
            flood.append(sock)
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            assert client.noop()[0] == 250  # the 220 came meanwhile
        most = 0
        open_ = set(flood)
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as sel:
            for sock in flood:
                sel.register(sock, selectors.EVENT_READ)
            while open_ and time.monotonic() < deadline:
                most = max(most, len(os.listdir(fds)))
                for key, _ in sel.select(timeout=0.05):
                    try:
                        data = key.fileobj.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        open_.discard(key.fileobj)
        assert not open_, f"{len(open_)} admin connections still open"
        assert most <= baseline + cap + 5, (baseline, most)
    finally:
        for sock in flood:
            sock.close()
    assert api.stats()["connections"]["current"] == 0  # a fresh client is served
