"""Filter programs (`filters:` with `command`) through the real server: what a
program's exit status and output make of a message, its limits (time, output,
processes at once), where a stage applies, and that nothing is left behind."""

from __future__ import annotations

import hashlib
import json
import os
import smtplib
import stat
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import child_pids, free_port, users, wait_until
from tests.integration.test_access_log import parse
from tests.integration.wire import Wire

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "filters"
MESSAGE = b"From: carol@remote.example\r\nSubject: hello\r\n\r\nbody line\r\n.dot line\r\n"
STORED = MESSAGE.replace(b"\r\n", b"\n")  # what a Maildir keeps of it (LF endings)


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable script in tmp_path (its first line picks the interpreter)."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def python_script(tmp_path: Path, name: str, body: str) -> str:
    return script(tmp_path, name, f"#!{sys.executable}\n" + textwrap.dedent(body))


def stage(name: str, command: list[str], **keys) -> dict:
    return {"name": name, "command": command, **keys}


def send(server, message: bytes = MESSAGE, rcpts=("alice@test.example",), port=None):
    """One transaction; (code, text) of the reply to the end of data."""
    with Wire.connect(server.host, port or server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        for rcpt in rcpts:
            w.expect(f"RCPT TO:<{rcpt}>", 250)
        w.expect("DATA", 354)
        body = message.replace(b"\r\n.", b"\r\n..")
        code, text = w.cmd(body + b".")
        w.expect("QUIT", 221)
    return code, text


def stored_body(path: Path) -> bytes:
    """A stored message without the server's trace lines (Return-Path, Received)."""
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <carol@remote.example>\nReceived: from "), data[:200]
    _, _, rest = data.partition(b"\n\tfor <")
    return rest.split(b"\n", 1)[1]


def access_lines(server, count: int) -> list[dict[str, str]]:
    """The access log's lines of SMTP transactions (not the queue's), once
    there are `count` of them."""

    def enough() -> list[str] | None:
        lines = [line for line in server.access_log().splitlines() if " session=" in line]
        return lines if len(lines) >= count else None

    lines = wait_until(enough, what=f"{count} access log lines")
    assert len(lines) == count, lines
    return [parse(line) for line in lines]


def nothing_left(server) -> None:
    assert server.all_messages() == []
    assert server.tmp_files() == []


def children(server) -> list[int]:
    """The children of the server's serving processes (filter programs)."""
    return [pid for worker in server.workers() for pid in child_pids(worker)]


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ------------------------------------------------------------- verdicts


def test_cat_passes_the_message_through_byte_exact(make_server):
    server = make_server({"filters": [stage("cat", ["cat"])]})
    code, _ = send(server)
    assert code == 250
    (path,) = server.messages("alice")
    assert stored_body(path) == STORED
    (line,) = access_lines(server, 1)
    assert line["stages"] == "cat:replace" and line["result"] == "250"


def test_a_transformation_is_stored_byte_exact(make_server):
    server = make_server({"filters": [stage("tag", [str(EXAMPLES / "tag-subject"), "[EXTERNAL]"])]})
    assert send(server)[0] == 250
    (path,) = server.messages("alice")
    assert stored_body(path) == STORED.replace(b"Subject: hello", b"Subject: [EXTERNAL] hello")
    # The program saw the message from the Received: line on; the Return-Path
    # is the server's and is in front of its output again.
    assert path.read_bytes().count(b"Return-Path:") == 1


def test_exit_75_is_451_with_nothing_stored(make_server, tmp_path):
    busy = script(
        tmp_path, "busy", "#!/bin/sh\necho 'scanner busy, come back later' >&2\nexit 75\n"
    )
    server = make_server({"filters": [stage("scan", [busy])]})
    assert send(server) == (451, "4.3.0 scanner busy, come back later")
    nothing_left(server)
    (line,) = access_lines(server, 1)
    assert line["stages"] == "scan:tempfail" and line["result"] == "451"


def test_exit_20_is_554_with_the_first_stderr_line_sanitised(make_server, tmp_path):
    refuse = script(
        tmp_path,
        "refuse",
        """\
        #!/bin/sh
        printf '\\n  \\n' >&2
        printf 'Virus found: \\033[31mEICAR\\r\\n' >&2
        echo 'second line, never shown' >&2
        exit 20
        """,
    )
    server = make_server({"filters": [stage("av", [refuse])]})
    assert send(server) == (554, "5.7.1 Virus found: ?[31mEICAR")
    nothing_left(server)
    (line,) = access_lines(server, 1)
    assert line["stages"] == "av:reject" and line["result"] == "554"


def test_exit_20_without_words_gets_the_servers(make_server, tmp_path):
    refuse = script(tmp_path, "refuse", "#!/bin/sh\nexit 20\n")
    server = make_server({"filters": [stage("av", [refuse])]})
    assert send(server) == (554, "5.7.1 Error: message refused")


def test_exit_0_without_output_keeps_the_message(make_server, tmp_path):
    check = script(tmp_path, "check", "#!/bin/sh\nexec cat > /dev/null\n")
    server = make_server({"filters": [stage("check", [check])]})
    assert send(server)[0] == 250
    (path,) = server.messages("alice")
    assert stored_body(path) == STORED
    assert access_lines(server, 1)[0]["stages"] == "check:accept"


def test_stages_run_in_order_and_the_first_refusal_decides(make_server, tmp_path):
    seen = tmp_path / "seen"
    record = script(tmp_path, "record", f"#!/bin/sh\ncat > {seen}\n")
    refuse = script(tmp_path, "refuse", "#!/bin/sh\necho no >&2\nexit 20\n")
    tag = [str(EXAMPLES / "tag-subject"), "[1]"]
    server = make_server(
        {
            "filters": [
                stage("one", tag),
                stage("two", [record]),
                stage("three", [refuse]),
                stage("four", tag),
            ]
        }
    )
    assert send(server) == (554, "5.7.1 no")
    assert b"Subject: [1] hello\n" in seen.read_bytes()  # the second saw the first's output
    assert access_lines(server, 1)[0]["stages"] == "one:replace,two:accept,three:reject"
    nothing_left(server)


def test_the_environment_is_the_envelope_and_a_path(make_server, tmp_path):
    dump = tmp_path / "env"
    program = python_script(
        tmp_path,
        "env",
        f"""\
        import json, os, sys
        sys.stdin.buffer.read()
        open({str(dump)!r}, "w").write(json.dumps(dict(os.environ)))
        """,
    )
    server = make_server({"filters": [stage("env", [program])]})
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("helo.example")
        client.sendmail("carol@remote.example", ["alice@test.example", "bob@test.example"], MESSAGE)
    env = __import__("json").loads(dump.read_text())
    env.pop("LC_CTYPE", None)  # Python sets it for itself when the locale is C
    (line,) = access_lines(server, 1)
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "GEOSMTP_STAGE": "env",
        "GEOSMTP_QUEUE_ID": line["queue"],
        "GEOSMTP_SENDER": "carol@remote.example",
        "GEOSMTP_RECIPIENTS": "alice@test.example bob@test.example",
        "GEOSMTP_CLIENT_ADDRESS": "127.0.0.1",
        "GEOSMTP_HELO": "helo.example",
        "GEOSMTP_AUTH_USER": "",
        "GEOSMTP_ROLE": "mx",
        "GEOSMTP_TLS": "no",
        "GEOSMTP_SIZE": line["size"],
        "GEOSMTP_HOSTNAME": "mx.test.example",
    }


