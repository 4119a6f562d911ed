"""Operating filter stages in a running server: switching them off and on through
the management API, `geosmtp ctl` and a reload; their metrics."""

from __future__ import annotations

import json
import os
import shutil

import yaml

from tests.integration.adminapi import admin_of, ctl, total, with_admin
from tests.integration.test_filters import EXAMPLES, access_lines, script, send, stage


def subject(server, box: str = "alice") -> bytes:
    newest = max(server.messages(box), key=lambda p: p.stat().st_mtime_ns)
    (line,) = [ln for ln in newest.read_bytes().splitlines() if ln.startswith(b"Subject:")]
    return line


def test_switching_a_stage_off_and_on_while_running(make_server):
    tag = stage("tag", [str(EXAMPLES / "tag-subject"), "[T]"], roles=["mx"], mail="local")
    server = make_server(with_admin({"filters": [tag]}))
    api = admin_of(server)
    assert send(server)[0] == 250
    assert subject(server) == b"Subject: [T] hello"

    result = ctl(server, "filter", "disable", "tag")
    assert (result.returncode, result.stdout) == (0, "filter tag disabled\n"), result.stderr
    assert send(server)[0] == 250
    assert subject(server) == b"Subject: hello"
    again = ctl(server, "filter", "disable", "tag")
    assert again.stdout == "filter tag was already disabled\n"
    assert api.config()["filters"][0]["enabled"] is False  # it is the running config

    listing = ctl(server, "filters")
    assert listing.returncode == 0, listing.stderr
    header, row, summary = listing.stdout.splitlines()
    assert header.split() == [
        "NAME", "KIND", "ENABLED", "ROLES", "MAIL", "ON_FAILURE", "RUNS", "REFUSED", "FAILED"
    ]  # fmt: skip
    assert row.split() == ["tag", "command", "no", "mx", "local", "tempfail", "1", "0", "0"]
    assert summary == "1 filters; 0 of 16 slots in use, 0 waiting"

    reply = api.request("PATCH", "/api/v1/filters/tag", {"enabled": True})
    assert reply.status == 200, reply.body
    assert reply.json["changed"] == ["enabled"] and reply.json["filter"]["enabled"] is True
    assert send(server)[0] == 250
    assert subject(server) == b"Subject: [T] hello"
    server.logged("admin changed filter tag: enabled=True")

    # A reload goes back to the file, which has it on: off through the API, then reload.
    api.ok("PATCH", "/api/v1/filters/tag", {"enabled": False})
    result = api.ok("POST", "/api/v1/reload")
    assert result["changed"] == ["filters"]
    assert api.get("/api/v1/filters/tag")["enabled"] is True
    stages = [line.get("stages") for line in access_lines(server, 3)]
    assert stages == ["tag:replace", None, "tag:replace"]


