"""The real server with PROMETHEUS_MULTIPROC_DIR set (as a worker runs, here the
only one): its metrics go through the files, the queue and filter gauges are
published rather than read at scrape time, uptime counts from GEOSMTP_STARTED."""

from __future__ import annotations

import time

from tests.conftest import wait_until
from tests.integration.smtp_sink import Script
from tests.integration.test_queue_ops import (  # noqa: F401 (a fixture)
    LATER,
    attempted,
    relay_setup,
    submit,
)


def test_a_worker_reports_through_the_files(relay_setup, monkeypatch, tmp_path):  # noqa: F811
    directory = tmp_path / "metrics"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    monkeypatch.setenv("GEOSMTP_STARTED", str(time.time() - 1000))
    server, _sink, api, _ = relay_setup(Script(final_replies=[LATER]))
    a = submit(server, ["bob@remote.test"], "gauged")
    wait_until(lambda: attempted(api, a, 1), what="the first attempt")
    api.ok("POST", f"/api/v1/queue/{a}/hold")
    metrics = api.metrics()
    assert metrics["geosmtp_queue_entries"] == 1.0
    assert metrics["geosmtp_queue_held_entries"] == 1.0
    assert 0 < metrics["geosmtp_queue_oldest_age_seconds"] < 60
    assert metrics["geosmtp_messages_accepted_total"] == 1.0
    assert metrics["geosmtp_relay_deliveries_total"]["result=deferred"] == 1.0
    assert metrics["geosmtp_filter_slots"] >= 1
    (worker,) = metrics["geosmtp_worker_connections_current"]
    assert worker == f"worker={server.process.pid}"
    stats = api.stats()
    assert stats["uptime_seconds"] >= 1000
    assert (stats["queue"]["entries"], stats["queue"]["held"]) == (1, 1)
    assert stats["messages"]["accepted"] == 1
    assert api.get("/api/v1/filters")["concurrency"]["limit"] >= 1
    assert "geosmtp_queue_entries 1.0" in api.exposition().splitlines()
    assert list(directory.glob("counter_*.db"))  # the values are in the files
