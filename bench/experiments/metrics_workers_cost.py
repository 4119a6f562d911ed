"""What counting one message costs, with one process and with workers (multiprocess mode).

    python bench/experiments/metrics_workers_cost.py [MESSAGES]

Times the metrics calls one message from `smtp-source` causes (one message per
connection: the connection counted, opened and closed, the two tallies the
SMTP core hands over, bytes, the delivery counters and histograms, the
session's end), MESSAGES times (20,000), best of 5 in CPU time (steadier than
wall time on a shared machine), in a fresh interpreter for
each of: one process or PROMETHEUS_MULTIPROC_DIR set, with and without
gevent's monkey-patching (the server runs patched, so its locks are gevent's).
The end-to-end server cost of a message is ~1.3-1.6 ms of CPU (fsync on;
docs/management.md "The metrics").
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CASE = """
import os, sys, time, timeit
if sys.argv[2] == "gevent":
    from gevent import monkey
    monkey.patch_all()
from geosmtp.metrics import Metrics

m = Metrics()
lm = m.listener("mx:[127.0.0.1]:25")


def message():
    lm.connections.inc()
    lm.current.inc()
    m.add_counts({"EHLO": 1, "MAIL": 1, "RCPT": 1, "DATA": 1, "2xx": 4, "3xx": 1})
    lm.bytes_in.inc(1500)
    lm.bytes_out.inc(200)
    m.delivery_seconds.observe(0.002)
    m.messages_accepted.inc()
    m.recipients.inc(1)
    m.message_size.observe(1500)
    m.add_counts({"QUIT": 1, "2xx": 1})
    lm.bytes_in.inc(6)
    lm.bytes_out.inc(40)
    lm.current.dec()
    lm.session_ended("quit", 0.01)


n = int(sys.argv[1])
best = min(timeit.repeat(message, timer=time.process_time, number=n, repeat=5)) / n
print(f"{best * 1e6:.1f}")
"""


def main() -> None:
    messages = sys.argv[1] if len(sys.argv) > 1 else "20000"
    print(f"{'mode':<14} {'gevent':<8} {'µs per message':>15}")
    for mode in ("one process", "workers"):
        for patch in ("plain", "gevent"):
            env = dict(os.environ)
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            with tempfile.TemporaryDirectory() as directory:
                if mode == "workers":
                    env["PROMETHEUS_MULTIPROC_DIR"] = directory
                out = subprocess.run(
                    [sys.executable, "-c", CASE, messages, patch],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
            print(f"{mode:<14} {patch:<8} {out.stdout.strip():>15}")


if __name__ == "__main__":
    main()
