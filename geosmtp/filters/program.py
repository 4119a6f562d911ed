"""One run of a filter program.

The spooled message goes to the program's stdin while its stdout goes into a
new spool file, both at once (a program that writes before it has read
everything never deadlocks), 64 KiB at a time whatever the message's size.
Its stderr is drained too, the first `STDERR_KEPT` octets kept for the reply
text and the log. The program runs in a session and process group of its own
(`spawn.py` starts it and reaps it): on a timeout, or when it writes more
than it may, the whole group is killed; when the run ends, any process the
program left in its group is killed too. The program itself is always
reaped, and every pipe closed, whatever happens (the caller's greenlet
killed included).

The run ends when the program itself exits, not at the end of its stdout: a
process it started in the background (`sh -c 'helper & cat'`) holds the
pipes open, and waiting for their EOF would keep the run, and its slot,
until the timeout. Everything the program wrote before it exited is in the
pipes by then (a write to a pipe returns once the kernel has it), so the
pipes are read on, without waiting, until they are empty (EAGAIN) or at
their end; what a process left behind writes later is not taken.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import gevent
from gevent.fileobject import FileObjectPosix

from ..pipeline.stages import printable
from ..storage import SpoolFile, StorageError
from . import spawn

#: Exit statuses a filter program answers with besides 0 (use stdout).
EXIT_REJECT = 20  # refuse for good: 554 5.7.1 with the first stderr line (as chasquid's hooks)
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL (sysexits.h): 451 4.3.0, try again later

CHUNK = 64 * 1024
STDERR_KEPT = 4096
#: The PATH a program is given: the system's programs, nothing from the server's environment.
PROGRAM_PATH = "/usr/local/bin:/usr/bin:/bin"


class _Expired(Exception):
    """The run's time is up (a private exception: never confused with another Timeout)."""


@dataclass
class ProgramRun:
    """How a run ended."""

    status: int | None = None  # exit status; negative: the signal that ended it; None: killed
    failure: str | None = None  # "timeout", "output_limit", "exec": the run was cut short
    stderr: bytes = b""  # the first STDERR_KEPT octets of it
    output: int = 0  # octets the program wrote on stdout
    error: str = ""  # what went wrong, for the server log


