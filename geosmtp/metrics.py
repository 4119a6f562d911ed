"""Counters, gauges and histograms of the running server (prometheus_client).

One `Metrics` object per server, on a registry of its own (not the library's
global one), exposed at `/metrics` on the admin listener and as JSON by
`/api/v1/stats`. Counting sits on the hot path, so sessions bind their
labelled children once (`ListenerMetrics`, `POP3Metrics`) and the SMTP
core keeps its per-command counts in a plain dict, added here
(`add_counts`) once per message and at the end of a session.

With workers (the master forks one process per core), each worker counts in
files of its own and `/metrics` and `/api/v1/stats` add them all up: that is
prometheus_client's multiprocess mode, chosen by `PROMETHEUS_MULTIPROC_DIR`
(read when prometheus_client is imported); nothing else in the server knows.

- The master sets the variable (a private, empty directory made for this
  run, writable by the workers' user) before anything imports this module;
  `Metrics()` refuses a variable set after that import (`RuntimeError`),
  since its values would stay in the process. Without it: one registry, the
  gauges read at scrape time.
- Each process writes its values to files of its own there
  (`counter_<pid>.db`, `gauge_livesum_<pid>.db`, ...; a process that forks
  after counting starts its child from zero), so one `Metrics` per process.
  `exposition()` and `snapshot()` read every file through
  `MultiProcessCollector`: counters and histograms add up; gauges are
  `livesum` (open connections, queue entries, filter slots) or `livemax`
  (the queue's oldest age). The one addition to one process's names is
  `geosmtp_worker_connections_current{worker="<pid>"}`, to see how the
  kernel spreads clients over the workers.
- When a worker exits the master calls `mark_process_dead(pid)`: its
  `live*` gauge file goes, its counters and histograms (and their counts)
  stay. Files of dead workers stay until the server's next run: a server
  whose workers die often makes scrapes slower, not wrong.
- `Gauge.set_function` cannot work across processes (the function lives in
  the worker, the scrape in another), so with workers `watch_queue` and
  `watch_filters` keep the reading functions and `start()` (called by
  `App.start`, after the fork) writes them at once and then every
  `PUBLISH_INTERVAL` from a greenlet; the process that serves a scrape
  writes its own first. Chosen over an update at every change (calls on the
  relay and filter paths, and the oldest age changes with time anyway) and
  over a collector in the serving process (it cannot see another worker's
  queue without reading the queue folder at each scrape): the queue figures
  lag by at most a second.
- `uptime_seconds` counts from `GEOSMTP_STARTED` (set by the master) when
  it is set, else from this process's `Metrics()`.
- Cost: every `inc`/`observe` becomes a write into a mapped file under one
  lock. The metrics calls of one message take about 44 µs of CPU instead of
  24 µs (`python bench/experiments/metrics_workers_cost.py`), ~1.4% of the
  ~1.4 ms a message costs: not worth batching. A scrape reads every file:
  with 8 workers about 8 ms of CPU.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent
from loguru import logger
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict

# The `_created` timestamp series double the output and no dashboard here uses them.
disable_created_metrics()

SIZE_BUCKETS = (1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)
DELIVERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
#: One relay attempt: DNS, connection, TLS, the transaction (timeouts are minutes).
ATTEMPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

#: What became of a relayed recipient after an attempt (the `result` label).
RELAY_RESULTS = ("sent", "deferred", "bounced")

#: One run of a pipeline stage (a filter program: fork, exec, the whole message through it).
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

#: A stage's verdict (the `verdict` label).
STAGE_VERDICTS = ("accept", "replace", "tempfail", "reject")

#: Where a transaction or recipient was refused (the `stage` label).
REJECT_STAGES = ("MAIL", "RCPT", "DATA", "BDAT", "filter", "sender-checks", "dkim-sign", "storage")

#: The per-client limit a client was refused by (the `limit` label):
#: client_limits' and the AUTH throttle's (auth.max_failures).
CLIENT_LIMITS = (
    "connections",
    "connection_rate",
    "message_rate",
    "recipient_rate",
    "errors",
    "auth_failures",
)

#: How a session ended (the `outcome` label).
OUTCOMES = (
    "quit",
    "lost",
    "timeout",
    "errors",
    "shutdown",
    "kicked",
    "tls_failed",
    "error",
    "refused",
)
#: Why a connection on a proxy_protocol listener was closed before any
#: greeting (the `reason` label of geosmtp_proxy_refusals_total).
PROXY_REFUSALS = ("untrusted", "malformed", "timeout", "error")

#: Set by the master, before anything imports prometheus_client: a private, empty
#: directory where every process keeps its values (multiprocess mode).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Set by the master: when the server started (Unix time), for `uptime_seconds`.
STARTED_ENV = "GEOSMTP_STARTED"
#: How often a worker writes the gauges it reads from its queue and filter slots
#: (multiprocess mode; a single process reads them at scrape time instead).
PUBLISH_INTERVAL = 1.0


def multiprocess_dir() -> str | None:
    """The directory of every process's values, or None: one process, one registry."""
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if path is None:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        # The values already made live in this process only: nobody would see them.
        raise RuntimeError(
            f"{MULTIPROC_DIR_ENV} was set after prometheus_client was imported; "
            "set it before importing geosmtp.metrics"
        )
    return path


