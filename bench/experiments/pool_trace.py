"""Where a durable write waits: geosmtp run with every threadpool trip timed.

    BENCH_GEOSMTP_TRACE=/tmp/trace.json python -m bench run throughput --quick
    python bench/experiments/pool_trace.py --summary /tmp/trace.json

With `BENCH_GEOSMTP_TRACE` set, the bench starts geosmtp through this file,
which wraps `geosmtp.server.threads.in_thread` before the app imports it
(and `ThreadPool.spawn`, to see when a task is queued) and records, for each
trip to the hub's threadpool (a Maildir commit: fsync of the file, link,
fsync of `new/`):

- `gate`: `ThreadPool.spawn` until the task is queued, i.e. the wait for a
  free slot of the pool (its greenlet semaphore, `maxsize` slots);
- `queue`: queued until a pool thread starts it;
- `run`: the work in the thread;
- `back`: the thread done until the calling greenlet runs again (the async
  watcher, the hub's callbacks, the GIL);
- `waiters`: greenlets already waiting for a slot when this one asked;
- `barged`: it got a slot at once (under 50 µs) although others were
  waiting (gevent's `Semaphore.acquire` takes a free count without looking
  at the waiters).

At exit (SIGTERM from the bench) the records go to the file as JSON; the
`--summary` form prints percentiles of each part.
"""

from __future__ import annotations

import atexit
import json
import math
import sys
import time
from typing import Any


def install(out: str) -> None:
    import gevent
    from gevent.threadpool import ThreadPool

    import geosmtp.server.threads as threads

    records: list[tuple[float, ...]] = []
    perf = time.perf_counter
    queued: dict[Any, float] = {}  # greenlet -> when its task entered the pool's queue
    spawn = ThreadPool.spawn

    def timed_spawn(self: ThreadPool, fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = spawn(self, fn, *args, **kwargs)
        queued[gevent.getcurrent()] = perf()
        return result

    ThreadPool.spawn = timed_spawn  # type: ignore[method-assign]
    real = threads.in_thread

    def in_thread(fn: Any, *args: Any) -> Any:
        hub = gevent.get_hub()
        sem = hub.threadpool._available_worker_threads_greenlet_sem
        fair = getattr(hub, "_geosmtp_slots", None)  # threads.FairSlots, where it exists
        waiters = sem.linkcount() + (len(fair.waiting) if fair is not None else 0)
        stamps = [0.0, 0.0]

        def run(*a: Any) -> Any:
            stamps[0] = perf()
            try:
                return fn(*a)
            finally:
                stamps[1] = perf()

        t0 = perf()
        try:
            return real(run, *args)
        finally:
            t1 = queued.pop(gevent.getcurrent(), t0)
            gate = t1 - t0
            queue, work, back = stamps[0] - t1, stamps[1] - stamps[0], perf() - stamps[1]
            records.append((t0, gate, queue, work, back, waiters, waiters > 0 and gate < 50e-6))

    threads.in_thread = in_thread

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(records, f)

    atexit.register(dump)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summary(path: str) -> None:
    with open(path) as f:
        records = json.load(f)
    names = ["gate", "queue", "run", "back"]
    print(f"{len(records)} threadpool trips")
    print(f"{'part':8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for i, name in enumerate(names, start=1):
        xs = [r[i] * 1000 for r in records]
        row = " ".join(f"{_pct(xs, q):8.2f}" for q in (50, 95, 99, 100))
        print(f"{name:8} {row}")
    total = [sum(r[1:5]) * 1000 for r in records]
    print(f"{'total':8} " + " ".join(f"{_pct(total, q):8.2f}" for q in (50, 95, 99, 100)))
    waited = [r for r in records if r[5] > 0]
    barged = [r for r in records if r[6]]
    print(
        f"asked while others waited for a slot: {len(waited)} ({len(waited) / len(records):.0%}); "
        f"waiters p50 {_pct([r[5] for r in records], 50)}, max {max(r[5] for r in records)}"
    )
    print(
        f"got a slot ahead of waiting greenlets (barged): {len(barged)} "
        f"({len(barged) / max(1, len(waited)):.0%} of those that found waiters)"
    )
    gate_waited = [r[1] * 1000 for r in records if r[5] > 0 and not r[6]]
    print(
        "gate wait of those that queued behind others: p50 "
        f"{_pct(gate_waited, 50):.1f} ms, p99 {_pct(gate_waited, 99):.1f} ms, "
        f"max {_pct(gate_waited, 100):.1f} ms"
    )


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
        sys.exit(0)
    from gevent import monkey

    monkey.patch_all()  # as geosmtp's main does, before anything else imports threading
    install(sys.argv[1])
    from geosmtp.cli import main

    sys.exit(main(sys.argv[2:]))
