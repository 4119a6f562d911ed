"""Operating the outbound queue: /api/v1/queue, `geosmtp queue`, and the queue metrics.

A real relay set-up as in test_relay.py (a private dnsmasq for remote.test's
MX, a scripted sink on 127.0.0.2), a geosmtp started through its CLI with the
admin API on, and a sink that answers 451 so entries stay queued
(`relay.retry_schedule: [3600]`: nothing is retried unless flushed).
"""

from __future__ import annotations

import contextlib
import json
import smtplib
import subprocess
import sys

import pytest

from tests.conftest import listeners, start_server, users, wait_until
from tests.integration.adminapi import TOKEN, admin_of, admin_section
from tests.integration.dns_server import dns_server, remote_mx
from tests.integration.smtp_sink import Script, Sink, free_port_on

PASSWORD = "queue-ops-pw"
LATER = "451 4.3.0 try later"


def message(subject: str) -> bytes:
    return f"From: alice@test.example\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()


@pytest.fixture
def relay_setup(make_server, tmp_path):
    """A sink as remote.test's MX on 127.0.0.2, and a geosmtp relaying to it, admin on."""

    def start(script: Script):  # type: ignore[no-untyped-def]
        port = free_port_on("127.0.0.2")
        sink = stack.enter_context(Sink(script, address="127.0.0.2", port=port))
        dns = stack.enter_context(dns_server(remote_mx("127.0.0.2"), tmp_path / "dns"))
        config = {
            "listeners": listeners("submission"),
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
            "relay": {"mx_port": port, "retry_schedule": [3600]},
            "dns": dns.config(),
            **admin_section(),
        }
        server = make_server(config)
        return server, sink, admin_of(server), config

    with contextlib.ExitStack() as stack:
        yield start


