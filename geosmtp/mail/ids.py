"""Message (queue) ids: unique across restarts and processes."""

from __future__ import annotations

import itertools
import os
import time

_counter = itertools.count(1)
# The start time in microseconds and the pid: no two processes share a prefix.
_PREFIX = f"{time.time_ns() // 1000:X}{os.getpid() & 0xFFFF:04X}"


def new_queue_id() -> str:
    """This process's prefix and a counter, in hex."""
    return f"{_PREFIX}{next(_counter):06X}"
