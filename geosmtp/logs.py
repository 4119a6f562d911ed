"""Logging with loguru: the server log and the access log.

- `logs/log.txt`: start/stop, listeners, errors; session detail at DEBUG.
- `logs/access.log`: one line per message or refused transaction, answering
  "who sent this mail, and when", and one per recipient of every delivery
  attempt of the outbound queue ("what became of it, and why"). Never
  bodies, never secrets.

Everything a client chose is passed through `clean()` first, and every
message of the server log through the same escape (`printable.escape`, a
loguru patcher set up by `setup()` and `logpipe.forward()`), so nothing
from the network can start a log line of its own, for a reader that splits
lines at LF or as `str.splitlines` does (U+2028, U+0085), nor reorder what a
terminal shows (bidi overrides): every character that is not printable but
the space is written as an escape (`\x0a`, `\u2028`).

Access lines are stamped when they happen and gathered in `access_log`; the
server's writer greenlet hands them to loguru in batches (`flush()`, every
100 ms). One loguru call per line from each client's greenlet cost about
100 µs (loguru asks `threading.current_thread()`, which under gevent builds a
dummy thread for every new greenlet) — a fifth of the server's time per
message at full load.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from loguru import logger

from .config import Log
from .printable import escape
from .storage.modes import LOG_DIR_MODE, make_folder, open_log_file

if TYPE_CHECKING:
    from loguru import Record  # a TypedDict of loguru's stubs, absent at run time

_SERVER_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"
_ACCESS_FORMAT = "{message}"  # access lines carry their own time stamp

access = logger.bind(access=True)

#: The level access lines are logged at: above every level of the server log,
#: so that the access sink never lowers loguru's minimum. With the server log
#: at WARNING a `logger.info` is then dropped at once, before loguru builds its
#: record (the time, the thread, which under gevent is a dummy thread made for
#: the greenlet, the patcher): about 60 µs a message in the relay bench, for
#: a line no sink takes. (At INFO an access sink at INFO cost nothing more.)
ACCESS_LEVEL = "ACCESS"


class LineBudget:
    """How many lines a kind of warning a stranger can cause may write: up to
    `burst` at once, then one every `interval` seconds (a token bucket), so a
    flood of refused connections cannot fill the disk with log lines. `take()`
    is None while the budget is spent (that line is counted, not written),
    else how many were held back since the last line written, for that line
    to say; held-back lines a quiet spell follows are not reported by a line,
    so the caller counts every event in a metric too."""

    __slots__ = ("burst", "clock", "held", "interval", "stamp", "tokens")

    def __init__(
        self, burst: int, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.held = 0

    def take(self) -> int | None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) / self.interval)
        self.stamp = now
        if self.tokens < 1.0:
            self.held += 1
            return None
        self.tokens -= 1.0
        held, self.held = self.held, 0
        return held


def held_back(count: int) -> str:
    """The tail of a line written after `count` held back by a `LineBudget`."""
    return f" (and {count} more since the last such line)" if count else ""


def _access_level() -> None:
    try:
        logger.level(ACCESS_LEVEL)
    except ValueError:  # not registered yet in this process
        logger.level(ACCESS_LEVEL, no=60)


_access_level()


#: Seconds between two writes of the gathered access lines: a line reaches
#: the file at most this long after the transaction ended.
FLUSH_INTERVAL = 0.1


class AccessLog:
    """Access-log lines, time-stamped on arrival and written in batches."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._second = -1
        self._prefix = ""

    def _stamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # the date part changes once a second
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            self._zone = time.strftime("%z", time.localtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}{self._zone}"

    def write(self, line: str) -> None:
        self._lines.append(f"{self._stamp()} {line}\n")

    def flush(self) -> None:
        if self._lines:
            batch = "".join(self._lines)
            self._lines.clear()
            access.opt(raw=True).log(ACCESS_LEVEL, batch)

    def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Write the gathered lines every `interval` seconds (the server's writer
        greenlet runs this until it is killed at the stop)."""
        while True:
            gevent.sleep(interval)
            self.flush()


access_log = AccessLog()


def _shortened(value: Any, limit: int) -> str:
    text = str(value)
    return text[:limit] + "..." if len(text) > limit else text


def clean(value: Any, limit: int = 512) -> str:
    """A client-supplied value made safe for one log line (escaped, shortened)."""
    return escape(_shortened(value, limit))


def access_line(**fields: Any) -> str:
    r"""`key=value` pairs. A value is quoted when it is empty or holds a space,
    a quote, a backslash or a character that is not printable; inside quotes
    `\\` is a backslash, `\"` a quote, and `\xHH`, `\uHHHH`, `\UHHHHHHHH` an
    escaped character, so a client's own backslashes never pass for escapes."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = ",".join(value)
        text = _shortened(value, 512)
        if not text or " " in text or '"' in text or "\\" in text or not text.isprintable():
            text = '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _is_access(record: Record) -> bool:
    return bool(record["extra"].get("access"))