def test_the_environment_of_a_submitted_message(make_server, tmp_path):
    dump = tmp_path / "env"
    program = script(tmp_path, "env", f"#!/bin/sh\nenv > {dump}\n")
    server = make_server(
        {
            "listeners": [{"address": "127.0.0.1", "port": free_port(), "role": "submission"}],
            "users": users(alice="pw"),
            "auth": {"allow_plaintext": True},
            "filters": [stage("env", [program])],
        }
    )
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.login("alice", "pw")
        client.sendmail("alice@test.example", ["bob@test.example"], MESSAGE)
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["GEOSMTP_AUTH_USER"] == "alice"
    assert env["GEOSMTP_ROLE"] == "submission"
    assert env["GEOSMTP_SENDER"] == "alice@test.example"
    assert env["GEOSMTP_RECIPIENTS"] == "bob@test.example"


# ------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("on_failure", "reply"),
    [("tempfail", 451), ("reject", 554), ("pass", 250)],
)
def test_a_crashing_program_gets_on_failure(make_server, tmp_path, on_failure, reply):
    crash = script(tmp_path, "crash", "#!/bin/sh\nhead -c 10\necho oops >&2\nexit 3\n")
    server = make_server({"filters": [stage("crash", [crash], on_failure=on_failure)]})
    code, text = send(server)
    assert code == reply
    if reply == 250:
        (path,) = server.messages("alice")
        assert stored_body(path) == STORED  # unchanged: the 10 octets it wrote are dropped
    else:
        nothing_left(server)
        wording = "Error: message refused" if reply == 554 else "Error: local error"
        assert wording in text  # never the program's stderr for a crash
    (line,) = access_lines(server, 1)
    verdict = {"tempfail": "tempfail", "reject": "reject", "pass": "accept"}[on_failure]
    assert line["stages"] == f"crash:{verdict}(exit=3)"
    server.logged("filter crash: exit 3; stderr: oops")