def submit(server, rcpts: list[str], subject: str) -> str:  # type: ignore[no-untyped-def]
    """Send as alice; the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
        client.login("alice", PASSWORD)
        client.mail("alice@test.example")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(message(subject))
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def queue_cmd(server, *args: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    """`python -m geosmtp queue -c CONFIG ARGS...`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "geosmtp", "queue", "-c", str(server.config_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def entry(api, queue_id: str) -> dict | None:  # type: ignore[no-untyped-def]
    reply = api.request("GET", f"/api/v1/queue/{queue_id}")
    if reply.status == 404:
        return None
    assert reply.status == 200, reply.body
    return reply.json


def attempted(api, queue_id: str, attempts: int) -> dict | None:  # type: ignore[no-untyped-def]
    """The entry once every recipient has had `attempts` attempts and none is in flight."""
    e = entry(api, queue_id)
    if e and not e["in_flight"] and all(r["attempts"] >= attempts for r in e["recipients"]):
        return e
    return None


def sent_to_sink(sink: Sink, subject: str) -> list:
    """Every whole message with this subject the sink was sent, whatever it answered."""
    return [t for t in sink.transactions if t.complete and f"Subject: {subject}".encode() in t.data]


def queue_files(server) -> list[str]:  # type: ignore[no-untyped-def]
    root = server.mail_dir / ".queue"
    return sorted(p.name for p in [*root.glob("records/*"), *root.glob("messages/*")])


def test_list_show_hold_flush_release_and_metrics(relay_setup):
    server, sink, api, _ = relay_setup(Script(final_replies=[LATER]))
    a = submit(server, ["bob@remote.test", "carol@remote.test"], "held one")
    b = submit(server, ["dave@remote.test"], "other one")
    first = wait_until(lambda: attempted(api, a, 1), what="the first attempt of A")
    wait_until(lambda: attempted(api, b, 1), what="the first attempt of B")

    # show (API): the record, each recipient's state and last error.
    assert first["sender"] == "alice@test.example"
    assert first["auth_user"] == "alice" and first["held"] is False
    assert [r["address"] for r in first["recipients"]] == ["bob@remote.test", "carol@remote.test"]
    for r in first["recipients"]:
        assert (r["state"], r["attempts"], r["status"]) == ("pending", 1, "4.3.0")
        assert LATER in r["last_error"] and r["next_attempt"].endswith("Z")

    # list (API and CLI).
    listing = api.get("/api/v1/queue")
    assert listing["count"] == 2 and listing["held"] == 0
    assert [e["id"] for e in listing["entries"]] == [a, b]
    assert listing["oldest_age_seconds"] >= listing["entries"][1]["age_seconds"]
    out = queue_cmd(server, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "AGE", "SIZE", "STATE", "SENDER", "RECIPIENTS"]
    assert lines[1].startswith(a) and "queued  <alice@test.example>" in lines[1]
    assert (
        lines[1].endswith(f": smtp; {LATER}") and "bob@remote.test  pending, 1 attempt" in lines[1]
    )
    assert lines[2].strip().startswith("carol@remote.test  pending, 1 attempt")
    assert lines[3].startswith(b) and "dave@remote.test" in lines[3]
    assert lines[-1].startswith("2 messages, 0 held, oldest ")
    shown = queue_cmd(server, "show", a)
    assert shown.returncode == 0, shown.stderr
    assert f"id           {a}" in shown.stdout.splitlines()
    assert "auth_user    alice" in shown.stdout and "  <carol@remote.test>" in shown.stdout
    assert f"    last_error   smtp; {LATER}" in shown.stdout
    assert json.loads(queue_cmd(server, "show", a, "--json").stdout)["id"] == a

    # hold: kept in the record on disk; a flush then tries B, not A.
    held = queue_cmd(server, "hold", a)
    assert (held.returncode, held.stdout) == (0, f"{a} held\n")
    assert queue_cmd(server, "hold", a).stdout == f"{a} was held already\n"
    record = server.mail_dir / ".queue" / "records" / f"{a}.json"
    wait_until(lambda: json.loads(record.read_text())["held"], what="the hold saved")
    assert entry(api, a)["held"] and all(
        r["next_attempt"] is None for r in entry(api, a)["recipients"]
    )
    one = queue_cmd(server, "flush", a)
    assert (one.returncode, one.stdout) == (0, f"{a} is held: not tried until released\n")
    flushed = queue_cmd(server, "flush")
    assert (flushed.returncode, flushed.stdout) == (
        0,
        "flushed 1 message; 1 held, not tried until released\n",
    )
    wait_until(lambda: attempted(api, b, 2), what="B tried again")
    assert len(sent_to_sink(sink, "other one")) == 2
    assert len(sent_to_sink(sink, "held one")) == 1  # flushed with B, but held
    assert attempted(api, a, 1)["recipients"][0]["attempts"] == 1
    assert "held" in queue_cmd(server, "list").stdout.splitlines()[1]

    # release: tried at once, and now the sink takes it.
    sink.script.final_replies = ["250 2.0.0 ok"]
    released = queue_cmd(server, "release", a)
    assert (released.returncode, released.stdout) == (0, f"{a} released, to be tried now\n")
    wait_until(lambda: entry(api, a) is None, what="A delivered")
    (tx,) = [t for t in sent_to_sink(sink, "held one") if t.final_reply.startswith("250")]
    assert tx.rcpts == ["bob@remote.test", "carol@remote.test"]
    assert not record.exists()
    gone = queue_cmd(server, "show", a)
    assert (gone.returncode, gone.stdout) == (1, "")
    assert gone.stderr == f"geosmtp queue: 404: no queued message {a}\n"
    assert queue_cmd(server, "flush", b).stdout == f"flushed {b}\n"
    wait_until(lambda: entry(api, b) is None, what="B delivered")
    assert queue_cmd(server, "list").stdout == "the queue is empty\n"

    # The metrics: A deferred twice (one attempt, two recipients) then sent
    # twice; B deferred twice then sent once; five attempts in all.
    text = api.exposition()
    for line in (
        "geosmtp_queue_entries 0.0",
        "geosmtp_queue_held_entries 0.0",
        "geosmtp_queue_oldest_age_seconds 0.0",
        'geosmtp_relay_deliveries_total{result="sent"} 3.0',
        'geosmtp_relay_deliveries_total{result="deferred"} 4.0',
        'geosmtp_relay_deliveries_total{result="bounced"} 0.0',
        "geosmtp_relay_attempt_seconds_count 5.0",
    ):
        assert line in text.splitlines(), line
    stats = api.stats()
    assert stats["queue"] == {
        "entries": 0,
        "held": 0,
        "oldest_age_seconds": 0.0,
        "quarantined": 0,
        "deliveries": {"sent": 3, "deferred": 4, "bounced": 0},
    }


def test_queue_gauges_while_queued(relay_setup):
    server, _sink, api, _ = relay_setup(Script(final_replies=[LATER]))
    a = submit(server, ["bob@remote.test"], "gauged")
    wait_until(lambda: attempted(api, a, 1), what="the first attempt")
    api.ok("POST", f"/api/v1/queue/{a}/hold")
    metrics = api.metrics()
    assert metrics["geosmtp_queue_entries"] == 1.0
    assert metrics["geosmtp_queue_held_entries"] == 1.0
    age = metrics["geosmtp_queue_oldest_age_seconds"]
    assert 0 < age < 60
    stats = api.stats()["queue"]
    assert (stats["entries"], stats["held"], stats["deliveries"]["deferred"]) == (1, 1, 1)


def test_delete(relay_setup):
    server, _sink, api, _ = relay_setup(Script(final_replies=[LATER]))
    a = submit(server, ["bob@remote.test"], "doomed")
    wait_until(lambda: attempted(api, a, 1), what="the first attempt")
    assert queue_files(server) == [a, f"{a}.json"]
    deleted = queue_cmd(server, "delete", a)
    assert (deleted.returncode, deleted.stdout, deleted.stderr) == (0, f"deleted {a}\n", "")
    assert queue_files(server) == []
    assert api.get("/api/v1/queue") == {
        "count": 0,
        "held": 0,
        "oldest_age_seconds": 0.0,
        "quarantined": 0,
        "entries": [],
    }
    again = queue_cmd(server, "delete", a)
    assert (again.returncode, again.stderr) == (1, f"geosmtp queue: 404: no queued message {a}\n")
    wait_until(
        lambda: f"queue {a}: deleted by the administrator" in server.server_log(),
        what="the log line",
    )
    assert server.messages("alice") == []  # no report to the sender


def test_api_answers(relay_setup):
    server, _sink, api, _ = relay_setup(Script(final_replies=[LATER]))
    a = submit(server, ["bob@remote.test"], "api")
    wait_until(lambda: attempted(api, a, 1), what="the first attempt")
    assert api.ok("POST", f"/api/v1/queue/{a}/hold") == {"held": a, "changed": True}
    assert api.ok("POST", f"/api/v1/queue/{a}/flush") == {"flushed": a, "held": True}
    assert api.ok("POST", "/api/v1/queue/flush") == {"flushed": 0, "held": 1}
    assert api.ok("POST", f"/api/v1/queue/{a.lower()}/release") == {"released": a, "changed": True}
    assert api.ok("POST", f"/api/v1/queue/{a}/release") == {"released": a, "changed": False}
    for method, path in [
        ("GET", "/api/v1/queue/FFFF"),
        ("DELETE", "/api/v1/queue/FFFF"),
        ("POST", "/api/v1/queue/FFFF/flush"),
        ("POST", "/api/v1/queue/FFFF/hold"),
        ("POST", "/api/v1/queue/FFFF/release"),
    ]:
        reply = api.request(method, path)
        assert (reply.status, reply.error) == (404, "no queued message FFFF"), (method, path)
    odd = api.request("GET", "/api/v1/queue/a%0Ab")
    assert odd.status == 404 and "\n" not in odd.error
    for method, path, allow in [
        ("GET", "/api/v1/queue/flush", "POST"),
        ("POST", "/api/v1/queue", "GET, HEAD"),
        ("GET", f"/api/v1/queue/{a}/hold", "POST"),
        ("POST", f"/api/v1/queue/{a}", "GET, HEAD, DELETE"),
    ]:
        reply = api.request(method, path)
        assert reply.status == 405 and reply.headers["allow"] == allow, (method, path)
    assert api.request("GET", "/api/v1/queue", token=None).status == 401
    assert api.request("DELETE", f"/api/v1/queue/{a}", token="x" * 32).status == 401
    assert api.get(f"/api/v1/queue/{a}")["id"] == a  # untouched by the refusals


def test_hold_survives_a_restart(relay_setup):
    server, sink, api, config = relay_setup(Script(final_replies=[LATER]))
    a = submit(server, ["bob@remote.test"], "kept")
    wait_until(lambda: attempted(api, a, 1), what="the first attempt")
    api.ok("POST", f"/api/v1/queue/{a}/hold")
    record = server.mail_dir / ".queue" / "records" / f"{a}.json"
    wait_until(lambda: json.loads(record.read_text())["held"], what="the hold saved")
    assert server.stop() == 0
    again = start_server(server.root, {**config, **admin_section()})
    try:
        api2 = admin_of(again)
        e = entry(api2, a)
        assert e["held"] and e["recipients"][0]["attempts"] == 1
        sink.script.final_replies = ["250 2.0.0 ok"]
        api2.ok("POST", f"/api/v1/queue/{a}/release")
        wait_until(lambda: entry(api2, a) is None, what="delivered after release")
        assert len(sent_to_sink(sink, "kept")) == 2
        assert queue_files(again) == []
    finally:
        again.stop()


# Issue 18: one bad record stopped the server, lost its message, or broke the
# API. Each was found from outside with a record that is valid JSON; now each
# goes to quarantine/ and the rest of the queue is delivered.
SPOILED = [
    # Stopped the start with a traceback, after the listeners were bound.
    ("recipients[0].next_attempt", ("recipients", 0, "next_attempt"), "soon"),
    # Taken as done: the record and the message removed, with no delivery nor report.
    ("recipients[0].state", ("recipients", 0, "state"), "sent"),
    # /metrics, /api/v1/stats and /api/v1/queue answered 500.
    ("arrival", ("arrival",), "yesterday"),
]


@pytest.mark.parametrize(("field", "path", "value"), SPOILED, ids=[s[0] for s in SPOILED])
def test_a_spoiled_record_is_quarantined_and_the_rest_delivered(relay_setup, field, path, value):
    server, sink, api, config = relay_setup(Script(final_replies=[LATER]))
    bad = submit(server, ["bob@remote.test"], "spoiled")
    good = submit(server, ["carol@remote.test", "dave@remote.test"], "healthy")
    wait_until(lambda: attempted(api, bad, 1) and attempted(api, good, 1), what="first attempts")
    assert server.stop() == 0  # a clean stop: both entries stay queued

    queue = server.mail_dir / ".queue"
    message = (queue / "messages" / bad).read_bytes()
    record = queue / "records" / f"{bad}.json"
    raw = json.loads(record.read_bytes())
    *parents, last = path
    target = raw
    for key in parents:
        target = target[key]
    target[last] = value
    record.write_text(json.dumps(raw))
    spoiled = record.read_bytes()

    sink.script.final_replies = ["250 2.0.0 ok"]
    again = start_server(server.root, {**config, **admin_section()})
    try:
        # The server started (every worker has loaded its share of the queue)
        # and serves: SMTP, and the API's three readers.
        wait_until(
            lambda: again.server_log().count(" started as ") == 2, what="every worker started"
        )
        client = smtplib.SMTP()
        try:
            assert client.connect("127.0.0.1", server.ports["submission"])[0] == 220
        finally:
            client.close()
        api2 = admin_of(again)
        for reader in ("/api/v1/stats", "/metrics", "/api/v1/queue"):
            reply = api2.request("GET", reader)
            assert reply.status == 200, (reader, reply.body)

        # The spoiled entry is in quarantine/, whole; the healthy one is queued
        # and delivered.
        assert sorted(p.name for p in (queue / "quarantine").iterdir()) == [bad, f"{bad}.json"]
        assert (queue / "quarantine" / bad).read_bytes() == message
        assert (queue / "quarantine" / f"{bad}.json").read_bytes() == spoiled
        listing = api2.get("/api/v1/queue")
        assert [e["id"] for e in listing["entries"]] == [good]
        assert listing["quarantined"] == 1
        api2.ok("POST", "/api/v1/queue/flush")
        wait_until(lambda: entry(api2, good) is None, what="the healthy entry delivered")
        (tx,) = [t for t in sink.completed if b"Subject: healthy" in t.data]
        assert tx.rcpts == ["carol@remote.test", "dave@remote.test"]
        assert not [t for t in sink.completed if b"Subject: spoiled" in t.data]
        assert queue_files(again) == []  # nothing left but quarantine/, nothing deleted there

        # Told: one WARNING line naming the file and the field, a metric, the stats.
        warnings = [
            line
            for line in again.server_log().splitlines()
            if "WARNING" in line and f"records/{bad}.json" in line
        ]
        assert len(warnings) == 1 and f"{field}: " in warnings[0], warnings
        assert "geosmtp_queue_quarantined_total 1.0" in api2.exposition().splitlines()
        assert api2.stats()["queue"]["quarantined"] == 1
        listed = queue_cmd(again, "list")
        assert listed.stdout.splitlines()[-1] == (
            "1 unusable entry in the queue folder's quarantine/ (see the server log)"
        )
        assert again.process.poll() is None
    finally:
        again.stop()


LINKED = [
    ("spool_dir", ".spool"),
    ("relay.queue_dir", ".queue"),
    ("relay.queue_dir", ".queue/messages"),
    ("relay.queue_dir", ".queue/records"),
    ("relay.queue_dir", ".queue/quarantine"),
]


@pytest.mark.parametrize(("key", "folder"), LINKED, ids=[f for _, f in LINKED])
def test_a_spool_or_queue_folder_that_is_a_link_stops_the_start(make_server, tmp_path, key, folder):
    """With `.queue/messages` -> a folder elsewhere, a relayed message was
    written there. Now the start is refused, naming the key and the link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tmp_path / "srv0" / "mail_dir" / folder
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    server = make_server(
        {"users": users(alice=PASSWORD), "auth": {"allow_plaintext": True}}, wait=False
    )

    def ended_or_serving() -> bool:
        if server.process.poll() is not None:
            return True
        try:  # it serves (as it did): relay a message, to show where it goes
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.login("alice", PASSWORD)
                client.sendmail("alice@test.example", ["bob@remote.test"], message("relayed"))
        except OSError:
            return False
        return True

    wait_until(ended_or_serving, timeout=20, what="the server to end (or serve)")
    assert sorted(p.name for p in outside.rglob("*")) == []  # nothing written there
    assert server.process.wait(timeout=10) == 2, server.stderr()
    assert server.stderr().splitlines()[-1] == (
        f"geosmtp: {key}: '{link}' is a symbolic link: the spool and the queue "
        "are never reached through one (give the real folder)"
    )
    assert link.is_symlink()


def test_cli_usage_and_unreachable(tmp_path):
    from tests.conftest import free_port, write_config

    port = free_port()
    path = write_config(tmp_path, {"admin": {"enabled": True, "port": port, "token": TOKEN}})
    cmd = [sys.executable, "-m", "geosmtp", "queue", "-c", str(path)]
    down = subprocess.run([*cmd, "list"], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.startswith(
        f"geosmtp queue: cannot reach the admin API at http://127.0.0.1:{port}: "
    ), down.stderr
    usage = subprocess.run([*cmd, "show"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "the following arguments are required: id" in usage.stderr
    nothing = subprocess.run([*cmd], capture_output=True, text=True, timeout=30)
    assert nothing.returncode == 2
