"""logs/access.log: one line per message or refused transaction, never split by a client.

The tests without a config of their own share one server and read the lines
written since each began (`SharedView`), with mailboxes of their own."""

from __future__ import annotations

import re
import shlex
import signal
import smtplib

import pytest

from tests.conftest import SharedView, wait_until
from tests.integration.wire import Wire

LINE_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} session=\S+ client=\S+ ")


def parse(line: str) -> dict[str, str]:
    """`key=value` fields after the timestamp; values may be quoted with backslash escapes."""
    fields = {}
    for item in shlex.split(line.split(" ", 1)[1]):
        key, _, value = item.partition("=")
        fields[key] = value
    return fields


@pytest.fixture(scope="module")
def module_server(make_module_server):
    return make_module_server()


@pytest.fixture
def server(module_server):
    """The module's server from this test on: each test waits for its own lines."""
    return SharedView.of(module_server)


def access_lines(server, count: int) -> list[dict[str, str]]:
    def enough() -> str | None:
        text = server.access_log()
        return text if text.count("\n") >= count else None

    text = wait_until(enough, what=f"{count} access log lines")
    lines = text.splitlines()
    assert len(lines) == count, text
    for line in lines:
        assert LINE_RE.match(line), line
    return [parse(line) for line in lines]


def test_one_line_per_message_with_every_field(server, box):
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.example")
        client.sendmail(
            "carol@remote.example",
            [f"{box}@test.example", f"{box}2@test.example"],
            b"Subject: one\r\nMessage-ID: <one@remote.example>\r\n\r\nbody\r\n",
        )
        client.sendmail("carol@remote.example", [f"{box}2@test.example"], b"\r\nno id\r\n")
    first, second = access_lines(server, 2)
    assert first["client"] == "127.0.0.1"
    assert first["helo"] == "client.example"
    assert first["from"] == "<carol@remote.example>"
    assert first["to"] == f"<{box}@test.example>,<{box}2@test.example>"
    assert first["msgid"] == "<one@remote.example>"
    assert first["result"] == "250"
    assert int(first["size"]) > 0
    assert first["session"] == second["session"]
    assert "msgid" not in second
    assert first["queue"] != second["queue"]
    # The queue id is the one the client was told, and the one in Received:.
    (stored,) = server.messages(box)
    assert f"id {first['queue']}".encode() in stored.read_bytes()


def test_rejected_transactions_are_logged(make_server):
    server = make_server({"limits": {"max_message_size": 1000}})
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        code, _ = w.cmd("RCPT TO:<someone@foreign.example>")
        assert code == 550
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("DATA", 354)
        code, _ = w.cmd(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 20 + b".")
        assert code == 552
    # One transaction, one line: the refused recipient is named in it.
    (too_big,) = access_lines(server, 1)
    assert too_big["result"] == "552"
    assert too_big["stage"] == "DATA"
    assert too_big["from"] == "<carol@remote.example>"
    assert too_big["to"] == "<alice@test.example>"
    assert too_big["refused"] == "<someone@foreign.example>:550"
    assert int(too_big["size"]) > 1000
    assert server.all_messages() == []


