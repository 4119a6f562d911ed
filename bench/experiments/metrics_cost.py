"""What the metrics cost: geosmtp with metrics on, and with every metrics call a no-op.

    python bench/experiments/metrics_cost.py [ROUNDS] [MESSAGES] [MODES]

MODES (`on,off` by default) may add `workers`: metrics on, in prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR set to a fresh directory), as each
worker of a master runs them.

Alternates the two, ROUNDS each (3 by default), each a fresh server (fsync
on, log level WARNING) driven by Postfix's `smtp-source -s 100 -l 1024` with
MESSAGES messages (10,000). Prints msgs/s and the server's CPU per message
(user + system, from wait4), then the medians. CPU per message is the steadier
figure on a shared machine. Needs /usr/sbin/smtp-source (Debian's postfix).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def serve(mode: str, config: str) -> None:
    """Run geosmtp in this process, its metrics made no-ops when mode is 'off'."""
    from gevent import monkey

    monkey.patch_all()
    import geosmtp.metrics as m

    if mode == "off":

        class Null:
            def inc(self, *args: object, **kwargs: object) -> None:
                pass

            dec = observe = set = set_function = inc

            def labels(self, *args: object) -> Null:
                return self

        init = m.Metrics.__init__

        def null_init(self: m.Metrics) -> None:
            init(self)
            for name, value in list(vars(self).items()):
                if hasattr(value, "inc") or hasattr(value, "observe"):
                    setattr(self, name, Null())

        m.Metrics.__init__ = null_init  # type: ignore[method-assign]
        m.Metrics.add_counts = lambda self, counts: None  # type: ignore[method-assign]
        m.ListenerMetrics.session_ended = lambda self, o, s: None  # type: ignore[method-assign]
    from geosmtp.cli import main

    sys.exit(main(["-c", config]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(mode: str, root: Path, messages: int) -> tuple[float, float]:
    port = free_port()
    mail = root / "mail_dir"
    shutil.rmtree(mail, ignore_errors=True)
    config = root / "cfg.yaml"
    config.write_text(
        f"hostname: perf.test\ndomains: [perf.test]\n"
        f"listeners: [{{address: 127.0.0.1, port: {port}}}]\n"
        f"mail_dir: {mail}\nfsync: true\nlog: {{dir: {root}/logs, level: WARNING}}\n"
    )
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if mode == "workers":
        shutil.rmtree(root / "metrics", ignore_errors=True)
        (root / "metrics").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(root / "metrics")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.recv(100)
                    s.sendall(b"QUIT\r\n")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.05)
        start = time.perf_counter()
        subprocess.run(
            ["/usr/sbin/smtp-source", "-s", "100", "-m", str(messages), "-l", "1024",
             "-t", "u@perf.test", "-f", "s@x.org", f"127.0.0.1:{port}"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        stored = len(os.listdir(mail / "u" / "new"))
        if stored != messages:
            raise SystemExit(f"{mode}: {stored} messages stored, {messages} sent")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(proc.pid, 0)
    cpu_us = (usage.ru_utime + usage.ru_stime) / messages * 1e6
    return messages / elapsed, cpu_us


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    modes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["on", "off"]
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as tmp:
        for i in range(rounds):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                rate, cpu = one_run(mode, Path(tmp), messages)
                results[mode].append((rate, cpu))
                load = os.getloadavg()[0]
                print(f"round {i + 1} metrics {mode:7}: {rate:7.1f} msgs/s, "
                      f"server CPU {cpu:5.0f} us/msg (load {load:.1f})", flush=True)  # fmt: skip
    med = {m: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
           for m, v in results.items()}  # fmt: skip
    for mode, (rate, cpu) in med.items():
        print(f"median metrics {mode:7}: {rate:7.1f} msgs/s, server CPU {cpu:5.0f} us/msg")
    base = "off" if "off" in med else modes[0]
    for mode in modes:
        if mode != base:
            (rate, cpu), (base_rate, base_cpu) = med[mode], med[base]
            print(f"{mode} against {base}: {(cpu - base_cpu) / base_cpu:+.1%} server CPU "
                  f"per message, {(base_rate - rate) / base_rate:+.1%} throughput")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