class _Child:
    """A started program: its pid, and its three pipes as cooperative files."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        ours: list[int] = []  # the server's ends of stdin, stdout, stderr
        theirs: list[int] = []  # the program's: spawn.start closes them
        handed_over = False
        try:
            for name in ("stdin", "stdout", "stderr"):  # close-on-exec, as all here
                read_end, write_end = os.pipe()
                ours.append(write_end if name == "stdin" else read_end)
                theirs.append(read_end if name == "stdin" else write_end)
            handed_over = True
            pid = spawn.start(argv, env, theirs)
        except BaseException:
            for fd in ours if handed_over else ours + theirs:
                os.close(fd)
            raise
        self.pid = pid
        self.stdin = FileObjectPosix(ours[0], "wb", bufsize=0)
        self.stdout = FileObjectPosix(ours[1], "rb", bufsize=0)
        self.stderr = FileObjectPosix(ours[2], "rb", bufsize=0)
        self.returncode: int | None = None

    def wait(self) -> int:
        """Its exit status (negative: the signal that ended it), once it has ended."""
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(spawn.reaper().wait(self.pid))
        return self.returncode


def run_program(
    argv: Sequence[str],
    env: Mapping[str, str],
    source: BinaryIO,
    output: SpoolFile,
    *,
    timeout: float,
    max_output: int,
) -> ProgramRun:
    """Run `argv` (`argv[0]` a path) with `source` (read from where it is) on
    its stdin, its stdout appended to `output`. StorageError when `source`
    cannot be read or `output` cannot be written; every other problem is in
    the `ProgramRun`."""
    run = ProgramRun()
    try:
        proc = _Child(argv, env)
    except OSError as exc:
        run.failure = "exec"
        run.error = f"cannot run {argv[0]}: {exc.strerror or exc}"
        return run
    feeder = gevent.spawn(_feed, source, proc.stdin)
    reader = gevent.spawn(_read_output, proc, output, max_output, run)
    drainer = gevent.spawn(_read_stderr, proc.stderr, run)
    exited = gevent.spawn(proc.wait)
    try:
        with gevent.Timeout(timeout, _Expired):
            # The program's exit, or first the end of the reading (EOF, the
            # output limit, or a StorageError from the output, which goes on).
            either: list[gevent.Greenlet[..., Any]] = [exited, reader]
            gevent.wait(either, count=1)
            if reader.ready():
                reader.get()
            run.status = exited.get()
        # Ended: the rest of its output is in the pipes. Take it without waiting
        # for an EOF that a process it left holding them would put off. Neither
        # reader yields between a read and keeping what it read: stopped, it
        # has lost nothing.
        gevent.killall([reader, drainer])
        if run.failure is None:
            _drain(
                proc.stdout.fileno(), lambda data: _take_output(proc, output, max_output, run, data)
            )
        _drain(proc.stderr.fileno(), lambda data: _keep_stderr(run, data))
    except _Expired:
        run.failure = "timeout"
        run.error = f"no result after {timeout:g} s: killed"
    finally:
        # Whatever is left in the program's group (all of it, at a timeout).
        # While a process of the group lives, no other group can take its id;
        # once none does, the kill finds nothing.
        spawn.kill_group(proc.pid)
        gevent.killall([feeder, reader, drainer, exited])
        _reap(proc)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            _close(pipe)
    if feeder.successful() and isinstance(feeder.value, OSError):
        raise StorageError.wrap(feeder.value)  # the spool file could not be read
    return run


def _feed(source: BinaryIO, stdin: Any) -> OSError | None:
    """The message into the program; it may stop reading (and exit) early."""
    try:
        while True:
            try:
                data = source.read(CHUNK)
            except OSError as exc:
                return exc
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[stdin.write(view) :]
    except (BrokenPipeError, ConnectionResetError):
        pass  # it has read what it wanted
    except OSError as exc:
        if exc.errno != errno.EBADF:  # the pipe was closed under us: the run is over
            raise
    finally:
        _close(stdin)
    return None


def _read_output(proc: Any, output: SpoolFile, max_output: int, run: ProgramRun) -> None:
    while (data := proc.stdout.read(CHUNK)) and _take_output(proc, output, max_output, run, data):
        pass


def _take_output(
    proc: Any, output: SpoolFile, max_output: int, run: ProgramRun, data: bytes
) -> bool:
    """Keep a piece of stdout; False when there was one octet too many (the
    group is killed, nothing more is read)."""
    run.output += len(data)
    if run.output > max_output:
        run.failure = "output_limit"
        run.error = f"wrote more than max_output ({max_output} octets): killed"
        spawn.kill_group(proc.pid)
        return False
    output.write(data)
    return True


def _read_stderr(stderr: Any, run: ProgramRun) -> None:
    while data := stderr.read(CHUNK):
        _keep_stderr(run, data)


def _keep_stderr(run: ProgramRun, data: bytes) -> bool:
    """The first STDERR_KEPT octets go into the run; False once it has them."""
    room = STDERR_KEPT - len(run.stderr)
    if room > 0:
        run.stderr += data[:room]
    return len(run.stderr) < STDERR_KEPT


def _drain(fd: int, take: Callable[[bytes], bool]) -> None:
    """Read what is in the pipe `fd` now, without waiting: until it is empty,
    at its end, or `take` wants no more (which bounds it: a process writing
    on stdout is stopped by max_output, stderr by STDERR_KEPT)."""
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        if not data or not take(data):
            return


def _reap(proc: _Child) -> None:
    """Wait for the program to end (it was killed: at once). Interrupted (the
    caller's greenlet killed), it waits on, or the program would stay a zombie,
    and then lets the interruption go on."""
    interrupted: BaseException | None = None
    while proc.returncode is None:
        try:
            proc.wait()
        except BaseException as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def _close(pipe: Any) -> None:
    if pipe is not None:
        try:
            pipe.close()
        except OSError:
            pass


def reply_text(raw: bytes | str | None, limit: int = 200) -> str | None:
    """A program's (or a Python stage's) words made fit for an SMTP reply: the
    first line that is not blank, printable ASCII only (anything else becomes
    "?"), at most `limit` characters; None when nothing is left."""
    if not raw:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    for line in text.splitlines():
        line = line.strip()
        if line:
            return printable(line)[:limit].rstrip()
    return None
