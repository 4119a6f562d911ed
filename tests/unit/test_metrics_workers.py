"""geosmtp.metrics with workers: real forked processes counting into one
PROMETHEUS_MULTIPROC_DIR, and one process's view of them all.

prometheus_client chooses its value class when it is imported, so each case
runs a fresh interpreter (`python -c`) with the variable set; the script forks
the workers, syncs with them over pipes (no sleeping), and prints what the
parent saw as JSON for the assertions here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from geosmtp.metrics import Metrics

LISTENER = "listener=mx:[127.0.0.1]:25"

# Three workers fork from a parent that built its Metrics first (as a master that
# composes before forking would); worker i counts i+1 of everything, holds i+1
# connections open, has i+1 queue entries (i of them held, the oldest i*10 s old),
# then reports and waits for its pipe to close.
WORKERS = """
import json, os, sys
from geosmtp.metrics import Metrics, mark_process_dead

m = Metrics()
lm = m.listener("mx:[127.0.0.1]:25")

class Queue:
    def __init__(self, i):
        self.i = i
    def pending_count(self):
        return self.i + 1
    def held_count(self):
        return self.i
    def oldest_age(self):
        return self.i * 10.0

workers = {}
for i in range(3):
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r); os.close(go_w)
        for _, other in workers.values():  # or its sibling would never see its EOF
            os.close(other)
        m.watch_queue(Queue(i))
        n = i + 1
        lm.connections.inc(n)
        lm.current.inc(n)
        lm.bytes_in.inc(100 * n)
        m.messages_accepted.inc(n)
        m.message_size.observe(2000)
        m.add_counts({"MAIL": n, "2xx": n})
        m.relay_deliveries.labels("sent").inc(n)
        m.publish()
        os.write(ready_w, b"!")
        os.read(go_r, 1)  # until the parent closes its end
        os._exit(0)
    os.close(ready_w); os.close(go_r)
    assert os.read(ready_r, 1) == b"!"
    workers[i] = (pid, go_w)

seen = {"all": m.snapshot(), "text": m.exposition().decode()}
pid, go_w = workers[2]
os.close(go_w)
os.waitpid(pid, 0)
mark_process_dead(pid)
seen["after"] = m.snapshot()
seen["pids"] = [workers[i][0] for i in range(3)]
for i in (0, 1):
    os.close(workers[i][1])
    os.waitpid(workers[i][0], 0)
print(json.dumps(seen))
"""


def run(script: str, tmp_path, **env: str) -> dict:
    directory = tmp_path / "metrics"
    directory.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    return run(WORKERS, tmp_path_factory.mktemp("workers"))


def test_counters_and_histograms_add_up(seen):
    snap = seen["all"]
    assert snap["geosmtp_connections_total"] == {LISTENER: 6.0}
    assert snap["geosmtp_received_bytes_total"] == {LISTENER: 600.0}
    assert snap["geosmtp_messages_accepted_total"] == 6.0
    assert snap["geosmtp_commands_total"] == {"verb=MAIL": 6.0}
    assert snap["geosmtp_replies_total"] == {"class=2xx": 6.0}
    assert snap["geosmtp_message_size_bytes_count"] == 3.0
    assert snap["geosmtp_message_size_bytes_sum"] == 6000.0
    buckets = snap["geosmtp_message_size_bytes_bucket"]
    assert buckets["le=1000.0"] == 0.0 and buckets["le=4000.0"] == 3.0
    assert buckets["le=+Inf"] == 3.0
    # Declared at 0 and counted in some workers only: the same three results.
    assert snap["geosmtp_relay_deliveries_total"] == {
        "result=sent": 6.0,
        "result=deferred": 0.0,
        "result=bounced": 0.0,
    }
    # Nothing counted twice: the parent's values before the fork stay its own.
    assert snap["geosmtp_auth_total"] == {"result=success": 0.0, "result=failure": 0.0}


def test_gauges_over_live_workers(seen):
    snap = seen["all"]
    assert snap["geosmtp_connections_current"] == {LISTENER: 6.0}
    assert snap["geosmtp_queue_entries"] == 6.0  # 1 + 2 + 3
    assert snap["geosmtp_queue_held_entries"] == 3.0  # 0 + 1 + 2
    assert snap["geosmtp_queue_oldest_age_seconds"] == 20.0  # the oldest of all
    pids = seen["pids"]
    per_worker = snap["geosmtp_worker_connections_current"]
    assert {
        f"worker={pid}": float(i + 1) for i, pid in enumerate(pids)
    }.items() <= per_worker.items()


def test_a_dead_workers_gauges_leave_its_counters_stay(seen):
    snap = seen["after"]  # worker 2 (3 connections, 3 entries, 30 s... ) exited
    assert snap["geosmtp_connections_current"] == {LISTENER: 3.0}
    assert snap["geosmtp_queue_entries"] == 3.0
    assert snap["geosmtp_queue_held_entries"] == 1.0
    assert snap["geosmtp_queue_oldest_age_seconds"] == 10.0
    assert f"worker={seen['pids'][2]}" not in snap["geosmtp_worker_connections_current"]
    assert snap["geosmtp_connections_total"] == {LISTENER: 6.0}
    assert snap["geosmtp_messages_accepted_total"] == 6.0
    assert snap["geosmtp_message_size_bytes_count"] == 3.0


def test_exposition_is_the_same_families(seen):
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(seen["text"])}
    assert families["geosmtp_connections"].type == "counter"
    assert families["geosmtp_connections_current"].type == "gauge"
    assert families["geosmtp_message_size_bytes"].type == "histogram"
    (current,) = families["geosmtp_connections_current"].samples
    assert current.labels == {"listener": "mx:[127.0.0.1]:25"} and current.value == 6.0
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]


# A worker publishes its queue and filter gauges once started, then every second;
# the parent (not watching anything itself) polls until it sees the new values.
PUBLISHER = """
import json, os, signal, time
from geosmtp.metrics import Metrics, mark_process_dead

