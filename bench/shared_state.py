"""Micro-benchmark of the state the workers share (server/shared.py).

    python -m bench.shared_state

What a connection costs at accept and close (the listeners' cap check), in one
process and through `SharedState`, alone and with processes contending for the
lock; and what a failed login costs the throttle, with either store.
"""

from __future__ import annotations

import fcntl
import os
import time
import timeit

from geosmtp.auth import AuthThrottle
from geosmtp.server.shared import LocalConnections, SharedState


def per_call(fn, number: int = 100_000) -> float:
    """Best of five, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def open_close(counter) -> None:
    if counter.try_open(1_000_000):
        counter.closed()


def contended(processes: int, seconds: float = 1.0) -> float:
    """Open+close pairs per second, all processes together, each in its own slot."""
    state = SharedState(processes)
    read, write = os.pipe()
    pids = []
    for slot in range(processes):
        pid = os.fork()
        if pid == 0:
            state.bind(slot)
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(100):
                    open_close(state)
                n += 100
            os.write(write, f"{n}\n".encode())
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(write)
    with os.fdopen(read) as results:
        return sum(int(line) for line in results) / seconds


def main() -> None:
    local = LocalConnections()
    by_id: dict[str, int] = {}

    def old_check() -> None:  # what Listeners did before: len(by_id) against the cap
        if len(by_id) < 1_000_000:
            by_id["s"] = 1
            del by_id["s"]

    print(f"old len(by_id) check + add/del     {per_call(old_check):7.2f} us")
    print(f"LocalConnections open+close        {per_call(lambda: open_close(local)):7.2f} us")
    for slots in (1, 4, 64):
        state = SharedState(slots)
        state.bind(0)
        us = per_call(lambda state=state: open_close(state))
        print(f"SharedState({slots:2}) open+close        {us:7.2f} us")
    fd = state.memory.fd

    def lock_pair() -> None:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_UN)

    print(f"  of which one lockf lock+unlock   {per_call(lock_pair):7.2f} us")
    for processes in (1, 2, 4, 8):
        rate = contended(processes)
        print(f"{processes} processes contending: {rate:10,.0f} open+close/s in all")
    addresses = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(200_000)]
    for name, records in (("local", None), ("shared", SharedState(1).throttle_records)):
        throttle = AuthThrottle(max_failures=1 << 30, records=records)
        at = iter(range(1 << 40))

        def failed_login(throttle=throttle, at=at) -> None:
            address = addresses[next(at) % len(addresses)]
            throttle.failed(address, throttle.reserve(address))

        us = per_call(failed_login, 20_000)
        print(f"throttle ({name:6}) reserve+failed  {us:7.2f} us (100,000 kept: evicting)")


if __name__ == "__main__":
    main()