def server_started() -> float:
    """When the server started: the master's word (`GEOSMTP_STARTED`), else now."""
    value = os.environ.get(STARTED_ENV)
    if value is None:
        return time.time()
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{STARTED_ENV}={value!r}: not a Unix time") from None


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """A worker exited (the master calls this once it has reaped it): its gauges
    (open connections, its part of the queue) leave the totals; its counters
    and histograms stay in them. `path` defaults to `PROMETHEUS_MULTIPROC_DIR`."""
    multiprocess.mark_process_dead(pid, path)


class Metrics:
    def __init__(self) -> None:
        # This process's metrics. With workers, values live in files (one set per
        # process, in `multiprocess_dir`) and `exposition()`/`snapshot()` read
        # every process's through `_collected`; with one process, it is this one.
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir()
        self.started = server_started()
        listener = ["listener"]
        self.connections = Counter(
            "geosmtp_connections", "Connections accepted", listener, registry=r
        )
        self.connections_current = Gauge(
            "geosmtp_connections_current",
            "Open connections",
            listener,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_refused = Counter(
            "geosmtp_connections_refused",
            "Connections refused at once (SMTP 421, POP3 -ERR): over max_clients, or stopping",
            listener,
            registry=r,
        )
        self.proxy_refusals = Counter(
            "geosmtp_proxy_refusals",
            "Connections closed before any greeting on a proxy_protocol listener, by reason: "
            "untrusted (not in proxy_trusted), malformed, timeout (no header in time), error",
            [*listener, "reason"],
            registry=r,
        )
        self.bytes_in = Counter(
            "geosmtp_received_bytes", "Octets received from clients", listener, registry=r
        )
        self.bytes_out = Counter(
            "geosmtp_sent_bytes", "Octets sent to clients", listener, registry=r
        )
        self.sessions = Counter(
            "geosmtp_sessions", "Sessions ended, by outcome", ["listener", "outcome"], registry=r
        )
        self.tls_sessions = Counter(
            "geosmtp_tls_sessions", "TLS handshakes completed", listener, registry=r
        )
        self.commands = Counter("geosmtp_commands", "Commands received", ["verb"], registry=r)
        self.replies = Counter(
            "geosmtp_replies", "Replies sent, by class (2xx...)", ["class"], registry=r
        )
        self.messages_accepted = Counter(
            "geosmtp_messages_accepted", "Messages stored (answered 250)", registry=r
        )
        self.messages_rejected = Counter(
            "geosmtp_messages_rejected",
            "Transactions or recipients refused, by stage: MAIL, RCPT, DATA, BDAT, "
            "filter (a filter stage), sender-checks (SPF/DKIM/DMARC), dkim-sign, storage",
            ["stage"],
            registry=r,
        )
        self.recipients = Counter(
            "geosmtp_recipients", "Deliveries (recipients of stored messages)", registry=r
        )
        self.auth = Counter("geosmtp_auth", "AUTH attempts, by result", ["result"], registry=r)
        self.client_limit_refusals = Counter(
            "geosmtp_client_limit_refusals",
            "Refusals by a per-client limit: connections, connection_rate (421 at "
            "connect), message_rate, recipient_rate (450), errors (421), auth_failures",
            ["limit"],
            registry=r,
        )
        # Every limit shows, at 0 until it refuses; the children bound once.
        self._limit_children = {k: self.client_limit_refusals.labels(k) for k in CLIENT_LIMITS}
        self.stress = Gauge(
            "geosmtp_stress",
            "1 while the server is under stress (stress.threshold of max_clients "
            "open): idle clients get stress.command_timeout",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.message_size = Histogram(
            "geosmtp_message_size_bytes",
            "Size of stored messages",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.session_duration = Histogram(
            "geosmtp_session_duration_seconds",
            "Session length",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "geosmtp_delivery_seconds",
            "From the end of the message to 250: filter stages and durability",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        # The outbound queue. The gauges are read from the runner at scrape time
        # (`watch_queue`); the runner counts deliveries and times attempts.
        # With workers, each owns a part of the queue: entries add up, the oldest
        # age is the largest; a dead worker's part leaves with it ("live").
        self.queue_entries = Gauge(
            "geosmtp_queue_entries",
            "Messages in the outbound queue",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_held = Gauge(
            "geosmtp_queue_held_entries",
            "Queued messages held by the administrator",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_oldest_age = Gauge(
            "geosmtp_queue_oldest_age_seconds",
            "Age of the oldest message in the outbound queue (0 when empty)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.queue_quarantined = Counter(
            "geosmtp_queue_quarantined",
            "Queue entries moved to quarantine/ at start: a record that cannot be used "
            "(not JSON, a field of the wrong type or value, its message missing)",
            registry=r,
        )
        self.relay_deliveries = Counter(
            "geosmtp_relay_deliveries",
            "Relay attempt outcomes per recipient: sent, deferred (retried later), bounced",
            ["result"],
            registry=r,
        )
        for result in RELAY_RESULTS:  # every result shows, at 0 until it happens
            self.relay_deliveries.labels(result)
        self.relay_attempt_seconds = Histogram(
            "geosmtp_relay_attempt_seconds",
            "One delivery attempt to one destination domain: DNS, connection, transaction",
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        # POP3, per listener.
        self.pop3_commands = Counter(
            "geosmtp_pop3_commands", "POP3 commands received", listener, registry=r
        )
        self.pop3_logins = Counter(
            "geosmtp_pop3_logins", "POP3 logins, by result", ["listener", "result"], registry=r
        )
        self.pop3_retrieved = Counter(
            "geosmtp_pop3_retrieved_messages", "Messages sent whole (RETR)", listener, registry=r
        )
        self.pop3_retrieved_bytes = Counter(
            "geosmtp_pop3_retrieved_bytes",
            "Octets of messages sent (RETR and TOP, as on the wire)",
            listener,
            registry=r,
        )
        self.pop3_deleted = Counter(
            "geosmtp_pop3_deleted_messages",
            "Messages removed from maildrops at QUIT",
            listener,
            registry=r,
        )
        # Pipeline stages, by name: a filter's configured one, sender-checks, dkim-sign.
        self.stage_runs = Counter(
            "geosmtp_stage_runs",
            "Pipeline stage runs, by stage and verdict (accept, replace, tempfail, reject)",
            ["stage", "verdict"],
            registry=r,
        )
        self.stage_failures = Counter(
            "geosmtp_stage_failures",
            "Stage runs whose verdict is the failure policy, by what failed "
            "(timeout, exit=N, signal=N, output_limit, exec, error, busy, storage)",
            ["stage", "failure"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "geosmtp_stage_seconds",
            "Time in a stage, waiting for a filter slot included",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        # Each worker has its own slots: the sums are the server's (running against slots).
        self.filter_running = Gauge(
            "geosmtp_filter_running",
            "Filter programs and Python stage threads running (holding a slot)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.filter_waiting = Gauge(
            "geosmtp_filter_waiting",
            "Messages waiting for a filter slot (filter_concurrency)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.filter_slots = Gauge(
            "geosmtp_filter_slots",
            "The filter_concurrency limit",
            registry=r,
            multiprocess_mode="livemax",  # the server's limit; each worker has a share
        )
        self._stage_children: dict[tuple[str, str], Any] = {}
        for stage in REJECT_STAGES:  # every stage shows, at 0 until it refuses
            self.messages_rejected.labels(stage)
        self.auth_success = self.auth.labels("success")
        self.auth_failure = self.auth.labels("failure")
        # add_counts' labelled children: a `labels()` lookup costs more than the `inc()`.
        self._count_children: dict[str, Any] = {}
        # Gauges read from a source (`watch_queue`, `watch_filters`). One process
        # reads them at scrape time (`set_function`); a worker writes them every
        # PUBLISH_INTERVAL (`start`), since another process serves the scrape.
        self._watched: dict[Gauge, Callable[[], float]] = {}
        self._publisher: gevent.Greenlet | None = None
        if self.multiprocess_dir is None:
            self._collected = r
        else:
            self._collected = CollectorRegistry()
            self._collected.register(_WorkersCollector(self.multiprocess_dir))

    def client_limit_refused(self, limit: str) -> None:
        """A client was refused by a per-client limit (one of `CLIENT_LIMITS`)."""
        self._limit_children[limit].inc()

    def watch_queue(self, queue: Any) -> None:
        """Take the queue gauges from `queue` (a QueueRunner): at each scrape with one
        process; with workers, every PUBLISH_INTERVAL once `start()`ed, and at each
        scrape this process serves."""
        self._watch(self.queue_entries, queue.pending_count)
        self._watch(self.queue_held, queue.held_count)
        self._watch(self.queue_oldest_age, queue.oldest_age)

    def watch_filters(self, slots: Any, limit: Callable[[], int]) -> None:
        """Take the filter gauges from `slots` (filters.Slots), as `watch_queue`
        does; `limit` is the server's filter_concurrency (a worker's slots
        are its share of it)."""
        self._watch(self.filter_running, lambda: slots.running)
        self._watch(self.filter_waiting, lambda: slots.waiting)
        self._watch(self.filter_slots, limit)

    def _watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        if self.multiprocess_dir is None:
            gauge.set_function(read)
        else:
            self._watched[gauge] = read

    def publish(self) -> None:
        """Write the watched gauges' values now (with workers; a no-op without)."""
        for gauge, read in self._watched.items():
            gauge.set(read())

    def start(self) -> None:
        """With workers, write the watched gauges every PUBLISH_INTERVAL (in the
        process that owns the queue and the slots, after the fork); else nothing."""
        if self.multiprocess_dir is not None and self._publisher is None:
            self.publish()
            self._publisher = gevent.spawn(self._publish_forever)

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.kill()
            self._publisher = None

    def _publish_forever(self) -> None:
        while True:
            gevent.sleep(PUBLISH_INTERVAL)
            try:
                self.publish()
            except Exception:  # a gauge a second late, never a dead publisher
                logger.exception("metrics: could not read a watched gauge")

    def stage_done(self, stage: str, verdict: str, failure: str | None, seconds: float) -> None:
        """A pipeline stage ran (the pipeline's observer)."""
        key = (stage, verdict)
        child = self._stage_children.get(key)
        if child is None:
            child = self._stage_children[key] = self.stage_runs.labels(stage, verdict)
        child.inc()
        if failure is not None:
            self.stage_failures.labels(stage, failure).inc()
        self.stage_seconds.labels(stage).observe(seconds)

    def stage_declared(self, stage: str) -> None:
        """Show a configured stage's counters at 0 before its first run."""
        for verdict in STAGE_VERDICTS:
            self.stage_runs.labels(stage, verdict)
        self.stage_seconds.labels(stage)

    def listener(self, name: str) -> ListenerMetrics:
        return ListenerMetrics(self, name)

    def pop3_listener(self, name: str) -> POP3Metrics:
        return POP3Metrics(self, name)

    def add_counts(self, counts: Mapping[str, int]) -> None:
        """Add the core's per-command tallies ("MAIL", "2xx", ...), then they restart."""
        children = self._count_children
        for key, n in counts.items():
            child = children.get(key)
            if child is None:  # the keys are few: the verbs, UNKNOWN and five classes
                family = self.replies if key[0].isdigit() else self.commands
                child = children[key] = family.labels(key)
            child.inc(n)

    def exposition(self) -> bytes:
        """The server's metrics (every worker's added) in the Prometheus text format."""
        self.publish()  # this process's part of the watched gauges, as of now
        return generate_latest(self._collected)

    def snapshot(self) -> dict[str, Any]:
        """Every sample as JSON-friendly data: {metric: value | {label=value,...: value}}."""
        self.publish()
        out: dict[str, Any] = {}
        for family in self._collected.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                if not sample.labels:
                    out[sample.name] = sample.value
                    continue
                key = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out.setdefault(sample.name, {})[key] = sample.value
        return out


#: Tries to read the workers' files while one of them is being made.
FILE_RETRIES = 20

#: The gauge (a livesum one) also shown per worker, as geosmtp_worker_connections_current.
PER_WORKER = "geosmtp_connections_current"


class _WorkersCollector:
    """Every process's values added up (prometheus_client's MultiProcessCollector),
    and open connections per worker (by pid): how the kernel spreads the clients."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.totals = multiprocess.MultiProcessCollector(None, path)

    def collect(self) -> Iterator[Metric]:
        # A worker that has just started may have made its file and not yet
        # sized it: reading it then fails; it is sized microseconds later.
        for attempt in range(FILE_RETRIES):
            try:
                totals = list(self.totals.collect())
                break
            except struct.error:
                if attempt == FILE_RETRIES - 1:
                    raise
                gevent.sleep(0.01)
        yield from totals
        per_worker = GaugeMetricFamily(
            "geosmtp_worker_connections_current", "Open connections, by worker", labels=["worker"]
        )
        prefix = "gauge_livesum_"
        for path in sorted(glob.glob(os.path.join(self.path, f"{prefix}*.db"))):
            try:
                entries = MmapedDict.read_all_values_from_file(path)
            except (FileNotFoundError, struct.error):  # marked dead, or just made
                continue
            # A key is JSON: [metric, sample, labels, help] (prometheus_client's mmap_key).
            values = [v for key, v, *_ in entries if json.loads(key)[0] == PER_WORKER]
            if values:
                pid = os.path.basename(path)[len(prefix) : -len(".db")]
                per_worker.add_metric([pid], sum(values))
        yield per_worker


class ListenerMetrics:
    """The labelled children one listener's sessions use, bound once."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.metrics = metrics
        self.name = name
        self.connections = metrics.connections.labels(name)
        self.current = metrics.connections_current.labels(name)
        self.refused = metrics.connections_refused.labels(name)
        self.bytes_in = metrics.bytes_in.labels(name)
        self.bytes_out = metrics.bytes_out.labels(name)
        self.tls = metrics.tls_sessions.labels(name)
        self._outcomes = {o: metrics.sessions.labels(name, o) for o in OUTCOMES}

    def proxy_refused(self, reason: str) -> None:
        """A connection closed on a proxy_protocol listener (`reason`: one of
        `PROXY_REFUSALS`)."""
        self.metrics.proxy_refusals.labels(self.name, reason).inc()

    def session_ended(self, outcome: str, seconds: float) -> None:
        self._outcomes[outcome].inc()
        self.metrics.session_duration.observe(seconds)


class POP3Metrics:
    """The POP3 counters of one listener, bound once."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.commands = metrics.pop3_commands.labels(name)
        self.logins_ok = metrics.pop3_logins.labels(name, "success")
        self.logins_failed = metrics.pop3_logins.labels(name, "failure")
        self.retrieved = metrics.pop3_retrieved.labels(name)
        self.retrieved_bytes = metrics.pop3_retrieved_bytes.labels(name)
        self.deleted = metrics.pop3_deleted.labels(name)
