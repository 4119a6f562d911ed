"""Config values that would stop all mail, refused through the real entry points:
`geosmtp -c FILE --check-config` (and the start) and `PATCH /api/v1/config`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.integration.adminapi import admin_of, with_admin
from tests.integration.wire import Wire


def check_config(tmp_path: Path, text: str, *args: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return run_cli("-c", str(path), "--check-config", *args, cwd=tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "timeouts:\n  data_block: .nan\n",
            "timeouts.data_block: expected a finite number, got nan",
        ),
        ("timeouts:\n  command: .inf\n", "timeouts.command: expected a finite number, got inf"),
        ("timeouts:\n  data_total: -.inf\n", "timeouts.data_total: expected a finite number"),
        (
            "timeouts:\n  data_block: 1.0e+308\n",
            "timeouts.data_block: expected at most 86400, got 1e+308",
        ),
        ("tls:\n  handshake_timeout: .nan\n", "tls.handshake_timeout: expected a finite number"),
        ("auth:\n  failure_delay: .inf\n", "auth.failure_delay: expected a finite number, got inf"),
        (
            "max_clients: 12345678901234567890\n",
            "max_clients: expected at most 1000000, got 12345678901234567890",
        ),
        (
            "limits:\n  max_message_size: 1.0e+308\n",
            "limits.max_message_size: expected a positive integer, got 1e+308",
        ),
        (
            "limits:\n  text_line: 100000000000\n",
            "limits.text_line: expected at most 1048576, got 100000000000",
        ),
        ("log:\n  retention: 99999999\n", "log.retention: expected at most 10000"),
        (
            "domains: [a.example]\nfsync: true\ndomains: [b.example]\n",
            "invalid YAML at line 3, column 1: duplicate key 'domains' (first at line 1)",
        ),
        (
            "listeners:\n  - {address: 127.0.0.1, port: 2525}\n"
            "  - {address: 127.0.0.1, port: 2525}\n",
            "listeners[1]: same address and port as listeners[0] ([127.0.0.1]:2525)",
        ),
        (
            "listeners:\n  - {address: 0.0.0.0, port: 2525}\n"
            "  - {address: 127.0.0.1, port: 2525}\n",
            "listeners[1]: [127.0.0.1]:2525 cannot be bound beside listeners[0]",
        ),
        (
            "listeners: [{address: 127.0.0.1, port: 2525}]\n"
            "admin: {enabled: true, port: 2525, token: 0123456789abcdef}\n",
            "admin: same address and port as listeners[0] ([127.0.0.1]:2525)",
        ),
        ("domains: [bad domain]\n", "domains[0]: not a valid domain name: 'bad domain'"),
        ("domains: [ok.example, x..y]\n", "domains[1]: not a valid domain name: 'x..y'"),
        ('domains: ["a\\r\\nb.example"]\n', "domains[0]: not a valid domain name: 'a\\r\\nb"),
        ('hostname: "mx\\0.example"\n', "hostname: not a valid host name: 'mx\\x00.example'"),
        ("tls:\n  min_version: 1.4\n", "tls.min_version: expected one of 1.2, 1.3, got 1.4"),
    ],
    ids=lambda v: v.split("\n")[0][:40],
)
def test_check_config_refuses_with_one_line(tmp_path, text, message):
    result = check_config(tmp_path, text)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].isprintable(), result.stderr
    assert lines[0].startswith("geosmtp: ") and message in lines[0], lines[0]


def test_min_version_may_be_an_unquoted_number(tmp_path):
    for version in ("1.2", "1.3"):
        result = check_config(tmp_path, f"tls:\n  min_version: {version}\n")
        assert (result.returncode, result.stdout) == (0, "configuration ok\n"), result.stderr


def test_mail_dir_or_log_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    for key, text in (("mail_dir", "mail_dir: afile\n"), ("log.dir", "log:\n  dir: afile\n")):
        result = check_config(tmp_path, text)
        assert result.returncode == 2
        assert result.stderr == f"geosmtp: {key}: '{tmp_path / 'afile'}' is not a directory\n"
        start = run_cli(
            "-c", str(tmp_path / "config.yaml"), "-l", "127.0.0.1", "-p", "0", cwd=tmp_path
        )
        assert (start.returncode, start.stderr) == (2, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "config.yaml"]


# ------------------------------------------------------------------- PATCH


@pytest.fixture(scope="module")
def shared(make_module_server):
    server = make_module_server(with_admin())
    return server, admin_of(server)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"timeouts": {"data_block": NaN}}',
            "timeouts.data_block: expected a finite number, got nan",
        ),
        (
            b'{"timeouts": {"command": Infinity}}',
            "timeouts.command: expected a finite number, got inf",
        ),
        (
            b'{"timeouts": {"data_total": -Infinity}}',
            "timeouts.data_total: expected a finite number",
        ),
        (
            b'{"timeouts": {"data_block": 1e308}}',
            "timeouts.data_block: expected at most 86400, got 1e+308",
        ),
        (
            b'{"max_clients": 12345678901234567890}',
            "max_clients: expected at most 1000000, got 1234",
        ),
        (
            b'{"limits": {"max_errors": 1e400}}',
            "limits.max_errors: expected a positive integer, got inf",
        ),
        (
            b'{"auth": {"failure_delay": NaN}}',
            "auth.failure_delay: expected a finite number, got nan",
        ),
        (b'{"log": {"retention": 100000}}', "log.retention: expected at most 10000, got 100000"),
        (b'{"tls": {"min_version": 1.1}}', "tls.min_version: expected one of 1.2, 1.3, got 1.1"),
    ],
    ids=lambda v: v.decode()[:40] if isinstance(v, bytes) else None,
)
def test_patch_refuses_values_that_stop_mail(shared, raw, message):
    server, api = shared
    before = api.config()
    reply = api.request("PATCH", "/api/v1/config", raw=raw)
    assert reply.status == 400, reply.body
    assert reply.error.startswith(message), reply.error
    assert reply.error.isprintable(), reply.error
    assert api.config() == before
    with Wire.connect(server.host, server.port) as w:  # mail still flows
        w.expect("EHLO x.example", 250)
        w.expect("MAIL FROM:<a@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        w.expect("Subject: t\r\n\r\nhi\r\n.", 250)


def test_patch_min_version_as_a_number(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    result = api.ok("PATCH", "/api/v1/config", {"tls": {"min_version": 1.3}})
    assert result["changed"] == ["tls.min_version"]
    assert api.config()["tls"]["min_version"] == "1.3"
