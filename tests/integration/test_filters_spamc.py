"""The spamc examples against a private spamd (Debian's spamassassin and spamc),
on a loopback port of its own, through the real server."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.test_filters import EXAMPLES, access_lines, nothing_left, send, stage

# The GTUBE string (SpamAssassin's rules score it 1000): spam for any spamd.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SPAM = b"From: carol@remote.example\r\nSubject: offer\r\n\r\n" + GTUBE + b"\r\n"
HAM = b"From: carol@remote.example\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n"


@pytest.fixture(scope="module")
def spamd(tmp_path_factory):
    """spamd on 127.0.0.1 and a free port, local tests only (no network, no
    per-user config); its port once it answers."""
    if not (shutil.which("spamd") and shutil.which("spamc")):
        pytest.skip("spamd and spamc are not installed (Debian: spamd, spamc)")
    root = tmp_path_factory.mktemp("spamd")
    port = free_port()
    proc = subprocess.Popen(
        [
            shutil.which("spamd"),
            f"--listen=127.0.0.1:{port}",
            "--allowed-ips=127.0.0.1",
            "--local",
            "--nouser-config",
            "--max-children=2",
            "--min-children=1",
            f"--syslog={root / 'spamd.log'}",
            f"--pidfile={root / 'spamd.pid'}",
            *(["--username=nobody"] if subprocess.os.geteuid() == 0 else []),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        assert proc.poll() is None, (root / "spamd.log").read_text(errors="replace")[-2000:]
        ping = subprocess.run(["spamc", "-K", "-p", str(port)], capture_output=True, timeout=10)
        return ping.returncode == 0

    try:
        wait_until(up, timeout=60, interval=0.2, what="spamd")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_spamc_reject_refuses_spam_and_passes_ham_marked(make_server, spamd):
    server = make_server(
        {"filters": [stage("spam", [str(EXAMPLES / "spamc-reject"), "-p", str(spamd)], timeout=60)]}
    )
    assert send(server, SPAM) == (554, "5.7.1 Message refused as spam")
    nothing_left(server)
    assert send(server, HAM)[0] == 250
    (path,) = server.messages("alice")
    data = path.read_bytes()
    assert b"\nX-Spam-Status: No, score=" in data and data.endswith(b"See you at noon.\n")
    assert [line["stages"] for line in access_lines(server, 2)] == ["spam:reject", "spam:replace"]


def test_spamc_marks_and_a_header_rule_refuses(make_server, spamd):
    """spamc itself as a stage (it only marks), then reject-by-header on its mark."""
    server = make_server(
        {
            "filters": [
                stage("spamc", ["spamc", "-x", "-p", str(spamd)], timeout=60),
                stage(
                    "flag",
                    [str(EXAMPLES / "reject-by-header"), "X-Spam-Flag", "^yes$", "Spam, no thanks"],
                ),
            ]
        }
    )
    assert send(server, SPAM) == (554, "5.7.1 Spam, no thanks")
    assert send(server, HAM)[0] == 250
    stages = [line["stages"] for line in access_lines(server, 2)]
    assert stages == ["spamc:replace,flag:reject", "spamc:replace,flag:accept"]


def test_spamd_down_is_on_failure(make_server):
    if not shutil.which("spamc"):
        pytest.skip("spamc is not installed (Debian: spamc)")
    port = free_port()  # nothing listens there
    server = make_server(
        {"filters": [stage("spam", [str(EXAMPLES / "spamc-reject"), "-p", str(port)])]}
    )
    assert send(server, HAM)[0] == 451
    assert access_lines(server, 1)[0]["stages"] == "spam:tempfail(exit=69)"  # EX_UNAVAILABLE
