"""What reaches a log line: `logs.clean`, the server log's patcher, and the
escape they share with the admin tools (`printable.escape`)."""

from __future__ import annotations

import io
import os

import pytest
from loguru import logger

from geosmtp import logs, printable
from geosmtp.printable import escape

#: Not printable: C0/C1 controls, line and paragraph separators, bidi
#: controls, a zero-width joiner, a no-break space, a lone surrogate (an
#: undecodable octet), private use, unassigned, a tag character.
UNPRINTABLE = {
    "\x00": "\\x00",
    "\t": "\\x09",
    "\n": "\\x0a",
    "\r": "\\x0d",
    "\x1b": "\\x1b",
    "\x7f": "\\x7f",
    "\x85": "\\x85",
    "\x9b": "\\x9b",
    "\xa0": "\\xa0",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
    "\u202e": "\\u202e",
    "\u2066": "\\u2066",
    "\u200d": "\\u200d",
    "\u3000": "\\u3000",
    "\ufeff": "\\ufeff",
    "\udc85": "\\udc85",
    "\ue000": "\\ue000",
    "\U000e0001": "\\U000e0001",
    "\U0010ffff": "\\U0010ffff",
}


@pytest.mark.parametrize(("char", "escaped"), UNPRINTABLE.items())
def test_every_unprintable_character_is_escaped(char, escaped):
    assert logs.clean(f"<a{char}b@example.org>") == f"<a{escaped}b@example.org>"
    assert escape(char * 2) == escaped * 2


@pytest.mark.parametrize(
    "text", ["<alice@example.org>", "a b", "jürgen@exämple.org", "用户", "\\x0a", "🙂", ""]
)
def test_printable_text_is_kept(text):
    assert logs.clean(text) == text


def test_a_cleaned_value_is_one_line_for_every_reader():
    value = "x\u2028forged=1\x85y\u2029z\r\nw\x1c\x1d\x1e\x0b\x0c"
    cleaned = logs.clean(value)
    assert cleaned.splitlines() == [cleaned]
    assert cleaned.isprintable()


def test_clean_shortens_before_escaping():
    assert logs.clean("\u2028" * 600, limit=3) == "\\u2028" * 3 + "..."


def test_escape_remembers_a_bounded_number_of_characters():
    text = "".join(chr(c) for c in range(0xE000, 0xF8FF))  # private use: all escaped
    assert escape(text) == "".join(f"\\u{c:04x}" for c in range(0xE000, 0xF8FF))
    assert len(printable._TABLE) <= 4096


def test_the_server_log_escapes_every_message(tmp_path):
    """`setup`'s patcher: whatever a message's arguments held, log.txt gets one
    printable line; the access log's batches and a worker's forwarded lines
    (already escaped there) are written as they are."""
    out = io.StringIO()
    logger.remove()
    logger.configure(patcher=logs.escape_message)
    logger.add(out, format="{message}", filter=logs._is_server)
    try:
        logger.info("report to <{}>", "a\u2028forged\x85b\u202ec\xa0d")
        logger.bind(forwarded=True).opt(raw=True).info("from a worker\n")
        logs.access.opt(raw=True).info("not here\n")
    finally:
        logger.remove()
        logger.configure(patcher=lambda record: None)
    assert out.getvalue().splitlines() == [
        "report to <a\\u2028forged\\x85b\\u202ec\\xa0d>",
        "from a worker",
    ]


def test_a_library_line_is_one_record_whatever_it_holds():
    """`LogWriter` (gevent's WSGI request lines): a request line with "\\x85"
    or "\\r" in it (decoded as latin-1) once made three records, one forged."""
    out = io.StringIO()
    logger.remove()
    sink = logger.add(out, format="{message}", level="DEBUG")
    try:
        writer = logs.LogWriter("DEBUG", "admin")
        forged = '"POST /api/v1/reload HTTP/1.1" 200 66'
        writer.write(f'127.0.0.1 - - "GET /x\x85{forged}\rHTTP/1.1" 400 -\n')
        writer.write("Traceback (most recent call last):\n  File 'x'\n")
    finally:
        logger.remove(sink)
    assert out.getvalue().splitlines() == [
        f'admin: 127.0.0.1 - - "GET /x\\x85{forged}\\x0dHTTP/1.1" 400 -',
        "admin: Traceback (most recent call last):",
        "admin:   File 'x'",
    ]


