"""The real server, master and workers: the metrics go through prometheus_client's
multiprocess files, the queue and filter gauges are published by the workers,
uptime counts from the master's start (GEOSMTP_STARTED)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import wait_until
from tests.integration.smtp_sink import Script
from tests.integration.test_queue_ops import (  # noqa: F401 (a fixture)
    LATER,
    attempted,
    relay_setup,
    submit,
)


def mapped_files(pid: int) -> set[Path]:
    """The files a process has mapped (prometheus_client maps its values' files)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {Path(line.split(maxsplit=5)[5]) for line in lines if len(line.split()) == 6}


def test_workers_report_through_the_files(relay_setup):  # noqa: F811
    before = time.time()
    server, _sink, api, _ = relay_setup(Script(final_replies=[LATER]))
    a = submit(server, ["bob@remote.test"], "gauged")
    wait_until(lambda: attempted(api, a, 1), what="the first attempt")
    api.ok("POST", f"/api/v1/queue/{a}/hold")
    metrics = api.metrics()  # at once: the scrape has every worker publish first
    assert metrics["geosmtp_queue_entries"] == 1.0
    assert metrics["geosmtp_queue_held_entries"] == 1.0
    assert 0 < metrics["geosmtp_queue_oldest_age_seconds"] < 60
    assert metrics["geosmtp_messages_accepted_total"] == 1.0
    assert metrics["geosmtp_relay_deliveries_total"]["result=deferred"] == 1.0
    assert metrics["geosmtp_filter_slots"] >= 1
    workers = set(metrics["geosmtp_worker_connections_current"])
    assert workers == {f"worker={pid}" for pid in server.workers()}
    stats = api.stats()
    assert 0 < stats["uptime_seconds"] <= time.time() - before  # the server's, from the master
    assert (stats["queue"]["entries"], stats["queue"]["held"]) == (1, 1)
    assert stats["messages"]["accepted"] == 1
    assert api.get("/api/v1/filters")["concurrency"]["limit"] >= 1
    assert "geosmtp_queue_entries 1.0" in api.exposition().splitlines()
    for pid in server.workers():  # each worker's values are in files of its own
        assert Path(f"counter_{pid}.db") in {Path(p.name) for p in mapped_files(pid)}