def test_client_text_never_splits_a_log_line(server, box):
    with Wire.connect(server.host, server.port) as w:
        # Bare CR and other controls in HELO are refused, so never logged raw.
        for bad in (b"EHLO evil\rinjected=1", b"EHLO evil\x0binjected", b"HELO a\x1b[31m"):
            code, _ = w.cmd(bad)
            assert code == 501
        w.expect("EHLO client.example", 250)
        w.expect('MAIL FROM:<"odd \\" sender"@remote.example>', 250)
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(
            b"Message-ID: <a\rresult=999\r\n  folded\x1b@x\nsession=fake>\r\n"
            b"Subject: s\r\n\r\nbody\r\n.",
            250,
        )
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect("DATA", 354)
        # Braces and markup are text to the logger, never format fields or colours.
        w.expect(b"Message-ID: <{0}{}{x}<red>@x>\r\n\r\nbody\r\n.", 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect("DATA", 354)
        folded = b"\r\n ".join([b"x" * 900] * 4)
        w.expect(b"Message-ID: <" + folded + b"@long>\r\n\r\nbody\r\n.", 250)
    first, braces, second = access_lines(server, 3)
    assert braces["msgid"] == "<{0}{}{x}<red>@x>"
    assert first["result"] == "250"
    assert first["from"] == '<"odd \\" sender"@remote.example>'
    assert "\r" not in first["msgid"] and "\x1b" not in first["msgid"]
    assert first["msgid"].startswith("<a")
    assert second["result"] == "250"
    assert len(second["msgid"]) < 1100  # shortened, not the whole 3000 octets
    log = server.access_log()
    assert "\r" not in log and "\x1b" not in log
    assert log.count("\n") == 3


def test_server_log_records_start_and_stop(make_server):
    server = make_server()  # its own: the test stops it
    server.logged("listening on [127.0.0.1]")
    assert server.stop() == 0
    log = server.server_log()
    assert "signal received" in log
    assert log.rstrip().endswith("stopped")


# ------------------------------------------- one line for every transaction


def _open_transaction(w: Wire, box: str = "alice") -> None:
    w.expect("EHLO client.example", 250)
    w.expect("MAIL FROM:<carol@remote.example>", 250)
    w.expect(f"RCPT TO:<{box}@test.example>", 250)


def test_a_client_lost_in_the_middle_of_data_is_logged(server, box):
    with Wire.connect(server.host, server.port) as w:
        _open_transaction(w, box)
        w.expect("DATA", 354)
        w.send(b"Subject: cut short\r\n\r\nhalf a mess")
    (line,) = access_lines(server, 1)
    assert line["result"] == "aborted" and line["reason"] == "lost"
    assert line["stage"] == "DATA" and line["to"] == f"<{box}@test.example>"
    assert server.all_messages() == [] and server.tmp_files() == []


def test_a_timeout_in_the_middle_of_data_is_logged(make_server):
    server = make_server({"timeouts": {"data_block": 0.3}})
    with Wire.connect(server.host, server.port) as w:
        _open_transaction(w)
        w.expect("DATA", 354)
        w.send(b"Subject: slow\r\n")
        code, text = w.reply()
        assert code == 421 and text.startswith("4.4.2"), text
    (line,) = access_lines(server, 1)
    assert (line["result"], line["reason"], line["stage"]) == ("aborted", "timeout", "DATA")


def test_a_stop_that_ends_a_data_is_logged(make_server):
    server = make_server({"timeouts": {"shutdown_grace": 0}})
    with Wire.connect(server.host, server.port) as w:
        _open_transaction(w)
        w.expect("DATA", 354)
        w.send(b"Subject: interrupted\r\n\r\nbody\r\n")
        server.process.send_signal(signal.SIGTERM)
        code, text = w.reply()
        assert code == 421 and text.startswith("4.3.2"), text
    assert server.process.wait(timeout=30) == 0
    (line,) = access_lines(server, 1)
    assert (line["result"], line["reason"], line["stage"]) == ("aborted", "shutdown", "DATA")
    assert server.all_messages() == [] and server.tmp_files() == []


def test_data_after_bdat_and_quit_is_logged(server, box):
    with Wire.connect(server.host, server.port) as w:
        _open_transaction(w, box)
        w.send(b"BDAT 3\r\nabc")
        assert w.reply()[0] == 250
        assert w.cmd("DATA")[0] == 503
        assert w.cmd("QUIT")[0] == 221
    (line,) = access_lines(server, 1)
    assert (line["result"], line["reason"], line["stage"]) == ("aborted", "quit", "BDAT")
    assert server.tmp_files() == []


def test_rset_and_a_new_greeting_end_a_transaction_with_a_line(server, box):
    with Wire.connect(server.host, server.port) as w:
        _open_transaction(w, box)
        w.expect("RSET", 250)
        w.expect("MAIL FROM:<dave@remote.example>", 250)
        w.expect("EHLO again.example", 250)  # abandons that transaction too
        w.expect("MAIL FROM:<erin@remote.example>", 250)
        w.expect(f"RCPT TO:<{box}@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"Subject: kept\r\n\r\nbody\r\n.", 250)
        w.expect("QUIT", 221)
    rset, ehlo, kept = access_lines(server, 3)
    assert (rset["result"], rset["reason"], rset["from"]) == (
        "aborted",
        "RSET",
        "<carol@remote.example>",
    )
    assert (ehlo["result"], ehlo["reason"], ehlo["from"]) == (
        "aborted",
        "EHLO",
        "<dave@remote.example>",
    )
    assert "to" not in ehlo  # no recipient had been given
    assert kept["result"] == "250" and kept["from"] == "<erin@remote.example>"


def test_refused_recipients_are_named_in_the_transactions_one_line(server, box):
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.example")
        refused = client.sendmail(
            "carol@remote.example", [f"{box}@test.example", "x@foreign.example"], b"\r\nhi\r\n"
        )
        assert list(refused) == ["x@foreign.example"]
    (line,) = access_lines(server, 1)
    assert line["result"] == "250" and line["to"] == f"<{box}@test.example>"
    assert line["refused"] == "<x@foreign.example>:550"


#: Characters that are not printable yet pass the protocol's checks somewhere:
#: line separators for `str.splitlines` (U+2028, U+0085), a bidi override
#: (U+202E), a no-break space (U+00A0).
UNPRINTABLE = "\u2028\u0085\u202e\u00a0"


def test_unicode_line_separators_and_bidi_overrides_are_escaped(make_server):
    """Each is written as an escape in both logs: `str.splitlines()` of
    access.log gives one record per transaction, and no log holds them raw."""
    server = make_server({"trusted_networks": ["127.0.0.1/32"]})
    sender = "s\u202e\u00a0x@remote.example"  # an address may hold these with SMTPUTF8
    with Wire.connect(server.host, server.port) as w:
        # Not in a host name: refused, so never logged.
        w.expect(f"EHLO evil{UNPRINTABLE}.example".encode(), 501)
        w.expect("EHLO client.example", 250)
        w.expect(f"MAIL FROM:<{sender}> SMTPUTF8".encode(), 250)
        w.expect("RCPT TO:<alice@test.example> NOTIFY=SUCCESS", 250)
        w.expect("DATA", 354)
        w.expect(f"Message-ID: <a{UNPRINTABLE}b@x>\r\n\r\nbody\r\n.".encode(), 250)
        w.expect("MAIL FROM:<carol@remote.example>", 250)
        w.expect("RCPT TO:<bob@test.example>", 250)
        w.expect("DATA", 354)
        w.expect(b"Message-ID: <plain@x>\r\n\r\nbody\r\n.", 250)
    _, second = access_lines(server, 2)
    assert second["msgid"] == "<plain@x>"
    access = server.access_log()
    first = access.splitlines()[0]
    assert len(access.splitlines()) == 2
    assert ' msgid="<a\\u2028\\x85\\u202e\\xa0b@x>" ' in first
    assert ' from="<s\\u202e\\xa0x@remote.example>" ' in first
    # The success report to the (remote) sender is logged in log.txt, with its address.
    log = wait_until(
        lambda: "delivered report to" in server.server_log() and server.server_log(),
        what="the report's line in log.txt",
    )
    assert "delivered report to <s\\u202e\\xa0x@remote.example>" in log
    for text in (access, log):
        assert not any(c in text for c in UNPRINTABLE)
