"""Every worker's sessions and queue share, as one server to the admin API.

Each worker answers on a Unix socket of its own in the server's private
run folder (`worker-<pid>.sock`, mode 0700 folder): one JSON request a
connection, one JSON reply. Whichever worker serves an admin request asks
every worker (itself directly) and puts the answers together: `ctl
sessions` lists every worker's sessions, `kick` reaches the one that has the
session, `queue` operations reach the worker whose share holds the entry.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent
import greenlet
from gevent import socket as gsocket
from gevent.server import StreamServer
from loguru import logger

from ..queue.runner import QueueBusy

if TYPE_CHECKING:
    from .host import ClusterHost

#: Seconds a worker gets to answer (it is on this machine and never blocks).
TIMEOUT = 5.0
MAX_REQUEST = 64 * 1024


class Busy(Exception):
    """The queue entry has a delivery attempt in flight (`QueueBusy` in its worker)."""


def run_dir() -> Path | None:
    """The server's private folder for worker sockets (set by the master)."""
    value = os.environ.get("GEOSMTP_RUN_DIR")
    return Path(value) if value else None


def socket_path(folder: Path, pid: int) -> str:
    return str(folder / f"worker-{pid}.sock")


class Cluster:
    """What the admin API asks of the whole server, and this worker's answers."""

    def __init__(self, app: ClusterHost, folder: Path | None) -> None:
        self.app = app
        self.folder = folder
        self._server: StreamServer | None = None

    # ------------------------------------------------------------ serve

    def start(self) -> None:
        if self.folder is None:
            return
        path = socket_path(self.folder, os.getpid())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        self._server = StreamServer(sock, self._handle)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None and self.folder is not None:  # start() needs a folder
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(socket_path(self.folder, os.getpid()))

    def _handle(self, sock: gsocket.socket, address: Any) -> None:
        try:
            sock.settimeout(TIMEOUT)
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = sock.recv(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
            request = json.loads(data)
            reply = self.local(request["op"], request.get("arg"))
            sock.sendall(json.dumps(reply).encode() + b"\n")
        except Exception:
            logger.exception("worker control request failed")
        finally:
            sock.close()

    def local(self, op: str, arg: Any = None) -> Any:
        """This worker's answer to `op`."""
        return getattr(self, f"_op_{op}")(arg)

    # --------------------------------------------------- this worker's ops

    def _op_sessions(self, arg: Any) -> list[dict]:
        pid = os.getpid()
        return [{**s.info(), "worker": pid} for s in list(self.app.by_id.values())]

    def _op_kick(self, session_id: str) -> str | None:
        session = self.app.by_id.get(session_id)
        if session is None:
            return None
        session.kick()
        logger.info("admin closed session {} ([{}])", session_id, session.peer)
        return session.peer

    def _op_queue(self, arg: Any) -> list[dict]:
        return self.app.queue.entries()

    def _known(self, queue_id: str) -> str | None:
        """The id as this worker's queue knows it (ids are upper-case hex)."""
        records = self.app.queue.records
        for candidate in (queue_id, queue_id.upper()):
            if candidate in records:
                return candidate
        return None

    def _op_entry(self, queue_id: str) -> dict | None:
        known = self._known(queue_id)
        return None if known is None else self.app.queue.entry(known)

    def _op_flush(self, queue_id: str | None) -> dict | None:
        queue = self.app.queue
        if queue_id is None:
            held = queue.held_count()
            return {"flushed": queue.flush() - held, "held": held}
        known = self._known(queue_id)
        if known is None:
            return None
        held = queue.records[known].held
        queue.flush(known)
        logger.info("admin flushed queue entry {}", known)
        return {"flushed": known, "held": held}

    def _op_hold(self, queue_id: str) -> dict | None:
        known = self._known(queue_id)
        return None if known is None else {"held": known, "changed": self.app.queue.hold(known)}

    def _op_release(self, queue_id: str) -> dict | None:
        known = self._known(queue_id)
        if known is None:
            return None
        return {"released": known, "changed": self.app.queue.release(known)}

    def _op_delete(self, queue_id: str) -> dict | None:
        known = self._known(queue_id)
        if known is None:
            return None
        try:
            record = self.app.queue.delete(known)
        except QueueBusy as exc:
            return {"busy": str(exc)}
        return {"deleted": known, "pending": [r.address for r in record.pending]}

    def _op_runtime(self, arg: Any) -> dict:
        return runtime_counts(len(self.app.by_id))

    def _op_publish(self, arg: Any) -> bool:
        self.app.metrics.publish()
        return True

    # ------------------------------------------------------ the whole server

    def ask_all(self, op: str, arg: Any = None) -> list[Any]:
        """Every live worker's answer to `op` (this one's first)."""
        answers = [self.local(op, arg)]
        if self.folder is None:
            return answers
        me = socket_path(self.folder, os.getpid())
        paths = [str(p) for p in sorted(self.folder.glob("worker-*.sock")) if str(p) != me]
        jobs = [gevent.spawn(_ask, path, op, arg) for path in paths]
        gevent.joinall(jobs, timeout=TIMEOUT + 1)
        for job in jobs:
            if job.successful() and job.value is not _GONE:
                answers.append(job.value)
        return answers

    def first(self, op: str, arg: Any, found: Callable[[Any], bool] = bool) -> Any:
        """The answer of the worker that knows `arg` (None when none does)."""
        return next((a for a in self.ask_all(op, arg) if a is not None and found(a)), None)

    def publish_metrics(self) -> None:
        """Every worker writes its queue and filter gauges now, so that a scrape
        sees the queue as it is (they also do so every second on their own)."""
        self.ask_all("publish")

    def sessions(self) -> list[dict]:
        return [info for answer in self.ask_all("sessions") for info in answer]

    def runtime(self) -> list[dict]:
        """Every worker's process figures (`runtime_counts`), by pid."""
        return sorted(self.ask_all("runtime"), key=lambda r: r["pid"])

    def queue_entries(self) -> list[dict]:
        entries = [e for answer in self.ask_all("queue") for e in answer]
        return sorted(entries, key=lambda e: (e["arrival"], e["id"]))


_GONE = object()


def runtime_counts(sessions: int) -> dict:
    """This process's live greenlets, open descriptors and resident memory.

    What a leak shows in: the fault and soak proofs read them before and after.
    Counting greenlets walks every object the collector tracks (tens of
    milliseconds with thousands of sessions, the worker serving nothing
    meanwhile), so it is asked for on demand, never scraped.
    """
    greenlets = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))
    try:
        descriptors = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (not Linux)
        descriptors, rss = -1, -1
    return {
        "pid": os.getpid(),
        "greenlets": greenlets,
        "descriptors": descriptors,
        "rss_bytes": rss,
        "sessions": sessions,
    }


def _ask(path: str, op: str, arg: Any) -> Any:
    """One worker's answer; `_GONE` when it has ended (its socket is stale)."""
    sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return _GONE
        sock.sendall(json.dumps({"op": op, "arg": arg}).encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        return json.loads(data) if data else _GONE
    finally:
        sock.close()
