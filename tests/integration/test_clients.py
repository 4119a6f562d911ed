"""Real third-party clients (swaks, curl, msmtp, smtp-source) and IPv6.

The clients' tests share one server (`server` below), each with mailboxes of
its own; the listener tests start theirs."""

from __future__ import annotations

import mailbox
import shutil
import smtplib
import subprocess

import pytest

from tests.conftest import free_port, have_ipv6, stored_since, wait_until


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def run(args: list[str], input: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, timeout=60, input=input)


@pytest.fixture
def server(shared_server):
    """The run's shared server (each test sends to mailboxes of its own)."""
    return shared_server


def read_back(server, box: str) -> list[mailbox.MaildirMessage]:
    """Every stored message, through the standard library's Maildir reader."""
    md = mailbox.Maildir(server.mail_dir / box, factory=None, create=False)
    return [md[key] for key in sorted(md.keys())]


def test_swaks(server, box):
    swaks = need("swaks")
    result = run(
        [
            swaks,
            "--server",
            f"{server.host}:{server.port}",
            "--ehlo",
            "swaks.example",
            "--from",
            "carol@remote.example",
            "--to",
            f"{box}@test.example",
            "--header",
            "Subject: from swaks",
            "--body",
            "Sent by swaks.\n.leading dot",
        ]
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    (msg,) = read_back(server, box)
    assert msg["Subject"] == "from swaks"
    assert msg["Return-Path"] == "<carol@remote.example>"
    assert "from swaks.example" in msg["Received"]
    assert msg.get_payload().splitlines()[:2] == ["Sent by swaks.", ".leading dot"]


def test_swaks_pipelining_to_two_recipients(server, box):
    swaks = need("swaks")
    result = run(
        [
            swaks,
            "--server",
            f"{server.host}:{server.port}",
            "--pipeline",
            "--from",
            "carol@remote.example",
            "--to",
            f"{box}@test.example,{box}2@test.example",
            "--body",
            "pipelined",
        ]
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    for name in (box, f"{box}2"):
        (msg,) = read_back(server, name)
        assert msg.get_payload().strip() == "pipelined"


def test_swaks_relay_denied(server):
    swaks = need("swaks")
    before = server.all_messages()
    result = run(
        [
            swaks,
            "--server",
            f"{server.host}:{server.port}",
            "--from",
            "carol@remote.example",
            "--to",
            "someone@foreign.example",
        ]
    )
    assert result.returncode != 0
    assert b"550 5.7.1" in result.stdout
    assert stored_since(server, before) == []


def test_curl(server, tmp_path, box):
    curl = need("curl")
    message = tmp_path / "msg.txt"
    message.write_bytes(
        b"From: carol@remote.example\r\nTo: bob@test.example\r\nSubject: from curl\r\n"
        b"\r\nSent by curl.\r\n.dot line\r\n"
    )
    result = run(
        [
            curl,
            "--silent",
            "--show-error",
            "--max-time",
            "30",
            f"smtp://{server.host}:{server.port}/curl.example",
            "--mail-from",
            "carol@remote.example",
            "--mail-rcpt",
            f"{box}@test.example",
            "-T",
            str(message),
        ]
    )
    assert result.returncode == 0, result.stderr.decode()
    (msg,) = read_back(server, box)
    assert msg["Subject"] == "from curl"
    assert msg.get_payload() == "Sent by curl.\n.dot line\n"


def test_msmtp(server, box):
    msmtp = need("msmtp")
    result = run(
        [
            msmtp,
            f"--host={server.host}",
            f"--port={server.port}",
            "--auth=off",
            "--tls=off",
            "--domain=msmtp.example",
            "--from=carol@remote.example",
            f"{box}@test.example",
        ],
        input=b"Subject: from msmtp\n\nSent by msmtp.\n",
    )
    assert result.returncode == 0, result.stderr.decode()
    (msg,) = read_back(server, box)
    assert msg["Subject"] == "from msmtp"
    assert msg.get_payload() == "Sent by msmtp.\n"


def test_smtp_source(server, box):
    smtp_source = need("smtp-source")
    result = run(
        [
            smtp_source,
            "-s",
            "5",  # sessions in parallel
            "-m",
            "40",  # messages in all
            "-l",
            "2000",  # message size
            "-f",
            "carol@remote.example",
            "-t",
            f"{box}@test.example",
            f"{server.host}:{server.port}",
        ]
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    messages = read_back(server, box)
    assert len(messages) == 40
    assert server.tmp_files() == []


def test_maildir_reads_back_every_message(server, box):
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        for i in range(10):
            client.sendmail(
                "carol@remote.example",
                [f"{box}@test.example", f"{box}2@test.example"],
                f"Subject: n{i}\r\nMessage-ID: <{i}@remote.example>\r\n\r\nbody {i}\r\n".encode(),
            )
    for name in (box, f"{box}2"):
        msgs = read_back(server, name)
        assert sorted(m["Subject"] for m in msgs) == sorted(f"n{i}" for i in range(10))
        assert all(m.get_subdir() == "new" for m in msgs)
        assert sorted(m.get_payload() for m in msgs) == sorted(f"body {i}\n" for i in range(10))


@pytest.mark.skipif(not have_ipv6(), reason="::1 is not usable on this machine")
def test_ipv6_listener(make_server):
    port = free_port("::1")
    server = make_server({"listeners": [{"address": "::1", "port": port}]})
    assert (server.host, server.port) == ("::1", port)
    with smtplib.SMTP("::1", port, timeout=10) as client:
        client.sendmail(
            "carol@remote.example", ["alice@test.example"], b"Subject: v6\r\n\r\nv6\r\n"
        )
    (msg,) = read_back(server, "alice")
    assert "[::1]" in msg["Received"]
    wait_until(lambda: "client=::1" in server.access_log(), what="access log line from ::1")


@pytest.mark.skipif(not have_ipv6(), reason="::1 is not usable on this machine")
def test_ipv4_and_ipv6_listeners_together(make_server):
    v4, v6 = free_port(), free_port("::1")
    server = make_server(
        {
            "listeners": [
                {"address": "127.0.0.1", "port": v4},
                {"address": "::1", "port": v6},
            ]
        }
    )
    for host, port in (("127.0.0.1", v4), ("::1", v6)):
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail(
                "carol@remote.example", ["bob@test.example"], f"\r\n{host}\r\n".encode()
            )
    bodies = sorted(m.get_payload() for m in read_back(server, "bob"))
    assert bodies == ["127.0.0.1\n", "::1\n"]


def test_curl_with_an_lf_only_file(server, tmp_path, box):
    """A message file written with LF line ends (as editors and heredocs make it)."""
    curl = need("curl")
    message = tmp_path / "msg.txt"
    lines = [b"From: carol@remote.example", b"Subject: lf file", b""]
    lines += [b"line %d of a file longer than one SMTP line" % i for i in range(100)]
    message.write_bytes(b"\n".join(lines) + b"\n")
    result = run(
        [curl, "--silent", "--show-error", "--max-time", "30",
         f"smtp://{server.host}:{server.port}/curl.example",
         "--mail-from", "carol@remote.example", "--mail-rcpt", f"{box}@test.example",
         "-T", str(message)]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    (msg,) = read_back(server, box)
    assert msg["Subject"] == "lf file"
    body = msg.get_payload().splitlines()
    assert body[0] == "line 0 of a file longer than one SMTP line"
    assert "line 99 of a file longer than one SMTP line" in body[-2:]