def test_a_program_killed_by_a_signal_is_a_failure(make_server, tmp_path):
    crash = script(tmp_path, "segv", "#!/bin/sh\nkill -SEGV $$\n")
    server = make_server({"filters": [stage("segv", [crash])]})
    assert send(server)[0] == 451
    assert access_lines(server, 1)[0]["stages"] == "segv:tempfail(signal=11)"


def test_a_timeout_kills_the_whole_process_group(make_server, tmp_path):
    marker = f"{free_port()}.5"  # a sleep argument no other process has
    slow = script(
        tmp_path,
        "slow",
        f"#!/bin/sh\nsleep {marker} &\nsleep {marker}\n",
    )
    server = make_server({"filters": [stage("slow", [slow], timeout=0.5)]})
    assert send(server)[0] == 451
    assert access_lines(server, 1)[0]["stages"] == "slow:tempfail(timeout)"
    # The background one too (SIGKILL is sure, but a process takes a moment to end).
    wait_until(lambda: processes_with(f"sleep\0{marker}") == [], what="the sleeps to end")
    assert children(server) == []
    nothing_left(server)


def test_a_process_left_holding_stdout_does_not_hold_the_message(make_server, tmp_path):
    """`sh -c 'sleep & sed'`: the sleep keeps stdout open for a minute; the
    message is filtered and delivered once sh exits, far within the stage's
    60 s timeout, and the sleep is killed with the program's group."""
    marker = f"{free_port()}.5"
    command = ["/bin/sh", "-c", f"sleep {marker} & sed 's/^Subject: hello/Subject: seen/'"]
    server = make_server({"filters": [stage("bg", command, timeout=60)]})
    started = time.monotonic()
    code, _ = send(server)
    assert code == 250
    assert time.monotonic() - started < 10
    (path,) = server.messages("alice")
    assert stored_body(path) == STORED.replace(b"Subject: hello", b"Subject: seen")
    assert access_lines(server, 1)[0]["stages"] == "bg:replace"
    wait_until(lambda: processes_with(f"sleep\0{marker}") == [], what="the sleep to end")
    assert children(server) == []


def test_too_much_output_kills_the_program(make_server):
    server = make_server(
        {"filters": [stage("yes", ["yes"], max_output=100_000, on_failure="reject")]}
    )
    assert send(server)[0] == 554
    assert access_lines(server, 1)[0]["stages"] == "yes:reject(output_limit)"
    server.logged("wrote more than max_output (100000 octets)")
    assert children(server) == []
    nothing_left(server)


