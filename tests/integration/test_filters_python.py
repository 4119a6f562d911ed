"""Python stages (`filters:` with `call`) through the real server: in a thread or
as a greenlet, their verdicts, their failures, and the slot a stuck thread keeps."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import run_cli, wait_until, write_config
from tests.integration.adminapi import admin_of, total, with_admin
from tests.integration.test_filters import (
    EXAMPLES,
    STORED,
    access_lines,
    nothing_left,
    send,
    stored_body,
)
from tests.integration.wire import Wire

MODULE = '''
import json
import os
import threading
import time
from pathlib import Path

import gevent

from geosmtp.filters import Accept, Reject, Replace, TempFail, cooperative

HERE = Path(__file__).parent


def tag(envelope, message, context):
    """A rewrite, streamed: the Subject tagged, the rest copied in blocks."""
    out = context.new_message()
    context.new_message()  # made and never returned: removed by the server
    for line in message:
        if line.lower().startswith(b"subject:"):
            line = b"Subject: [py] " + line[8:].lstrip()
        out.write(line)
        if line == b"\\n":
            break
    while chunk := message.read(65536):
        out.write(chunk)
    return Replace(out)


@cooperative
def refuse(envelope, message, context):
    return Reject("listed", text=f"Sender <{envelope.sender_address}> refused\\r\\nsecond line")


def later(envelope, message, context):
    return TempFail("greylisted", code=250, status="2.0.0", text="Greylisted, try again later")


def record(envelope, message, context):
    seen = {
        "stage": context.stage,
        "queue_id": context.queue_id,
        "client": context.client,
        "role": context.role,
        "size": context.size,
        "hostname": context.hostname,
        "helo": envelope.helo,
        "sender": envelope.sender_address,
        "recipients": [r.mailbox.address for r in envelope.recipients],
        "first": message.readline().decode(),
        "main_thread": threading.get_native_id() == os.getpid(),
    }
    (HERE / "record.json").write_text(json.dumps(seen))
    return Accept()


def boom(envelope, message, context):
    raise RuntimeError("boom")


def garbage(envelope, message, context):
    return 42


def foreign(envelope, message, context):
    return Replace(object())


def hold(envelope, message, context):
    """Block (the thread) until the test lets go."""
    (HERE / "held").write_text("")
    while not (HERE / "release").exists():
        time.sleep(0.02)
    return Accept()


@cooperative
def nap(envelope, message, context):
    gevent.sleep(30)
'''


@pytest.fixture
def stages_module(tmp_path, monkeypatch) -> Path:
    """A module of stages, `pystages`, importable by servers started from here."""
    folder = tmp_path / "pymod"
    folder.mkdir()
    (folder / "pystages.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return folder


def call(name: str, function: str, **keys) -> dict:
    return {"name": name, "call": f"pystages:{function}", **keys}


def test_a_thread_stage_rewrites_the_message(make_server, stages_module):
    server = make_server({"filters": [call("tag", "tag")]})
    assert send(server)[0] == 250
    (path,) = server.messages("alice")
    assert stored_body(path) == STORED.replace(b"Subject: hello", b"Subject: [py] hello")
    assert access_lines(server, 1)[0]["stages"] == "tag:replace"
    assert server.tmp_files() == []  # the unused second file went too


def test_a_cooperative_stage_rejects_with_its_text_sanitised(make_server, stages_module):
    server = make_server({"filters": [call("refuse", "refuse")]})
    assert send(server) == (554, "5.7.1 Sender <carol@remote.example> refused")
    nothing_left(server)
    assert access_lines(server, 1)[0]["stages"] == "refuse:reject"


def test_a_tempfail_cannot_choose_a_code_of_another_class(make_server, stages_module):
    server = make_server({"filters": [call("later", "later")]})
    assert send(server) == (451, "4.3.0 Greylisted, try again later")
    nothing_left(server)


def test_what_a_stage_is_given(make_server, stages_module):
    server = make_server({"filters": [call("record", "record")]})
    assert send(server)[0] == 250
    seen = json.loads((stages_module / "record.json").read_text())
    line = access_lines(server, 1)[0]
    assert seen == {
        "stage": "record",
        "queue_id": line["queue"],
        "client": "127.0.0.1",
        "role": "mx",
        "size": int(line["size"]),
        "hostname": "mx.test.example",
        "helo": "client.example",
        "sender": "carol@remote.example",
        "recipients": ["alice@test.example"],
        "first": seen["first"],
        "main_thread": False,  # a thread of the filter pool
    }
    # The message starts at the Received: line: the Return-Path is the server's.
    assert seen["first"].startswith("Received: from client.example")


@pytest.mark.parametrize(
    ("function", "failure", "logged"),
    [
        ("boom", "error", "the callable raised RuntimeError"),
        ("garbage", "error", "returned 42, not a verdict"),
        ("foreign", "error", "returned Replace() of a file not from context.new_message()"),
    ],
)
def test_a_failing_stage_gets_on_failure(make_server, stages_module, function, failure, logged):
    server = make_server({"filters": [call("bad", function, on_failure="reject")]})
    assert send(server) == (554, "5.7.1 Error: message refused")
    assert access_lines(server, 1)[0]["stages"] == f"bad:reject({failure})"
    server.logged(logged)
    nothing_left(server)


def test_a_cooperative_stage_is_stopped_at_its_timeout(make_server, stages_module):
    server = make_server({"filters": [call("nap", "nap", timeout=0.3, on_failure="pass")]})
    assert send(server)[0] == 250
    assert send(server)[0] == 250
    lines = access_lines(server, 2)
    assert [line["stages"] for line in lines] == ["nap:accept(timeout)"] * 2


def test_a_thread_past_its_timeout_keeps_its_slot_until_it_ends(make_server, stages_module):
    server = make_server(
        with_admin(
            {
                "filter_concurrency": 1,
                "workers": 1,  # one process, one slot (with more, each has a slot at least)
                "timeouts": {"data_total": 1.5},
                "filters": [call("hold", "hold", on_failure="pass")],
            }
        )
    )
    api = admin_of(server)
    # The first message's stage runs out of time (the reply is due): it passes.
    assert send(server)[0] == 250
    assert total(api.metrics(), "geosmtp_filter_running") == 1  # its thread still runs
    # The second waits for the slot the thread holds, until its reply is due.
    assert send(server) == (451, "4.3.0 Error: local error in processing; try again later")
    (stages_module / "release").write_text("")
    wait_until(lambda: total(api.metrics(), "geosmtp_filter_running") == 0, what="the thread")
    assert send(server)[0] == 250
    stages = [line["stages"] for line in access_lines(server, 3)]
    assert stages == ["hold:accept(timeout)", "hold:tempfail(busy)", "hold:accept"]
    server.logged("no free slot (filter_concurrency 1) before the reply was due")
    metrics = api.metrics()
    assert total(metrics, "geosmtp_stage_failures_total", stage="hold", failure="busy") == 1
    assert server.tmp_files() == []


def test_a_callable_that_cannot_be_imported_stops_the_load(tmp_path, stages_module):
    for spec, message in [
        ("nosuch.module:f", "filters[0].call: cannot import 'nosuch.module': ModuleNotFoundError"),
        ("pystages:nothing", "filters[0].call: 'pystages' has no 'nothing'"),
        ("pystages:HERE", "filters[0].call: 'pystages:HERE' is not callable"),
        ("pystages", "filters[0].call: expected 'package.module:function', got 'pystages'"),
    ]:
        path = write_config(tmp_path, {"filters": [{"name": "x", "call": spec}]})
        result = run_cli("-c", str(path), "--check-config", cwd=tmp_path)
        assert result.returncode == 2, result
        assert message in result.stderr, result.stderr


def test_the_documented_example_stages(make_server, monkeypatch):
    """examples/filters/mystages.py, as docs/filters.md shows and configures it."""
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    server = make_server(
        {
            "filters": [
                {"name": "external", "call": "mystages:tag_subject"},
                {"name": "bounces", "call": "mystages:no_null_sender_to_many", "roles": ["mx"]},
            ]
        }
    )
    assert send(server)[0] == 250
    (path,) = server.messages("alice")
    assert stored_body(path) == STORED.replace(b"Subject: hello", b"Subject: [EXTERNAL] hello")
    with Wire.connect(server.host, server.port) as w:
        w.expect("EHLO client.example", 250)
        w.expect("MAIL FROM:<>", 250)
        w.expect("RCPT TO:<alice@test.example>", 250)
        w.expect("RCPT TO:<bob@test.example>", 250)
        w.expect("DATA", 354)
        assert w.cmd(b"Subject: bounce\r\n\r\nx\r\n.") == (554, "5.7.1 A bounce has one recipient")
    stages = [line["stages"] for line in access_lines(server, 2)]
    assert stages == ["external:replace,bounces:accept", "external:replace,bounces:reject"]


def test_an_exception_is_logged_once_with_its_traceback(make_server, stages_module):
    server = make_server({"filters": [call("bad", "boom", on_failure="pass")]})
    assert send(server)[0] == 250
    access_lines(server, 1)
    log = server.server_log()
    assert log.count("RuntimeError: boom") == 1, log  # the stage's WARNING, not gevent's too
    assert "filter bad: the callable raised RuntimeError" in log
    assert "unhandled error" not in log