def _is_server(record: Record) -> bool:
    return not record["extra"].get("access")


def escape_message(record: Record) -> None:
    """The loguru patcher: a server-log message as one line of printable text,
    whatever its arguments held (a sender, a remote's reply, a filter's words).
    Access lines are cleaned field by field and written in batches; a worker's
    forwarded line was escaped in the worker."""
    extra = record["extra"]
    if not extra.get("access") and not extra.get("forwarded"):
        record["message"] = escape(record["message"])


class LogWriter:
    """A file-like object that writes each line it is given to the server log.

    For libraries that log to a stream: gevent's WSGI server (the admin API's
    request and error lines) would otherwise write to stderr or nowhere.
    """

    def __init__(self, level: str, prefix: str) -> None:
        self.level = level
        self.prefix = prefix

    def write(self, text: str) -> None:
        # "\n" only: `splitlines` would also break at "\r", "\x85", "\u2028" and
        # the like, which a client can put in a request line (gevent decodes
        # it as latin-1) to forge a record; `clean` escapes those instead.
        for line in text.split("\n"):
            if line.strip():
                logger.log(self.level, "{}: {}", self.prefix, clean(line, 2000))

    def flush(self) -> None:
        pass


def capture_hub_errors(hub: Any) -> None:
    """Tracebacks gevent's hub would print to stderr (an exception nothing caught
    in a greenlet) go to the server log instead, where an operator looks."""

    def print_exception(context: Any, kind: Any, value: Any, tb: Any) -> None:
        logger.opt(exception=(kind, value, tb)).error("unhandled error in {!r}", context)

    hub.print_exception = print_exception


def add_sinks(server: Any, access: Any, level: str, **options: Any) -> None:
    """The server log's sink (at `level`) and the access log's, each with its
    format and filter, as the master's files and a worker's pipe both take
    them. A traceback names no variable's value (`diagnose=False`): a
    password or a message could be one (loguru's default prints them)."""
    options = {"diagnose": False, **options}
    logger.add(server, level=level, format=_SERVER_FORMAT, filter=_is_server, **options)
    logger.add(access, level=ACCESS_LEVEL, format=_ACCESS_FORMAT, filter=_is_access, **options)


def setup(log: Log, *, console: bool = True) -> None:
    """(Re)configure the sinks from the `log:` section of the config.

    The folder is made 0750 and the files 0640 (`storage.modes`): an operator
    in the server's group reads them. loguru hands `opener` on to `open()`, for
    the first file and for each one it starts after a rotation."""
    logger.remove()  # also loguru's default stderr sink
    logger.configure(patcher=escape_message)
    make_folder(log.dir, LOG_DIR_MODE)
    files = {
        "rotation": log.rotation,
        "retention": log.retention,
        "encoding": "utf-8",
        "opener": open_log_file,
        # A write that fails (a full disk) loses that line, reported on stderr,
        # and nothing else: mail never waits on, nor fails for, a log line.
        "catch": True,
    }
    add_sinks(log.dir / "log.txt", log.dir / "access.log", log.level, **files)
    if console:
        logger.add(
            sys.stderr, level=log.level, format=_SERVER_FORMAT, filter=_is_server, diagnose=False
        )
