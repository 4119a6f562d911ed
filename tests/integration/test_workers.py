"""The master and its workers: replacement, stop, reload, one server to the
admin API, and the outbound queue delivered exactly once across kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import tempfile
import time

import pytest
import yaml

from tests.conftest import free_port, start_server, users, wait_until
from tests.integration.adminapi import admin_of, with_admin
from tests.integration.smtp_sink import Script, Sink

WORKERS = 2


def workers_when(server, predicate, what: str) -> list[int]:
    """The worker pids, once `predicate(pids)` holds."""

    def check() -> list[int] | None:
        pids = server.workers()
        return pids if predicate(pids) else None

    return wait_until(check, what=what)


def started(server, count: int = WORKERS) -> list[int]:
    """The worker pids, once the master logged that all of them serve."""
    wait_until(lambda: "started as" in server.server_log(), what="every worker to serve")
    return workers_when(server, lambda pids: len(pids) == count, "the workers")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def send(server, rcpt: str = "alice@test.example", subject: str = "hi") -> None:
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.sendmail(
            "carol@remote.example", [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n".encode()
        )


def test_every_worker_serves_and_a_killed_one_is_replaced(make_server):
    server = make_server({"workers": WORKERS})
    first = started(server)
    assert len(first) == WORKERS and server.process.pid not in first
    os.kill(first[0], signal.SIGKILL)
    replaced = workers_when(
        server, lambda pids: len(pids) == WORKERS and first[0] not in pids, "a new worker"
    )
    assert first[1] in replaced
    wait_until(lambda: "ended unexpectedly: killed by signal 9" in server.server_log())
    for i in range(6):  # whichever worker takes the connection, the mail is stored
        send(server, subject=f"m{i}")
    assert len(server.messages("alice")) == 6


def test_sigterm_stops_every_worker(make_server):
    server = make_server({"workers": WORKERS})
    pids = started(server)
    assert server.stop() == 0
    assert not any(alive(pid) for pid in pids)
    log = server.server_log()
    assert "signal received, stopping" in log and log.rstrip().endswith("stopped")


def test_killing_the_master_takes_the_workers_with_it(make_server):
    server = make_server({"workers": WORKERS})
    pids = started(server)
    server.process.kill()
    server.process.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in pids), what="the workers to end")


def test_sighup_starts_new_workers_on_the_new_config(make_server):
    server = make_server({"workers": WORKERS, "vrfy": False})
    old = started(server)
    config = yaml.safe_load(server.config_path.read_text())
    config["vrfy"] = True
    server.config_path.write_text(yaml.safe_dump(config))
    server.process.send_signal(signal.SIGHUP)
    new = workers_when(
        server,
        lambda pids: len(pids) == WORKERS and not set(pids) & set(old),
        "the old workers to be replaced",
    )
    assert len(new) == WORKERS
    wait_until(lambda: "configuration changed: vrfy" in server.server_log())
    for _ in range(4):  # every new worker answers VRFY now
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            assert client.verify("alice")[0] == 250


def test_a_reload_that_fails_validation_changes_nothing_anywhere(make_server):
    server = make_server({"workers": WORKERS, **with_admin()})
    api = admin_of(server)
    before = started(server)
    config = yaml.safe_load(server.config_path.read_text())
    config["max_clients"] = -5
    server.config_path.write_text(yaml.safe_dump(config))
    reply = api.request("POST", "/api/v1/reload")
    assert reply.status == 400 and "max_clients" in reply.error
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: server.server_log().count("reload refused") == 2)
    assert server.workers() == before
    assert api.config()["max_clients"] == 1000


def test_the_api_reload_reaches_every_worker(make_server):
    server = make_server({"workers": WORKERS, **with_admin()})
    api = admin_of(server)
    old = started(server)
    config = yaml.safe_load(server.config_path.read_text())
    config["limits"] = {**config.get("limits", {}), "max_recipients": 3}
    server.config_path.write_text(yaml.safe_dump(config))
    answer = api.ok("POST", "/api/v1/reload")
    assert answer["changed"] == ["limits.max_recipients"]
    # The old workers finish what they serve (this very request) and end.
    workers_when(server, lambda pids: len(pids) == WORKERS and not set(pids) & set(old), "new")
    assert api.config()["limits"]["max_recipients"] == 3


def hold_on_every_worker(server, api, clients: list[socket.socket]) -> None:
    """Connect (greeted, then idle) until every worker holds a session: the
    kernel picks the worker. The sockets go into `clients`."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sock = socket.create_connection((server.host, server.port), timeout=10)
        assert sock.recv(512).startswith(b"220")
        clients.append(sock)
        sessions = api.sessions()
        if len({s["worker"] for s in sessions}) == WORKERS and len(sessions) == len(clients):
            return
    pytest.fail("the connections did not reach every worker")


