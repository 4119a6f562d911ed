"""geosmtp.metrics: the core's tallies added in, snapshots as JSON, the text exposition."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from geosmtp.metrics import OUTCOMES, Metrics


def test_add_counts_splits_verbs_and_reply_classes():
    m = Metrics()
    m.add_counts({"MAIL": 2, "2xx": 3, "UNKNOWN": 1, "5xx": 1})
    m.add_counts({"MAIL": 1, "2xx": 1})
    m.add_counts({})
    snap = m.snapshot()
    assert snap["geosmtp_commands_total"] == {"verb=MAIL": 3.0, "verb=UNKNOWN": 1.0}
    assert snap["geosmtp_replies_total"] == {"class=2xx": 4.0, "class=5xx": 1.0}


def test_add_counts_leaves_the_dict_to_the_caller():
    m = Metrics()
    counts = {"RCPT": 5}
    m.add_counts(counts)
    assert counts == {"RCPT": 5}


def test_snapshot_shapes():
    m = Metrics()
    lm = m.listener("mx:[127.0.0.1]:25")
    lm.connections.inc()
    lm.current.inc()
    lm.bytes_in.inc(100)
    m.messages_accepted.inc()
    m.message_size.observe(2000)
    m.auth_success.inc()
    lm.session_ended("quit", 0.02)
    snap = m.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    # Unlabelled: a number; labelled: {"k=v,...": number}, label names sorted.
    assert snap["geosmtp_messages_accepted_total"] == 1.0
    assert snap["geosmtp_connections_total"] == {"listener=mx:[127.0.0.1]:25": 1.0}
    assert snap["geosmtp_connections_current"] == {"listener=mx:[127.0.0.1]:25": 1.0}
    assert snap["geosmtp_received_bytes_total"] == {"listener=mx:[127.0.0.1]:25": 100.0}
    assert snap["geosmtp_auth_total"] == {"result=success": 1.0, "result=failure": 0.0}
    sessions = snap["geosmtp_sessions_total"]
    assert set(sessions) == {f"listener=mx:[127.0.0.1]:25,outcome={o}" for o in OUTCOMES}
    assert sessions["listener=mx:[127.0.0.1]:25,outcome=quit"] == 1.0
    assert sum(sessions.values()) == 1.0
    # Histograms: cumulative buckets keyed by le, then count and sum.
    size = snap["geosmtp_message_size_bytes_bucket"]
    assert size["le=1000.0"] == 0.0 and size["le=4000.0"] == 1.0 and size["le=+Inf"] == 1.0
    assert snap["geosmtp_message_size_bytes_count"] == 1.0
    assert snap["geosmtp_message_size_bytes_sum"] == 2000.0
    assert snap["geosmtp_session_duration_seconds_count"] == 1.0
    assert snap["geosmtp_delivery_seconds_count"] == 0.0
    assert not [name for name in snap if name.endswith("_created")]


def test_each_server_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.messages_accepted.inc(5)
    assert b.snapshot()["geosmtp_messages_accepted_total"] == 0.0
    assert a.snapshot()["geosmtp_messages_accepted_total"] == 5.0


def test_unknown_outcome_is_a_bug():
    lm = Metrics().listener("x")
    with pytest.raises(KeyError):
        lm.session_ended("vanished", 1.0)


def test_exposition_parses():
    m = Metrics()
    m.listener('odd "name"\\').connections.inc()
    m.add_counts({"EHLO": 1, "2xx": 2})
    text = m.exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families["geosmtp_connections"].samples
    assert sample.labels == {"listener": 'odd "name"\\'} and sample.value == 1.0
    assert families["geosmtp_message_size_bytes"].type == "histogram"
    assert families["geosmtp_connections_current"].type == "gauge"
    (ehlo,) = families["geosmtp_commands"].samples
    assert ehlo.labels == {"verb": "EHLO"}


class _Queue:
    """What watch_queue reads of a QueueRunner."""

    def __init__(self) -> None:
        self.entries, self.held, self.age = 0, 0, 0.0

    def pending_count(self) -> int:
        return self.entries

    def held_count(self) -> int:
        return self.held

    def oldest_age(self) -> float:
        return self.age


def test_queue_gauges_are_read_at_scrape_time():
    m = Metrics()
    snap = m.snapshot()
    assert snap["geosmtp_queue_entries"] == 0.0  # no queue watched: 0
    queue = _Queue()
    m.watch_queue(queue)
    queue.entries, queue.held, queue.age = 3, 1, 42.5
    snap = m.snapshot()
    assert snap["geosmtp_queue_entries"] == 3.0
    assert snap["geosmtp_queue_held_entries"] == 1.0
    assert snap["geosmtp_queue_oldest_age_seconds"] == 42.5
    queue.entries = 0
    assert "geosmtp_queue_entries 0.0" in m.exposition().decode().splitlines()


def test_relay_deliveries_and_attempts():
    m = Metrics()
    # Every result is there from the start, at 0.
    assert m.snapshot()["geosmtp_relay_deliveries_total"] == {
        "result=sent": 0.0,
        "result=deferred": 0.0,
        "result=bounced": 0.0,
    }
    m.relay_deliveries.labels("sent").inc()  # as the runner counts
    m.relay_deliveries.labels("deferred").inc(2)
    m.relay_attempt_seconds.observe(0.3)
    text = m.exposition().decode().splitlines()
    assert 'geosmtp_relay_deliveries_total{result="sent"} 1.0' in text
    assert 'geosmtp_relay_deliveries_total{result="deferred"} 2.0' in text
    assert 'geosmtp_relay_attempt_seconds_bucket{le="0.25"} 0.0' in text
    assert 'geosmtp_relay_attempt_seconds_bucket{le="0.5"} 1.0' in text
    assert "geosmtp_relay_attempt_seconds_count 1.0" in text