def test_a_program_that_cannot_run_is_a_failure(make_server, tmp_path):
    program = script(tmp_path, "gone", "#!/bin/sh\ncat\n")
    server = make_server({"filters": [stage("gone", [program])]})
    os.unlink(program)  # after the load, which checked it
    assert send(server)[0] == 451
    assert access_lines(server, 1)[0]["stages"] == "gone:tempfail(exec)"
    assert f"cannot run {program}: No such file or directory" in server.server_log()


def test_a_program_that_writes_20_mb_before_reading_a_20_mb_message(make_server, tmp_path):
    """Stdin and stdout are served at once: a program that fills its stdout pipe
    before it reads anything would deadlock a server that writes stdin first."""
    front = b"".join(b"X-Pad-%07d: %s\n" % (i, b"p" * 100) for i in range(200_000))  # ~22 MB
    (tmp_path / "front").write_bytes(front)
    program = python_script(
        tmp_path,
        "write-first",
        f"""\
        import shutil, sys
        with open({str(tmp_path / "front")!r}, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)
        """,
    )
    server = make_server(
        {
            "limits": {"max_message_size": 32 * 1024 * 1024},
            "filters": [stage("front", [program], timeout=120)],
        }
    )
    body = b"".join(b"line %07d %s\r\n" % (i, b"b" * 80) for i in range(220_000))  # ~21 MB
    message = b"Subject: big\r\n\r\n" + body
    with smtplib.SMTP(server.host, server.port, timeout=120) as client:
        client.sendmail("carol@remote.example", ["alice@test.example"], message)
    (path,) = server.messages("alice")
    data = path.read_bytes()
    first, rest = data.split(b"\n", 1)
    assert first == b"Return-Path: <carol@remote.example>"
    assert rest.startswith(front + b"Received: from ")
    expected = message.replace(b"\r\n", b"\n")
    assert hashlib.sha256(data[-len(expected) :]).digest() == hashlib.sha256(expected).digest()


def test_no_zombies_and_no_leaked_descriptors_after_many_runs(make_server, tmp_path):
    crash = script(tmp_path, "crash", "#!/bin/sh\nexit 3\n")
    slow = script(tmp_path, "slow", "#!/bin/sh\nexec sleep 30\n")
    server = make_server(
        {
            "filters": [
                stage("cat", ["cat"]),
                stage("crash", [crash], on_failure="pass"),
                stage("yes", ["yes"], max_output=10_000, on_failure="pass"),
                stage("slow", [slow], timeout=0.2, on_failure="pass", mail="outbound"),
            ],
            "trusted_networks": ["127.0.0.0/8"],
            "relay": {"smarthost": f"127.0.0.1:{free_port()}", "smarthost_tls": "none"},
            "workers": 1,  # one process to count the descriptors of
        }
    )
    pid = server.worker
    assert send(server)[0] == 250  # warms up what the first message opens for good
    before = open_fds(pid)
    for i in range(10):
        rcpts = ("alice@test.example",) if i % 2 else ("alice@test.example", "x@remote.example")
        assert send(server, rcpts=rcpts)[0] == 250
    lines = access_lines(server, 11)
    assert lines[-1]["stages"] == "cat:replace,crash:accept(exit=3),yes:accept(output_limit)"
    assert lines[-2]["stages"].endswith(",slow:accept(timeout)")
    assert child_pids(pid) == []
    # The queue's delivery attempts open and close sockets of their own: settle first.
    assert wait_until(lambda: open_fds(pid) <= before, what="descriptors back to before")
    assert server.tmp_files() == []


# ----------------------------------------------------------- applicability


