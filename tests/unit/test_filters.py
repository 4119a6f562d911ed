"""Filter stages, piece by piece: one program run, reply texts, loading a
callable, the `filters:` config, and which messages a stage applies to."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from geosmtp import config as cfg
from geosmtp.filters import EXIT_REJECT, EXIT_TEMPFAIL, cooperative
from geosmtp.filters.calls import is_cooperative, load_callable
from geosmtp.filters.program import reply_text, run_program
from geosmtp.filters.stages import Filters, Slots
from geosmtp.mail import Envelope, Mailbox, Recipient
from geosmtp.pipeline import Message
from geosmtp.storage import Spool, StorageError
from geosmtp.storage.spool import UniqueNames, read_return_path
from tests.conftest import wait_until

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module", autouse=True)
def _sigchld_back_to_default():
    """The filter programs run here install libev's SIGCHLD handler in the test
    process, which would reap any child a later test waits for itself."""
    yield
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", UniqueNames("host"))


def run(spool: Spool, argv, data: bytes, *, timeout: float = 10, max_output: int = 1 << 30):
    """`argv` run on `data` (its program found on PATH, as the config does)."""
    argv = [shutil.which(argv[0]) or argv[0], *argv[1:]]
    source = spool.root.parent / "source"
    source.write_bytes(data)
    out = spool.open()
    try:
        with open(source, "rb") as f:
            result = run_program(argv, ENV, f, out, timeout=timeout, max_output=max_output)
        out.flush()
        return result, Path(out.path).read_bytes()
    finally:
        out.remove()


# ------------------------------------------------------------- one run


def test_stdout_becomes_the_output(spool):
    result, output = run(spool, ["cat"], b"Subject: x\n\nbody\n")
    assert (result.status, result.failure, output) == (0, None, b"Subject: x\n\nbody\n")
    assert result.output == len(output)


def test_writing_before_reading_does_not_deadlock(spool):
    """Four times a pipe's buffer out before a byte is read, and as much in."""
    data = b"x" * (1 << 20)
    result, output = run(spool, ["sh", "-c", "head -c 1048576 /dev/zero; cat"], data)
    assert result.status == 0 and output == b"\0" * (1 << 20) + data


def test_a_program_may_stop_reading_early(spool):
    result, output = run(spool, ["head", "-c", "5"], b"y" * (4 << 20))
    assert (result.status, result.failure, output) == (0, None, b"yyyyy")


@pytest.mark.parametrize("status", [EXIT_REJECT, EXIT_TEMPFAIL, 1, 3])
def test_the_exit_status_and_stderr(spool, status):
    result, _ = run(spool, ["sh", "-c", f"echo said it >&2; exit {status}"], b"m\n")
    assert (result.status, result.failure, result.stderr) == (status, None, b"said it\n")


def test_only_the_start_of_stderr_is_kept(spool):
    result, _ = run(spool, ["sh", "-c", "head -c 1000000 /dev/zero >&2"], b"")
    assert result.status == 0 and len(result.stderr) == 4096


def test_a_timeout_kills_the_process_group(spool):
    marker = f"{os.getpid()}.25"
    started = time.monotonic()
    result, _ = run(spool, ["sh", "-c", f"sleep {marker} & sleep {marker}"], b"", timeout=0.3)
    assert result.failure == "timeout" and time.monotonic() - started < 5

    def gone() -> bool:  # SIGKILL is sure, but a process takes a moment to end
        return not any(
            p.isdigit() and f"sleep\0{marker}".encode() in _cmdline(p) for p in os.listdir("/proc")
        )

    wait_until(gone, timeout=5, what="the program's processes to end")


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_process_left_holding_stdout_does_not_hold_the_run(spool):
    """`sleep & cat`: the sleep keeps stdout and stderr open; the run ends when
    the program does, not at the stage's timeout, and the sleep is killed."""
    marker = f"{os.getpid()}.75"
    data = b"Subject: x\n\n" + b"line\n" * 300_000  # 1.5 MB: most of it read while cat runs
    started = time.monotonic()
    result, output = run(
        spool, ["sh", "-c", f"sleep {marker} & cat; echo done >&2"], data, timeout=60
    )
    assert time.monotonic() - started < 10
    assert (result.status, result.failure, result.stderr) == (0, None, b"done\n")
    assert output == data

    def gone() -> bool:
        return not any(
            p.isdigit() and f"sleep\0{marker}".encode() in _cmdline(p) for p in os.listdir("/proc")
        )

    wait_until(gone, timeout=5, what="the sleep to be killed")