m = Metrics()

class Queue:
    entries = 1
    def pending_count(self):
        return self.entries
    def held_count(self):
        return 0
    def oldest_age(self):
        return 7.0

class Slots:
    running, waiting, limit = 2, 1, 4

ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    import gevent
    queue = Queue()
    m.watch_queue(queue)
    m.watch_filters(Slots(), lambda: 8)
    m.start()
    queue.entries = 5  # written at the next tick, not by start()
    os.write(ready_w, b"!")
    gevent.sleep(60)  # the parent kills it
    os._exit(1)
os.read(ready_r, 1)
seen = {"started": m.snapshot()}
deadline = time.monotonic() + 10
while m.snapshot()["geosmtp_queue_entries"] != 5.0 and time.monotonic() < deadline:
    time.sleep(0.01)
seen["ticked"] = m.snapshot()
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
mark_process_dead(pid)
seen["dead"] = m.snapshot()
print(json.dumps(seen))
"""


def test_a_worker_publishes_what_it_watches(tmp_path):
    seen = run(PUBLISHER, tmp_path)
    started = seen["started"]
    assert started["geosmtp_queue_oldest_age_seconds"] == 7.0
    assert started["geosmtp_filter_running"] == 2.0
    assert started["geosmtp_filter_waiting"] == 1.0
    assert started["geosmtp_filter_slots"] == 8.0  # the server's limit, not the share
    assert started["geosmtp_queue_entries"] in (1.0, 5.0)  # 5 if a tick came already
    assert seen["ticked"]["geosmtp_queue_entries"] == 5.0
    dead = seen["dead"]
    assert dead["geosmtp_queue_entries"] == 0.0  # the parent's own, never set
    assert dead["geosmtp_filter_slots"] == 0.0


STARTED = """
import json
from geosmtp.metrics import Metrics
m = Metrics()
print(json.dumps({"started": m.started, "multiprocess": m.multiprocess_dir is not None}))
"""


def test_uptime_counts_from_the_servers_start(tmp_path):
    seen = run(STARTED, tmp_path, GEOSMTP_STARTED="1700000000.5")
    assert seen == {"started": 1700000000.5, "multiprocess": True}


def test_a_directory_set_after_import_is_refused(monkeypatch, tmp_path):
    # This interpreter imported prometheus_client without it: values would stay here.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="after prometheus_client was imported"):
        Metrics()


def test_a_bad_start_time_is_refused(monkeypatch):
    monkeypatch.setenv("GEOSMTP_STARTED", "yesterday")
    with pytest.raises(ValueError, match="GEOSMTP_STARTED"):
        Metrics()