SECRET_PARTS = ("hunter2", "not", "for", "logs")


def _fails_holding(secret: str) -> None:
    password = secret  # a local a traceback with diagnose=True would print
    raise ValueError("failed after", len(password), "characters")


@pytest.mark.parametrize("where", ["setup", "worker"])
def test_a_traceback_shows_no_variable_values(tmp_path, where):
    """loguru's default (diagnose=True) writes each frame's variables into
    the traceback: a password or a message's text among them."""
    from geosmtp.config import Log
    from geosmtp.server import logpipe

    log = Log(dir=tmp_path / "logs", level="INFO")
    read, write = os.pipe()
    try:
        if where == "setup":
            logs.setup(log, console=False)
        else:
            logpipe.forward(write, log)
        try:
            _fails_holding("-".join(SECRET_PARTS))  # the source line shows no value
        except ValueError:
            logger.exception("session X: internal error")
        logger.complete()
        if where == "setup":
            text = (log.dir / "log.txt").read_text()
        else:
            os.set_blocking(read, False)
            text = os.read(read, 1 << 20).decode(errors="replace")
    finally:
        logger.remove()
        logger.configure(patcher=lambda record: None)
        os.close(read)
        os.close(write)
    assert "session X: internal error" in text
    assert "ValueError: ('failed after', 20, 'characters')" in text
    assert "-".join(SECRET_PARTS) not in text


def test_an_access_value_with_an_escape_or_a_backslash_is_quoted():
    r"""A client's own `\u2028` (six printable characters) once looked the same
    in access.log as a real U+2028 escaped; now a value that holds either is
    quoted, and inside quotes a client's backslash is doubled."""
    line = logs.access_line(
        real="<a\u2028b@x>", typed="<a\\u2028b@x>", plain="<p@x>", spaced="a b", empty=""
    )
    assert line == (r'real="<a\u2028b@x>" typed="<a\\u2028b@x>" plain=<p@x> spaced="a b" empty=""')
    assert line.isprintable()


def test_a_line_below_the_server_log_level_builds_no_record_and_access_lines_still_go(tmp_path):
    """Issue 20: access lines are logged at their own level, above the server
    log's, so the access sink never lowers loguru's minimum: with the server
    log at WARNING a `logger.info` (a relayed message's `done` line) is dropped
    before loguru builds its record (the patcher never sees it); the access
    log is written as before, and nothing of it goes to log.txt."""
    from geosmtp.config import Log

    built: list[str] = []
    log_dir = tmp_path / "logs"
    try:
        logs.setup(Log(dir=log_dir, level="WARNING"), console=False)
        logger.configure(patcher=lambda record: built.append(record["message"]))
        logger.info("queue {}: done", "Q1")
        logger.warning("kept")
        logs.access_log.write("queue=Q1 outcome=sent")
        logs.access_log.flush()
    finally:
        logger.remove()
        logger.configure(patcher=lambda record: None)
    assert "queue Q1: done" not in built
    assert "kept" in built
    assert (log_dir / "access.log").read_text().endswith(" queue=Q1 outcome=sent\n")
    server_log = (log_dir / "log.txt").read_text()
    assert "kept" in server_log and "done" not in server_log and "outcome" not in server_log


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_budget_writes_its_burst_then_one_an_interval_with_the_count_held_back():
    clock = Clock()
    budget = logs.LineBudget(3, 6.0, clock)
    assert [budget.take() for _ in range(3)] == [0, 0, 0]  # the burst
    assert [budget.take() for _ in range(5)] == [None] * 5  # held back, counted
    clock.now += 5.9
    assert budget.take() is None  # not a whole line's worth yet
    clock.now += 0.1
    assert budget.take() == 6  # the next line says how many it did not write
    assert budget.take() is None
    clock.now += 60  # a quiet minute refills the burst, no more
    assert [budget.take() for _ in range(4)] == [1, 0, 0, None]


def test_a_budget_of_one_a_minute_is_the_refusal_lines_rule():
    clock = Clock()
    budget = logs.LineBudget(1, 60.0, clock)
    assert budget.take() == 0
    assert budget.take() is None
    clock.now += 59
    assert budget.take() is None
    clock.now += 1
    assert budget.take() == 2
    assert logs.held_back(2) == " (and 2 more since the last such line)"
    assert logs.held_back(0) == ""
