"""`geosmtp ctl` against the real server, as an operator runs it."""

from __future__ import annotations

import json
import smtplib

import pytest
import yaml

from tests.conftest import free_port, wait_until, write_config
from tests.integration.adminapi import TOKEN, admin_of, ctl, with_admin
from tests.integration.wire import Wire


@pytest.fixture(scope="module")
def shared(make_module_server):
    server = make_module_server(with_admin())
    return server, admin_of(server)


def test_stats(shared):
    server, api = shared
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("a@remote.example", ["alice@test.example"], b"Subject: ctl\r\n\r\nhi\r\n")
    stats = api.stats()
    result = ctl(server, "stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("geosmtp ") and " up " in lines[0]
    accepted = stats["messages"]["accepted"]
    assert accepted >= 1
    assert f"accepted {accepted:>6}" in result.stdout
    assert "commands" in result.stdout and "MAIL" in result.stdout
    raw = ctl(server, "stats", "--json")
    assert raw.returncode == 0
    data = json.loads(raw.stdout)
    assert data["messages"]["accepted"] >= accepted
    assert "geosmtp_messages_accepted_total" in data["metrics"]


def test_stats_watch(shared):
    server, _ = shared
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO watched.example", 250)
        result = ctl(server, "stats", "--watch", "--count", "2", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    screens = result.stdout.split("geosmtp ")[1:]
    assert len(screens) == 2, result.stdout
    assert "rates" not in screens[0]  # a rate needs two samples
    assert "msgs/s" in screens[1]
    for screen in screens:  # the open session is listed, with its state
        assert "127.0.0.1:" in screen and "greeted" in screen


def test_config_get(shared):
    server, _ = shared
    result = ctl(server, "config", "get", "limits.max_recipients")
    assert (result.returncode, result.stdout) == (0, "100\n")
    section = ctl(server, "config", "get", "limits")
    assert yaml.safe_load(section.stdout)["max_recipients"] == 100
    whole = ctl(server, "config", "get")
    assert whole.returncode == 0
    assert yaml.safe_load(whole.stdout)["admin"]["token"] == "<redacted>"
    assert TOKEN not in whole.stdout
    token = ctl(server, "config", "get", "admin.token")
    assert token.stdout == '"<redacted>"\n'
    missing = ctl(server, "config", "get", "limits.nope")
    assert missing.returncode == 1
    assert missing.stderr == "geosmtp ctl: limits.nope: no such key\n"


def test_config_set_max_recipients(make_server):
    server = make_server(with_admin())
    admin_of(server)
    result = ctl(server, "config", "set", "limits.max_recipients", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "changed: limits.max_recipients\n"
    assert ctl(server, "config", "set", "limits.max_recipients", "3").stdout == "unchanged\n"
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO x.example", 250)
        w.expect("MAIL FROM:<a@remote.example>", 250)
        for i in range(3):
            w.expect(f"RCPT TO:<u{i}@test.example>", 250)
        code, text = w.cmd("RCPT TO:<u3@test.example>")
        assert code == 452 and text.startswith("4.5.3"), text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("listeners", "[{address: 127.0.0.1, port: 1}]", "listeners: cannot change while running"),
        ("admin.port", "1", "admin.port: cannot change while running"),
        ("limits.max_recipients", "many", "limits.max_recipients: expected a positive integer"),
    ],
    ids=["listeners", "admin.port", "type"],
)
def test_config_set_refused(shared, key, value, message):
    server, api = shared
    before = api.config()
    result = ctl(server, "config", "set", key, value)
    assert result.returncode == 1
    assert result.stderr.startswith(f"geosmtp ctl: 400: {message}"), result.stderr
    assert result.stdout == ""
    assert api.config() == before


def test_config_set_usage(shared):
    server, _ = shared
    result = ctl(server, "config", "set", "max_clients")
    assert result.returncode == 2
    assert "usage: geosmtp ctl config set KEY VALUE" in result.stderr


def test_config_set_timeout_applies_to_an_open_session(make_server):
    server = make_server(with_admin())
    admin_of(server)
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO open.example", 250)
        result = ctl(server, "config", "set", "timeouts.command", "1")
        assert (result.returncode, result.stdout) == (0, "changed: timeouts.command\n")
        w.expect("NOOP", 250)  # not dropped
        code, text = w.reply(timeout=10)  # and now idle for longer than the new timeout
        assert code == 421 and text.startswith("4.4.2"), text
        assert w.is_closed()


def test_sessions_kick_and_reload(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    api.quiet()  # the start-up probe's session is over
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO kickme.example", 250)
        (info,) = api.sessions()
        listing = ctl(server, "sessions")
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert lines[0].split()[:3] == ["ID", "PEER", "LISTENER"]
        assert lines[-1] == "1 open"
        row = lines[1].split()
        assert row[:4] == [info["id"], f"127.0.0.1:{info['port']}", info["listener"], "greeted"]
        as_json = json.loads(ctl(server, "sessions", "--json").stdout)
        assert as_json["count"] == 1 and as_json["sessions"][0]["id"] == info["id"]

        kick = ctl(server, "kick", info["id"])
        assert (kick.returncode, kick.stdout) == (0, f"session {info['id']} closed\n")
        code, text = w.reply()
        assert code == 421 and "closed by the administrator" in text
        assert w.is_closed()
    wait_until(lambda: api.sessions() == [], what="session gone")
    again = ctl(server, "kick", info["id"])
    assert again.returncode == 1
    assert again.stderr == f"geosmtp ctl: 404: no open session {info['id']}\n"

    data = yaml.safe_load(server.config_path.read_text())
    data["max_clients"] = 4
    server.config_path.write_text(yaml.safe_dump(data))
    before = server.workers()
    reload = ctl(server, "reload")
    assert (reload.returncode, reload.stdout) == (0, "reloaded; changed: max_clients\n")
    server.old_workers_gone(before)  # an old one may answer until its SIGTERM is handled
    assert api.config()["max_clients"] == 4
    data["listeners"][0]["port"] = free_port()
    server.config_path.write_text(yaml.safe_dump(data))
    reload = ctl(server, "reload")
    assert reload.returncode == 0
    assert reload.stdout.splitlines() == [
        "reloaded; changed: nothing",
        "needs a restart to take effect: listeners",
    ]
    server.config_path.write_text("limits: [\n")
    broken = ctl(server, "reload")
    assert broken.returncode == 2  # ctl reads the same file first
    assert broken.stderr.startswith(f"geosmtp ctl: {server.config_path}: invalid YAML")
    # Given the address and token, it needs no file, and shows the server's refusal.
    url = f"http://127.0.0.1:{api.port}"
    broken = ctl("/nonexistent.yaml", "--url", url, "--token", TOKEN, "reload")
    assert broken.returncode == 1
    assert broken.stderr.startswith(f"geosmtp ctl: 400: {server.config_path}: invalid YAML")
    assert api.config()["max_clients"] == 4


def test_wrong_token(shared, tmp_path):
    server, _ = shared
    data = yaml.safe_load(server.config_path.read_text())
    data["admin"]["token"] = "not-the-right-token-0123456789ab"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    for result in (ctl(other, "stats"), ctl(server, "--token", "z" * 32, "sessions")):
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == "geosmtp ctl: the server refused the token (401 Unauthorized)\n"


def test_server_down(tmp_path):
    port = free_port()
    path = write_config(
        tmp_path, {"admin": {"enabled": True, "port": port, "token": TOKEN}}, port=free_port()
    )
    for args in (["stats", "--watch", "--count", "2"], ["kick", "1"]):
        result = ctl(path, *args)
        assert result.returncode == 1, args
        assert result.stdout == ""
        assert result.stderr.startswith(
            f"geosmtp ctl: cannot reach the admin API at http://127.0.0.1:{port}: "
        ), result.stderr
        assert "is geosmtp running" in result.stderr


def test_admin_disabled_or_tokenless_config(tmp_path):
    path = write_config(tmp_path, {})
    result = ctl(path, "stats")
    assert result.returncode == 2
    assert result.stderr.startswith("geosmtp ctl: admin.token:"), result.stderr


def test_token_file(make_server):
    server = make_server({"admin": {"enabled": True, "port": free_port(), "token_file": "tok"}})
    admin_of(server)
    wait_until((server.root / "tok").exists, what="token file")
    result = ctl(server, "config", "get", "admin.token_file")
    assert result.returncode == 0, result.stderr
    assert result.stdout == json.dumps(str(server.root / "tok")) + "\n"
    (server.root / "tok").write_text("a-different-token-0123456789abcd\n")
    refused = ctl(server, "stats")
    assert refused.returncode == 1 and "refused the token" in refused.stderr
