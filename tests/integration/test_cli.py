"""The `geosmtp` command: exit codes, one-line config errors, overrides."""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest

from geosmtp import __version__
from tests.conftest import _port_open, free_port, run_cli, start_server, wait_until


def _config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "limits:\n  max_message_size: ten\n",
            "limits.max_message_size: expected a positive integer, got 'ten'",
        ),
        ("limits:\n  max_mesage_size: 10\n", "limits.max_mesage_size: unknown key"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("fsync: 'yes'\n", "fsync: expected true or false, got 'yes'"),
        ("limits: [1, 2]\n", "limits: expected a mapping, got [1, 2]"),
        ("domains: test.example\n", "domains: expected a list, got 'test.example'"),
        (
            "listeners:\n  - address: 999.1.1.1\n    port: 25\n",
            "listeners[0].address: not an IP address: '999.1.1.1'",
        ),
        (
            "listeners:\n  - address: localhost\n    port: 25\n",
            "listeners[0].address: not an IP address: 'localhost'",
        ),
        ("listeners:\n  - port: 70000\n", "listeners[0].port: expected at most 65535, got 70000"),
        ("limits:\n  command_line: 100\n", "limits.command_line: expected at least 512, got 100"),
        ("unknown_recipients: maybe\n", "unknown_recipients: expected one of accept, reject"),
        ("log:\n  level: LOUD\n", "log.level: expected one of TRACE"),
        ("users:\n  ../root: {}\n", "users.../root: not a valid mailbox name"),
        ("listeners: []\n", "listeners: at least one listener is needed"),
        ("domains: [\n", "invalid YAML"),
        ("domains: [a, b\nhostname: x\n", "line 2"),
    ],
    ids=lambda v: v.split(":")[0] if ":" in v else v,
)
def test_config_error_exits_2_with_one_line(tmp_path, text, message):
    path = _config(tmp_path, text)
    result = run_cli("-c", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("geosmtp: ")
    assert message in lines[0]
    # Nothing was started: no mail or log folders appeared.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_missing_config_file(tmp_path):
    result = run_cli("-c", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "nope.yaml: cannot read" in result.stderr


def test_check_config_good_file(tmp_path):
    path = _config(tmp_path, "domains: [test.example]\nmax_clients: 5\n")
    result = run_cli("-c", str(path), "--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert not (tmp_path / "logs").exists()


REPO = Path(__file__).resolve().parents[2]


def test_check_config_of_the_shipped_config_yaml(tmp_path):
    result = run_cli("-c", str(REPO / "config.yaml"), "--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "configuration ok\n"


def test_check_config_of_the_production_example(tmp_path, certs):
    example = REPO / "examples" / "config.production.yaml"
    text = example.read_text()
    # As shipped, only its certificate is missing on this machine ...
    result = run_cli("-c", str(example), "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "geosmtp: tls.cert: no such file: '/etc/letsencrypt/live/mail.example.org/fullchain.pem'\n"
    )
    # ... and with a real one in its place, the rest of it is valid.
    for shipped, ours in (
        ("/etc/letsencrypt/live/mail.example.org/fullchain.pem", certs.cert),
        ("/etc/letsencrypt/live/mail.example.org/privkey.pem", certs.key),
    ):
        assert text.count(shipped) == 1
        text = text.replace(shipped, str(ours))
    path = _config(tmp_path, text)
    result = run_cli("-c", str(path), "--check-config", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "configuration ok\n", "")


def test_check_config_applies_command_line_overrides(tmp_path):
    path = _config(tmp_path, "{}\n")
    result = run_cli("-c", str(path), "-l", "not-an-ip", "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "geosmtp: listeners[0].address: not an IP address: 'not-an-ip'"
    result = run_cli("-c", str(path), "-p", "70000", "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "-p" in result.stderr


def test_version(tmp_path):
    result = run_cli("-v", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"geosmtp {__version__}"


def test_help(tmp_path):
    result = run_cli("-h", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("-c", "-l", "-p", "-d", "--check-config"):
        assert option in result.stdout


def test_unknown_option_is_a_usage_error(tmp_path):
    result = run_cli("--no-such-option", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_port_in_use_exits_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = _config(tmp_path, "log:\n  dir: logs\n")
        result = run_cli("-c", str(path), "-l", "127.0.0.1", "-p", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on [127.0.0.1]:{port}" in result.stderr


def test_listen_port_and_mail_dir_overrides(tmp_path):
    port = free_port()
    elsewhere = tmp_path / "elsewhere"
    server = start_server(
        tmp_path / "srv",
        extra_args=["-l", "127.0.0.1", "-p", str(port), "-d", str(elsewhere)],
        wait=False,
    )
    try:
        assert server.port != port  # the config names another port; -p wins
        wait_until(lambda: server.process.poll() is not None or _port_open("127.0.0.1", port))
        assert server.process.poll() is None, server.stderr()
        assert not _port_open("127.0.0.1", server.port)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("carol@remote.example", ["alice@test.example"], b"\r\noverride\r\n")
        (path,) = (elsewhere / "alice" / "new").iterdir()
        assert path.read_bytes().endswith(b"\n\noverride\n")
        assert server.all_messages() == []  # nothing in the configured mail_dir
        assert server.stop() == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


def test_port_override_alone_moves_every_listener(tmp_path):
    port = free_port()
    server = start_server(tmp_path / "srv", extra_args=["-p", str(port)], wait=False)
    try:
        wait_until(lambda: server.process.poll() is not None or _port_open("127.0.0.1", port))
        assert server.process.poll() is None, server.stderr()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.ehlo()[0] == 250
        assert server.stop() == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


def test_unusable_log_dir_exits_2_naming_it(tmp_path):
    (tmp_path / "afile").write_text("")
    path = _config(tmp_path, "log:\n  dir: afile/logs\n")
    result = run_cli("-c", str(path), "-l", "127.0.0.1", "-p", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"geosmtp: log.dir: cannot create '{tmp_path / 'afile' / 'logs'}': Not a directory\n"
    )


def test_unusable_mail_dir_exits_1_naming_it(tmp_path):
    (tmp_path / "afile").write_text("")
    path = _config(tmp_path, "mail_dir: afile/mail\n")
    result = run_cli("-c", str(path), "-l", "127.0.0.1", "-p", "0", cwd=tmp_path)
    assert result.returncode == 1
    message = f"mail_dir: cannot create '{tmp_path / 'afile' / 'mail'}': Not a directory"
    assert result.stderr.endswith(f"\ngeosmtp: {message}\n"), result.stderr
    assert f"ERROR   cannot start: {message}\n" in (tmp_path / "logs" / "log.txt").read_text()