def test_roles_and_mail_choose_the_messages(make_server):
    tag = str(EXAMPLES / "tag-subject")
    server = make_server(
        {
            "listeners": [
                {"address": "127.0.0.1", "port": free_port(), "role": "mx"},
                {"address": "127.0.0.1", "port": free_port(), "role": "submission"},
            ],
            "users": users(alice="pw"),
            "auth": {"allow_plaintext": True},
            "relay": {"smarthost": f"127.0.0.1:{free_port()}", "smarthost_tls": "none"},
            "filters": [
                stage("mx", [tag, "[MX]"], roles=["mx"]),
                stage("sub", [tag, "[SUB]"], roles=["submission"]),
                stage("local", [tag, "[LOCAL]"], mail="local"),
                stage("out", [tag, "[OUT]"], mail="outbound"),
            ],
        }
    )
    assert send(server)[0] == 250  # mx, a local recipient
    with smtplib.SMTP(server.host, server.ports["submission"], timeout=10) as client:
        client.login("alice", "pw")
        client.sendmail("alice@test.example", ["bob@test.example"], b"Subject: s1\r\n\r\nx\r\n")
        client.sendmail(  # one local and one remote recipient: outbound
            "alice@test.example",
            ["bob@test.example", "dave@remote.example"],
            b"Subject: s2\r\n\r\nx\r\n",
        )
    (alice,) = server.messages("alice")
    assert b"Subject: [LOCAL] [MX] hello\n" in alice.read_bytes()
    subjects = sorted(
        line
        for p in server.messages("bob")
        for line in p.read_bytes().splitlines()
        if line.startswith(b"Subject:")
    )
    assert subjects == [b"Subject: [LOCAL] [SUB] s1", b"Subject: [OUT] [SUB] s2"]
    # The queued copy for the remote recipient is the same filtered message.
    (queued,) = (server.mail_dir / ".queue" / "messages").iterdir()
    assert b"Subject: [OUT] [SUB] s2\n" in queued.read_bytes()
    stages = [line["stages"] for line in access_lines(server, 3)]
    assert stages == [
        "mx:replace,local:replace",
        "sub:replace,local:replace",
        "sub:replace,out:replace",
    ]


def test_a_disabled_stage_does_not_run(make_server, tmp_path):
    refuse = script(tmp_path, "refuse", "#!/bin/sh\nexit 20\n")
    server = make_server({"filters": [stage("off", [refuse], enabled=False)]})
    assert send(server)[0] == 250
    assert "stages" not in access_lines(server, 1)[0]


# ------------------------------------------------------------- concurrency


def test_no_more_programs_at_once_than_filter_concurrency(make_server, tmp_path):
    """Six messages at once under `filter_concurrency: 2`: two runs overlap in
    time (the cap lets two run together, not one after the other) and no
    three do. Each run writes when it started and ended (a clock every process
    shares), and how many were running as it started. One worker holds both
    slots: with two, each would get one (the limit is shared out) and an
    overlap would hang on how the kernel spread the six connections."""
    running, log = tmp_path / "running", tmp_path / "log"
    running.mkdir()
    program = python_script(
        tmp_path,
        "count",
        f"""\
        import os, sys, time
        start = time.monotonic()
        me = os.path.join({str(running)!r}, str(os.getpid()))
        open(me, "w").close()
        now = len(os.listdir({str(running)!r}))
        time.sleep(0.3)
        os.unlink(me)
        sys.stdin.buffer.read()
        with open({str(log)!r}, "a") as f:
            f.write(f"{{now}} {{start}} {{time.monotonic()}}\\n")
        """,
    )
    server = make_server(
        {"workers": 1, "filter_concurrency": 2, "filters": [stage("count", [program])]}
    )
    with ThreadPoolExecutor(6) as clients:  # six messages at once
        replies = list(clients.map(lambda _: send(server), range(6)))
    assert [code for code, _ in replies] == [250] * 6
    runs = [line.split() for line in log.read_text().splitlines()]
    assert len(runs) == 6
    counts = [int(now) for now, _, _ in runs]
    spans = sorted((float(start), float(end)) for _, start, end in runs)
    # At any run's start, how many runs had started and not yet ended.
    at_once = [sum(s <= start < e for s, e in spans) for start, _ in spans]
    assert max(at_once) == 2, spans  # two ran together, never three
    assert max(counts) <= 2, counts


# ------------------------------------------------------------------ memory


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB
    raise KeyError(key)