def test_sessions_and_kick_see_every_worker(make_server):
    server = make_server({"workers": WORKERS, **with_admin()})
    api = admin_of(server)
    started(server)
    clients: list[socket.socket] = []
    try:
        hold_on_every_worker(server, api, clients)
        sessions = api.sessions()
        assert len(sessions) == len(clients)
        assert len({s["worker"] for s in sessions}) == WORKERS
        assert len({s["id"] for s in sessions}) == len(sessions)  # ids unique server-wide
        for worker in {s["worker"] for s in sessions}:  # a kick reaches each worker
            victim = next(s for s in sessions if s["worker"] == worker)
            assert api.ok("DELETE", f"/api/v1/sessions/{victim['id']}") == {"closed": victim["id"]}
        wait_until(lambda: len(api.sessions()) == len(clients) - WORKERS, what="kicks")
    finally:
        for sock in clients:
            sock.close()


def test_pop3_maildrop_lock_holds_across_workers(make_server):
    password = "s3cret-pass"
    server = make_server(
        {
            "workers": WORKERS,
            "listeners": [
                {"address": "127.0.0.1", "port": free_port()},
                {"address": "127.0.0.1", "port": free_port(), "role": "pop3"},
            ],
            "users": users(alice=password),
            "auth": {"allow_plaintext": True},
            **with_admin(),
        }
    )
    api = admin_of(server)
    started(server)
    send(server)
    port = server.ports["pop3"]

    def login(sock: socket.socket) -> bytes:
        sock.sendall(f"USER alice\r\nPASS {password}\r\n".encode())
        data = b""
        while data.count(b"\r\n") < 2:
            data += sock.recv(512)
        return data.split(b"\r\n")[1]

    held = []
    try:
        # The first session on one worker, then connect until one lands on the other.
        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(first)
        assert first.recv(512).startswith(b"+OK")
        assert login(first).startswith(b"+OK")
        worker = next(s["worker"] for s in api.sessions() if s["user"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            assert sock.recv(512).startswith(b"+OK")
            others = [s for s in api.sessions() if s["worker"] != worker]
            if others:
                assert login(sock).startswith(b"-ERR [IN-USE]")
                break
        else:
            pytest.fail("no POP3 connection reached the other worker")
    finally:
        for sock in held:
            sock.close()


# ------------------------------------------------- the queue, exactly once


def relay_config(sink: Sink, concurrency: int) -> dict:
    return {
        "workers": WORKERS,
        "trusted_networks": ["127.0.0.0/8"],
        "relay": {
            "smarthost": f"{sink.address}:{sink.port}",
            "smarthost_tls": "none",
            "concurrency": concurrency,
            "retry_schedule": [1],
        },
    }


def delivered_subjects(sink: Sink) -> list[str]:
    subjects = []
    for tx in sink.completed:
        for line in tx.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                subjects.append(line[9:].decode())
                break
    return subjects


@pytest.mark.parametrize("victim", ["worker", "master"])
def test_the_queue_is_delivered_exactly_once_across_a_kill(tmp_path, victim):
    """kill -9 a worker (or the master, which takes its workers along) while
    deliveries are in flight; after the replacement (or a restart) every
    queued message reaches the next hop, and at most `relay.concurrency` (a
    server-wide limit, shared out among the workers) twice: those whose
    attempt was cut before its end was recorded."""
    count, concurrency = 30, 4
    with Sink(Script(final_delay=0.2)) as sink:
        root = tmp_path / "srv"
        server = start_server(root, relay_config(sink, concurrency))
        try:
            pids = started(server)
            for i in range(count):
                send(server, rcpt=f"r{i}@remote.example", subject=f"q{i}")
            wait_until(lambda: len(sink.completed) >= 3, what="deliveries under way")
            if victim == "worker":
                os.kill(pids[0], signal.SIGKILL)
            else:
                server.process.kill()
                server.process.wait(timeout=10)
                wait_until(lambda: not any(alive(p) for p in pids), what="the workers to end")
                server = start_server(root, relay_config(sink, concurrency))
            wanted = {f"q{i}" for i in range(count)}
            wait_until(
                lambda: set(delivered_subjects(sink)) >= wanted,
                timeout=60,
                what="every message delivered",
            )
            subjects = delivered_subjects(sink)
            duplicates = len(subjects) - len(set(subjects))
            assert set(subjects) == wanted
            assert duplicates <= concurrency
            wait_until(lambda: not list((root / "mail_dir" / ".queue" / "records").iterdir()))
        finally:
            server.process.kill()
            server.process.wait(timeout=10)


def test_metrics_add_up_across_workers(make_server):
    """/metrics and /api/v1/stats are the whole server's: messages stored by
    both workers add up, and the open connections show per worker."""
    server = make_server({"workers": WORKERS, **with_admin()})
    api = admin_of(server)
    started(server)
    held: list[socket.socket] = []
    try:
        hold_on_every_worker(server, api, held)
        by_worker = {s["worker"] for s in api.sessions()}
        assert len(by_worker) == WORKERS
        exposition = api.exposition()
        for pid in by_worker:
            assert f'geosmtp_worker_connections_current{{worker="{pid}"}}' in exposition
        assert api.stats()["connections"]["current"] == len(held)
        for sock in held:
            sock.sendall(b"EHLO held.example\r\nMAIL FROM:<a@remote.example>\r\n")
            sock.sendall(b"RCPT TO:<alice@test.example>\r\nDATA\r\n")
            data = b""
            while b"\r\n354 " not in data:  # EHLO, MAIL, RCPT answered, then DATA's 354
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            sock.sendall(b"Subject: counted\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        wait_until(lambda: len(server.messages("alice")) == len(held), what="every message")
        workers_seen = {path.name.split("P")[1].split("Q")[0] for path in server.messages("alice")}
        assert len(workers_seen) == WORKERS  # both workers stored some
        stats = wait_until(
            lambda: (s := api.stats())["connections"]["current"] == 0 and s, what="all closed"
        )
        assert stats["messages"]["accepted"] == len(held)
        assert stats["connections"]["total"] >= len(held)
    finally:
        for sock in held:
            sock.close()


def test_systemd_hears_ready_reloading_and_stopping(make_server, monkeypatch, tmp_path):
    """sd_notify on $NOTIFY_SOCKET (Type=notify): READY=1 once every worker
    serves, RELOADING=1 then READY=1 around a SIGHUP, STOPPING=1 at a stop."""
    folder = tempfile.mkdtemp(prefix="notify-", dir="/tmp")  # a short path for AF_UNIX
    path = os.path.join(folder, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        server = make_server({"workers": WORKERS})

        def next_state() -> str:
            return listener.recv(4096).decode()

        ready = next_state()
        assert ready.splitlines()[0] == "READY=1"
        assert len(server.workers()) == WORKERS  # every worker was serving by then
        server.process.send_signal(signal.SIGHUP)
        assert next_state().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert next_state() == "READY=1"
        assert server.stop() == 0
        assert next_state() == "STOPPING=1"
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