def test_the_filters_endpoint_and_its_errors(make_server, tmp_path):
    refuse = script(tmp_path, "refuse", "#!/bin/sh\necho 'No thanks' >&2\nexit 20\n")
    server = make_server(
        with_admin(
            {
                "filter_concurrency": 3,
                "filters": [stage("cat", ["cat"]), stage("refuse", [refuse], timeout=5)],
            }
        )
    )
    api = admin_of(server)
    assert send(server) == (554, "5.7.1 No thanks")
    listing = api.get("/api/v1/filters")
    assert listing["concurrency"] == {"limit": 3, "running": 0, "waiting": 0}
    assert listing["count"] == 2
    cat, refused = listing["filters"]
    assert cat == {
        "name": "cat",
        "kind": "command",
        "command": [os.path.abspath(shutil.which("cat"))],  # found on PATH at load
        "call": None,
        "enabled": True,
        "roles": None,
        "mail": "all",
        "timeout": 120,
        "max_output": None,
        "on_failure": "tempfail",
        "runs": {"accept": 0, "replace": 1, "tempfail": 0, "reject": 0},
        "failures": {},
    }
    assert refused["runs"]["reject"] == 1 and refused["timeout"] == 5
    assert api.get("/api/v1/filters/refuse") == refused

    for method, path, body, status, error in [
        ("GET", "/api/v1/filters/nope", None, 404, "no filter named 'nope'"),
        ("PATCH", "/api/v1/filters/nope", {"enabled": True}, 404, "no filter named 'nope'"),
        ("PATCH", "/api/v1/filters/cat", [1], 400, "the body must be a JSON object"),
        (
            "PATCH",
            "/api/v1/filters/cat",
            {"timeout": -1},
            400,
            "filters[0].timeout: expected a positive number, got -1",
        ),
        ("PATCH", "/api/v1/filters/cat", {"colour": "red"}, 400, "filters[0].colour: unknown key"),
        (
            "PATCH",
            "/api/v1/filters/cat",
            {"name": "dog"},
            400,
            "name: cannot be changed here; edit the config file and reload",
        ),
        (
            "POST",
            "/api/v1/filters/cat",
            None,
            405,
            "POST /api/v1/filters/cat: use GET, HEAD, PATCH",
        ),
    ]:
        reply = api.request(method, path, body)
        assert (reply.status, reply.error) == (status, error), (method, path)
    # Nothing above changed anything.
    assert api.get("/api/v1/filters")["filters"] == [cat, refused]
    missing = ctl(server, "filter", "enable", "nope")
    assert (missing.returncode, missing.stderr) == (
        1,
        "geosmtp ctl: 404: no filter named 'nope'\n",
    )
    shown = ctl(server, "filter", "show", "refuse")
    assert json.loads(shown.stdout) == refused
    raw = ctl(server, "filters", "--json")
    assert json.loads(raw.stdout)["count"] == 2


def test_stage_metrics(make_server, tmp_path):
    crash = script(tmp_path, "crash", "#!/bin/sh\nexit 3\n")
    server = make_server(
        with_admin({"filters": [stage("cat", ["cat"]), stage("crash", [crash], on_failure="pass")]})
    )
    api = admin_of(server)
    text = api.exposition()
    # Declared at start, at 0, so a dashboard sees every stage before its first run.
    assert 'geosmtp_stage_runs_total{stage="crash",verdict="reject"} 0.0' in text
    assert "geosmtp_filter_slots 16.0" in text
    for _ in range(2):
        assert send(server)[0] == 250
    metrics = api.quiet()
    assert total(metrics, "geosmtp_stage_runs_total", stage="cat", verdict="replace") == 2
    assert total(metrics, "geosmtp_stage_runs_total", stage="crash", verdict="accept") == 2
    assert total(metrics, "geosmtp_stage_failures_total", stage="crash", failure="exit=3") == 2
    assert total(metrics, "geosmtp_stage_seconds_count", stage="cat") == 2
    assert total(metrics, "geosmtp_stage_seconds_sum", stage="cat") > 0
    assert total(metrics, "geosmtp_filter_running") == 0
    assert total(metrics, "geosmtp_filter_waiting") == 0
    assert total(metrics, "geosmtp_messages_accepted_total") == 2


def test_a_refusal_counts_as_the_filter_stage(make_server, tmp_path):
    refuse = script(tmp_path, "refuse", "#!/bin/sh\nexit 20\n")
    server = make_server(with_admin({"filters": [stage("refuse", [refuse])]}))
    api = admin_of(server)
    assert send(server)[0] == 554
    metrics = api.quiet()
    assert total(metrics, "geosmtp_messages_rejected_total", stage="filter") == 1
    assert total(metrics, "geosmtp_messages_rejected_total", stage="storage") == 0


def test_a_reload_adds_and_removes_stages(make_server):
    server = make_server(with_admin())
    api = admin_of(server)
    assert send(server)[0] == 250
    config = yaml.safe_load(server.config_path.read_text())
    config["filters"] = [stage("tag", [str(EXAMPLES / "tag-subject"), "[R]"])]
    config["filter_concurrency"] = 4
    server.config_path.write_text(yaml.safe_dump(config))
    result = api.ok("POST", "/api/v1/reload")
    assert result["changed"] == ["filter_concurrency", "filters"]
    assert api.get("/api/v1/filters")["concurrency"]["limit"] == 4
    assert send(server)[0] == 250
    assert subject(server) == b"Subject: [R] hello"
    stages = [line.get("stages") for line in access_lines(server, 2)]
    assert stages == [None, "tag:replace"]