def test_a_large_message_through_a_program_costs_no_memory(make_server):
    """25 MB through `cat`: the server's peak RSS grows by less than 16 MB (the
    message goes through in 64 KiB blocks, never whole)."""
    server = make_server(
        {
            "limits": {"max_message_size": 64 * 1024 * 1024},
            "filters": [stage("cat", ["cat"])],
            "workers": 1,  # the one process that takes the message
        }
    )
    pid = server.worker
    assert send(server)[0] == 250  # the first run sets up what every run shares
    before = _status(pid, "VmRSS")
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/PID/clear_refs)")
    body = b"".join(b"%07d %s\r\n" % (i, b"m" * 90) for i in range(250_000))  # 25 MB
    with smtplib.SMTP(server.host, server.port, timeout=120) as client:
        client.sendmail(
            "carol@remote.example", ["alice@test.example"], b"Subject: m\r\n\r\n" + body
        )
    growth = _status(pid, "VmHWM") - before
    assert growth < 16 * 1024, f"peak RSS grew by {growth} kB"
    (path,) = [p for p in server.messages("alice") if p.stat().st_size > 20_000_000]
    assert path.read_bytes().endswith(body.replace(b"\r\n", b"\n"))


def test_a_program_inherits_three_descriptors_and_default_signals(make_server, tmp_path):
    """Nothing of the server's (sockets, log files, the spool) reaches a program;
    the signals Python ignores (SIGPIPE, SIGXFSZ) are back to their defaults,
    none is blocked; it leads a session of its own."""
    fds, signals = tmp_path / "fds.json", tmp_path / "signals"
    list_fds = f"""\
import json, os
fds = {{}}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{{fd}}")
    except FileNotFoundError:  # the one listdir had open
        pass
json.dump(fds, open({str(fds)!r}, "w"))
"""
    # A shell, not Python: Python ignores SIGPIPE and SIGXFSZ itself when it starts.
    # The masks are read by grep from its own status after the shell exec'd it
    # (both are kept across exec): a child reading the shell's status could
    # catch dash mid-fork, with every signal blocked for the moment.
    show_signals = (
        f"cut -d' ' -f6 /proc/$$/stat > {signals}; echo $$ >> {signals}; "
        f"exec grep -E '^(SigIgn|SigBlk):' /proc/self/status >> {signals}"
    )
    server = make_server(
        {
            "filters": [
                stage("fds", [sys.executable, "-I", "-S", "-c", list_fds]),
                stage("signals", ["sh", "-c", show_signals]),
            ]
        }
    )
    assert send(server)[0] == 250
    inherited = json.loads(fds.read_text())
    assert sorted(inherited) == ["0", "1", "2"], inherited
    assert all(target.startswith("pipe:") for target in inherited.values())
    session, pid, *masks = signals.read_text().splitlines()
    mask = {line.split(":")[0]: int(line.split()[1], 16) for line in masks}
    # glibc's posix_spawn leaves its own two signals (32, 33) ignored (glibc
    # programs set them up themselves); none of the 31 classic ones is.
    assert mask["SigIgn"] & 0x7FFFFFFF == 0 and mask["SigBlk"] == 0, masks
    assert session == pid  # its own session


def test_a_stop_during_a_run_leaves_no_program_behind(make_server, tmp_path):
    """SIGTERM while a program runs: after the grace period and the session's
    last chance the session is killed, and the program with it; the client,
    never told 250, keeps its message."""
    marker = f"{free_port()}.75"
    slow = script(tmp_path, "slow", f"#!/bin/sh\nsleep {marker} &\nsleep {marker}\n")
    server = make_server(
        {"timeouts": {"shutdown_grace": 0.2}, "filters": [stage("slow", [slow], timeout=300)]}
    )
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        w.send(MESSAGE + b".\r\n")
        wait_until(lambda: len(processes_with(f"sleep\0{marker}")) == 2, what="the program")
        assert server.stop() == 0
        with pytest.raises((ConnectionError, OSError)):
            w.reply(timeout=5)  # no 250: the connection just ends
    wait_until(lambda: processes_with(f"sleep\0{marker}") == [], what="the sleeps to end")
    assert server.all_messages() == [] and server.tmp_files() == []