def test_output_still_in_the_pipe_when_the_program_exits_is_all_taken(spool, tmp_path):
    """The program makes its stdout pipe 1 MiB, fills it and exits at once
    (a sleep holding the pipe, so no EOF comes): every octet is read after the
    exit. Several runs: the exit and the last reads race."""
    program = tmp_path / "burst.py"
    program.write_text(
        textwrap.dedent(
            """
            import fcntl, os, subprocess, sys
            fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ
            subprocess.Popen(["sleep", sys.argv[1]])  # holds stdout and stderr
            data = bytes(range(256)) * 4096  # 1 MiB
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
            os.write(2, b"bye\\n")
            """
        )
    )
    marker = f"{os.getpid()}.85"
    for _ in range(5):
        started = time.monotonic()
        result, output = run(spool, [sys.executable, str(program), marker], b"", timeout=60)
        assert time.monotonic() - started < 10
        assert (result.status, result.failure, result.stderr) == (0, None, b"bye\n")
        assert output == bytes(range(256)) * 4096


def test_too_much_output_kills_it(spool):
    result, output = run(spool, ["yes"], b"", max_output=200_000)
    assert result.failure == "output_limit" and len(output) <= 200_000
    assert result.status is None or result.status < 0


def test_a_program_that_cannot_run(spool):
    result, output = run(spool, ["/nonexistent/program"], b"m\n")
    assert (result.failure, output) == ("exec", b"")
    assert result.error == "cannot run /nonexistent/program: No such file or directory"


def test_an_unreadable_message_is_a_storage_error(spool):
    class Broken:
        def read(self, n: int) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

    out = spool.open()
    with pytest.raises(StorageError):
        run_program([shutil.which("cat")], ENV, Broken(), out, timeout=5, max_output=100)  # type: ignore[arg-type]
    out.remove()


def test_programs_that_end_at_once_are_never_lost(spool):
    """A program can end before the thread that started it returns its pid:
    its status is kept for the waiter all the same."""
    for status in range(40):
        result, _ = run(spool, ["sh", "-c", f"exit {status}"], b"")
        assert (result.status, result.failure) == (status, None)


def test_no_descriptor_is_left_open(spool):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    run(spool, ["cat"], b"warm up\n")
    before = fds()
    for argv in (["cat"], ["sh", "-c", "exit 3"], ["yes"], ["/nonexistent"]):
        run(spool, argv, b"m\n" * 1000, max_output=1000)
    run(spool, ["sleep", "5"], b"", timeout=0.1)
    assert fds() == before


# ------------------------------------------------------------ reply text


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"Virus found\n", "Virus found"),
        (b"\n  \r\n  Spam score 9.1  \nmore\n", "Spam score 9.1"),
        (b"bad \x1b[31mcolour\x00 \x7f!\r\nnext", "bad ?[31mcolour? ?!"),
        ("caf\u00e9 ferm\u00e9", "caf? ferm?"),
        (b"caf\xc3\xa9", "caf??"),
        (b"x" * 500, "x" * 200),
        (b"", None),
        (b"\n\n \t\n", None),
        (None, None),
    ],
)
def test_reply_text(raw, text):
    assert reply_text(raw) == text


# ------------------------------------------------------------ callables


def test_load_callable(tmp_path, monkeypatch):
    (tmp_path / "stagemod.py").write_text(
        textwrap.dedent(
            """
            from geosmtp.filters import cooperative
            class Checks:
                @staticmethod
                def quick(envelope, message, context):
                    return None
            def plain(envelope, message, context):
                return None
            @cooperative
            def polite(envelope, message, context):
                return None
            VALUE = 3
            """
        )
    )
    (tmp_path / "broken.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_callable("stagemod:plain").__name__ == "plain"
    assert load_callable("stagemod:Checks.quick").__name__ == "quick"
    assert not is_cooperative(load_callable("stagemod:plain"))
    assert is_cooperative(load_callable("stagemod:polite"))
    for spec, message in [
        ("stagemod", "expected 'package.module:function', got 'stagemod'"),
        ("stagemod:plain()", "expected 'package.module:function', got 'stagemod:plain()'"),
        ("stagemod:nothing", "'stagemod' has no 'nothing'"),
        ("stagemod:VALUE", "'stagemod:VALUE' is not callable"),
        ("broken:f", "cannot import 'broken': ImportError: needs libfoo"),
        ("no.such.module:f", "cannot import 'no.such.module': ModuleNotFoundError"),
    ]:
        with pytest.raises(ValueError) as err:
            load_callable(spec)
        assert str(err.value).startswith(message), str(err.value)


def test_cooperative_marks_the_function():
    @cooperative
    def stage(envelope, message, context):
        return None

    assert stage.cooperative is True and is_cooperative(stage)


# --------------------------------------------------------------- config


def load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return cfg.load(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(cfg.ConfigError) as err:
        load(tmp_path, text)
    return str(err.value)


def test_a_filter_and_its_defaults(tmp_path):
    config = load(tmp_path, "filters: [{name: cat, command: [cat, -u]}]")
    (stage,) = config.filters
    assert stage.command == [os.path.abspath(shutil.which("cat")), "-u"]
    assert (stage.call, stage.timeout, stage.max_output, stage.on_failure) == (
        None,
        120,
        None,
        "tempfail",
    )
    assert (stage.roles, stage.mail, stage.enabled) == (None, "all", True)
    assert config.filter_concurrency == 16
    assert load(tmp_path, "").filters == []


def test_a_program_path_is_relative_to_the_config(tmp_path):
    (tmp_path / "bin").mkdir()
    program = tmp_path / "bin" / "check"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    config = load(tmp_path, "filters: [{name: c, command: [bin/check, --x]}]")
    assert config.filters[0].command == [str(tmp_path.resolve() / "bin" / "check"), "--x"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("filters: [{command: [cat]}]", "filters[0].name: expected a name of letters"),
        ("filters: [{name: 'a b', command: [cat]}]", "filters[0].name: expected a name"),
        ("filters: [{name: a/b, command: [cat]}]", "filters[0].name: expected a name"),
        (
            "filters: [{name: a, command: [cat]}, {name: a, command: [cat]}]",
            "filters[1].name: 'a' names two filters",
        ),
        ("filters: [{name: a}]", "filters[0]: give command (a program) or call"),
        (
            "filters: [{name: a, command: [cat], call: 'x:y'}]",
            "filters[0]: give command (a program) or call",
        ),
        ("filters: [{name: a, command: []}]", "filters[0].command: expected the program"),
        ("filters: [{name: a, command: cat}]", "filters[0].command: expected a list"),
        (
            "filters: [{name: a, command: [no-such-program-here]}]",
            "filters[0].command: no program 'no-such-program-here' on PATH",
        ),
        ("filters: [{name: a, command: [./missing]}]", "filters[0].command: '/"),
        ("filters: [{name: a, command: [cat], timeout: 0}]", "filters[0].timeout: expected a"),
        (
            "filters: [{name: a, command: [cat], max_output: 0}]",
            "filters[0].max_output: expected a positive integer, got 0",
        ),
        (
            "filters: [{name: a, command: [cat], on_failure: ignore}]",
            "filters[0].on_failure: expected one of tempfail, reject, pass, got 'ignore'",
        ),
        (
            "filters: [{name: a, command: [cat], roles: [pop3x]}]",
            "filters[0].roles[0]: expected one of",
        ),
        (
            "filters: [{name: a, command: [cat], mail: remote}]",
            "filters[0].mail: expected one of local, outbound, all, got 'remote'",
        ),
        ("filters: [{name: a, command: [cat], colour: red}]", "filters[0].colour: unknown key"),
        ("filters: {name: a}", "filters: expected a list"),
        ("filter_concurrency: 0", "filter_concurrency: expected a positive integer, got 0"),
    ],
)
def test_filter_config_errors(tmp_path, text, message):
    assert error_of(tmp_path, text).startswith(message)


def test_a_program_that_is_not_executable(tmp_path):
    (tmp_path / "check").write_text("#!/bin/sh\n")
    message = error_of(tmp_path, "filters: [{name: a, command: [./check]}]")
    assert message == f"filters[0].command: '{tmp_path.resolve()}/check' is not an executable file"


# ------------------------------------------------------------ where it applies


LOCAL = Recipient(Mailbox("alice", "test.example"), "alice")
REMOTE = Recipient(Mailbox("dave", "remote.example"), None)


def message_for(spool: Spool, role: str, *recipients: Recipient) -> Message:
    env = Envelope("client.example", True, Mailbox("c", "remote.example"), recipients=recipients)
    return Message(env, spool.open(), "Q", 10, "127.0.0.1", role)


@pytest.mark.parametrize(
    ("keys", "role", "recipients", "applies"),
    [
        ({}, "mx", (LOCAL,), True),
        ({}, "", (LOCAL,), False),  # the server's own reports
        ({"enabled": False}, "mx", (LOCAL,), False),
        ({"roles": ["mx"]}, "mx", (LOCAL,), True),
        ({"roles": ["mx"]}, "submission", (LOCAL,), False),
        ({"roles": ["submission", "submissions"]}, "submissions", (REMOTE,), True),
        ({"mail": "local"}, "mx", (LOCAL,), True),
        ({"mail": "local"}, "mx", (LOCAL, REMOTE), False),
        ({"mail": "outbound"}, "submission", (LOCAL, REMOTE), True),
        ({"mail": "outbound"}, "submission", (REMOTE,), True),
        ({"mail": "outbound"}, "mx", (LOCAL,), False),
        ({"mail": "all", "roles": []}, "mx", (LOCAL,), False),
    ],
)
def test_where_a_stage_applies(tmp_path, spool, keys, role, recipients, applies):
    config = cfg.from_mapping({"filters": [{"name": "s", "command": ["cat"], **keys}]}, tmp_path)
    filters = Filters(spool)
    filters.configure(config)
    (stage,) = filters.stages
    message = message_for(spool, role, *recipients)
    assert stage.applies(message) is applies
    message.spool.remove()


# ------------------------------------------------------------------ slots


def test_slots_count_and_resize():
    slots = Slots(2)
    first, second = slots.acquire(0), slots.acquire(0)
    assert first is not None and second is not None
    assert slots.acquire(0) is None and (slots.running, slots.waiting) == (2, 0)
    first.release()
    first.release()  # once only
    assert slots.running == 1
    slots.resize(1)
    assert slots.acquire(0) is not None  # the new limit counts from now
    assert slots.acquire(0.05) is None
    second.release()  # back where it was taken: no error
    assert slots.running == 1


def test_read_return_path(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"Return-Path: <a@b.example>\nReceived: x\n\nbody\n")
    with open(path, "rb") as f:
        assert read_return_path(f) == b"Return-Path: <a@b.example>\n"
        assert f.read() == b"Received: x\n\nbody\n"
    path.write_bytes(b"Received: x\n\nbody\n")
    with open(path, "rb") as f:
        assert read_return_path(f) == b""
        assert f.read() == b"Received: x\n\nbody\n"


def test_the_bundled_config_has_the_cat_stage_ready_to_uncomment(tmp_path):
    bundled = (Path(__file__).parents[2] / "config.yaml").read_text()
    assert cfg.load(Path(__file__).parents[2] / "config.yaml").filters == []
    lines = bundled.splitlines()
    start = lines.index("# filters:")
    end = lines.index("#", start)  # the block ends at the first bare "#"
    uncommented = [line.removeprefix("# ") for line in lines[start:end]]
    text = "\n".join([*lines[:start], *uncommented, *lines[end:]])
    (tmp_path / "admin.token").write_text("x" * 32)
    config = load(tmp_path, text)
    (stage,) = config.filters
    assert stage.name == "cat" and Path(stage.command[0]).name == "cat"
    assert (stage.timeout, stage.max_output, stage.on_failure) == (120, None, "tempfail")
    assert (stage.roles, stage.mail, stage.enabled, stage.call) == (None, "all", True, None)


def test_a_server_without_stdin_stdout_stderr_still_wires_the_pipes(tmp_path):
    """A server started with 0, 1 and 2 closed gets its pipes there; the
    program must still get stdin, stdout and stderr right."""
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        for fd in (0, 1, 2):
            os.close(fd)
        from geosmtp.filters.program import run_program
        from geosmtp.storage import Spool
        from geosmtp.storage.spool import UniqueNames
        spool = Spool({str(tmp_path / "spool")!r}, UniqueNames("h"))
        out = spool.open()
        with open({str(tmp_path / "in")!r}, "rb") as source:
            run = run_program(["/bin/sh", "-c", "cat; echo oops >&2; exit 20"],
                              {{"PATH": "/bin:/usr/bin"}}, source, out, timeout=10, max_output=100)
        out.flush()
        result = f"{{run.status}} {{run.stderr!r}} {{open(out.path, 'rb').read()!r}}"
        open({str(tmp_path / "result")!r}, "w").write(result)
        """
    )
    (tmp_path / "in").write_bytes(b"the message\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == 0
    assert (tmp_path / "result").read_text() == "20 b'oops\\n' b'the message\\n'"
