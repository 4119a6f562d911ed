"""The master process: binds, reads what is secret, starts and watches workers.

Postfix's and nginx's model. The master runs as whoever started geosmtp
(root on a real host, to bind ports below 1024). It binds every listener,
reads the TLS key, the DKIM key, the smarthost password and the admin API's
tokens (`app.prepare`, `Runtime.admin_tokens`), then forks `workers:`
processes that drop to `user:` before they read a client byte. It never
reads a client byte itself and never runs a gevent loop: it waits in
`select` on its signals, each worker's log pipe and each worker's control
channel, nothing else.

- **A worker that dies** is logged and replaced (at once, or after a pause
  that doubles while replacements keep dying young).
- **SIGTERM/SIGINT** reach every worker as SIGTERM: each stops accepting and
  lets its sessions finish under `timeouts.shutdown_grace`.
- **SIGHUP, `POST /api/v1/reload` and `PATCH /api/v1/config`**: the master
  reads and checks the new config (secrets included); if anything is wrong
  nothing changes anywhere. Else it starts a new generation of workers on it
  and, once they all serve, retires the old ones (as nginx does): their open
  sessions finish on the config they began with.
- **The outbound queue** is shared out by queue id (`mail.ids.share_of`):
  worker *i* delivers share *i* while it holds the share's lock, so two
  processes never deliver one entry, even while an old worker finishes.
- **Logs**: workers write their lines into a pipe each; the master is the one
  writer of the files, so rotation stays one process's job (`logpipe`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gevent import monkey
from loguru import logger

from .. import __version__, logs
from .. import config as cfg
from ..config import Config, ConfigError
from ..storage.modes import (
    LOG_DIR_MODE,
    MAIL_ROOT_MODE,
    PRIVATE_DIR_MODE,
    apply_umask,
    make_folder,
)
from . import logpipe, notify, privileges
from .host import Runtime
from .listeners import bind, bind_unix
from .shared import SharedState
from .worker import WorkerContext

# The master blocks in the kernel's calls, never in gevent's (it runs no loop).
_fork = monkey.get_original("os", "fork")
#: gevent's `os.close` defers the close to its loop's next turn after a fork.
_close = monkey.get_original("os", "close")
_waitpid = monkey.get_original("os", "waitpid")
_select = monkey.get_original("select", "select")
_signal = monkey.get_original("signal", "signal")
_socketpair = monkey.get_original("socket", "socketpair")

#: A worker that dies sooner than this after its start is "dying young": its
#: replacement waits, from 1 s doubling to `MAX_RESPAWN_DELAY`.
YOUNG = 5.0
MAX_RESPAWN_DELAY = 30.0
#: After the stop's grace, what a worker gets to end before it is killed.
STOP_MARGIN = 15.0


@dataclass(eq=False)
class Worker:
    """The master's view of one worker process."""

    pid: int
    index: int
    generation: Generation
    reader: logpipe.Reader
    control: socket.socket
    started: float
    slot: int  # its counters in the shared state
    ready: bool = False
    retiring: bool = False


@dataclass(eq=False)
class Generation:
    """Workers started on one config; a reload starts the next generation."""

    number: int
    config: Config
    prepared: Any
    workers: dict[int, Worker] = field(default_factory=dict)  # by index
    #: Whom to answer once it serves or fails: (the asking worker's channel, change).
    waiting: list[tuple[socket.socket | None, Any]] = field(default_factory=list)
    serving: bool = False


class StartError(Exception):
    """The first workers could not start: the reason, and the exit status."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


class Master:
    def __init__(
        self,
        config: Config,
        loader: Any,
        account: privileges.Account | None,
        path: str | None = None,
        *,
        runtime: Runtime,
    ) -> None:
        self.config = config
        self.runtime = runtime  # builds what the workers run
        self.loader = loader  # reads the file again (with -l/-p/-d), for reload
        self.path = path  # the config file, for the log
        self.account = account
        self.count = config.worker_count
        #: The listening sockets each worker index serves: one set shared by
        #: all, or with `reuse_port` a set per index (the kernel spreads the
        #: connections among them). Kept open here for every later worker.
        self.bound: list[list[tuple[cfg.Listener, socket.socket]]] = []
        self.admin: socket.socket | None = None
        #: The UNIX sockets' files made by `bind` (path, inode), removed by `close`.
        self.socket_files: list[tuple[str, int]] = []
        self.token: str | None = None  # the admin API's write token
        self.read_token: str | None = None  # and its read-only one, if configured
        self.workers: dict[int, Worker] = {}  # by pid, every generation
        self.current: Generation | None = None
        self.next: Generation | None = None  # starting, after a reload
        self.stopping = False
        # Connections and failed logins, counted by every worker (slot each):
        # room for two generations and workers still finishing after reloads.
        self.shared = SharedState(4 * self.count + 4)
        self._free_slots = list(range(self.shared.slots))
        self._generations = 0
        self._signals: list[int] = []
        self._reload_pending = False
        self._respawn: dict[int, float] = {}  # index -> when to start it again
        self._young_deaths: dict[int, int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------ start

    def bind(self) -> None:
        """Bind every listener and the admin listener (OSError names the address)."""
        config = self.config
        sets = self.count if config.reuse_port else 1
        try:
            for index in range(sets):
                bound = []
                for i, listener in enumerate(config.listeners):
                    if listener.path is not None:  # issue 21: one UNIX socket for every set
                        unix = self.bound[0][i][1] if index else self._bind_unix(listener)
                        bound.append((listener, unix))
                        continue
                    # Port 0: the first socket gets a port, the others take the same.
                    port = self.bound[0][i][1].getsockname()[1] if index else listener.port
                    sock = bind(listener.address, port, config.listen_backlog, config.reuse_port)
                    bound.append((listener, sock))
                    if index == 0:
                        host, port = sock.getsockname()[:2]
                        logger.info("listening on [{}]:{} ({})", host, port, listener.role)
                self.bound.append(bound)
            if config.admin.enabled:
                self.token, self.read_token = self.runtime.admin_tokens(config.admin)
                admin = config.admin
                self.admin = bind(admin.address, admin.port, 128)
                host, port = self.admin.getsockname()[:2]
                logger.info("admin API listening on http://{}:{}/api/v1/", host, port)
        except BaseException:
            self.close()
            raise

    # issue 21: LMTP in, on a UNIX socket
    def _bind_unix(self, listener: cfg.Listener) -> socket.socket:
        """The listener's UNIX socket, owned by the workers' account (if any);
        removed again by `close`."""
        path = str(listener.path)
        owner = (self.account.uid, self.account.gid) if self.account is not None else None
        sock = bind_unix(path, listener.mode, self.config.listen_backlog, owner)
        self.socket_files.append((path, os.stat(path).st_ino))
        logger.info("listening on {} ({}, mode {:o})", path, listener.role, listener.mode)
        return sock

    def start(self, prepared: Any) -> None:
        """The first generation: worker 0 first (it clears what a crash left in
        the spool and the queue before anyone serves), then the rest.
        StartError when one cannot start."""
        # No SIGCHLD handler: gevent's loop (which workers inherit) has its own,
        # and a worker's end shows here as the end of its log pipe.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            _signal(signum, self._on_signal)
        signal.set_wakeup_fd(self._wake_w)
        gen = self._generation(self.config, prepared)
        self.current = gen
        self._spawn(gen, 0, clean=True)
        self._wait_ready(gen, [0])
        for index in range(1, self.count if not self.stopping else 1):
            self._spawn(gen, index)
        self._wait_ready(gen, list(range(1, self.count)))
        gen.serving = True
        if self._reload_pending and not self.stopping:  # a SIGHUP came while starting
            self._reload_pending = False
            self.reload_file(None)

    def _wait_ready(self, gen: Generation, indexes: list[int]) -> None:
        while not all(gen.workers[i].ready for i in indexes if i in gen.workers):
            failure = self._step()
            if failure is not None:
                raise StartError(*failure)
            if self.stopping:  # a stop signal while starting: a stop like any other
                return

    def _generation(self, config: Config, prepared: Any) -> Generation:
        self._generations += 1
        return Generation(self._generations, config, prepared)

    def _spawn(self, gen: Generation, index: int, clean: bool = False) -> None:
        slot = self._free_slots.pop(0)  # the callers made sure there is one
        self.shared.reset_slot(slot)
        r, w = logpipe.pipe()
        ours, theirs = _socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctx = WorkerContext(
            config=gen.config,
            prepared=gen.prepared,
            account=self.account,
            index=index,
            count=self.count,
            bound=self.bound[index % len(self.bound)],
            admin=self.admin,
            token=self.token,
            read_token=self.read_token,
            log_fd=w,
            control=theirs,
            master_pid=os.getpid(),
            clean=clean,
            shared=self.shared,
            slot=slot,
            start=self.runtime.start_worker,
        )
        # What the master made so far moves to the collector's permanent
        # generation: a worker's collections then never touch (and so never
        # copy) the pages it shares with the master.
        gc.freeze()
        pid = _fork()
        if pid == 0:  # the worker
            try:
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGTERM, signal.SIGHUP):
                    _signal(signum, signal.SIG_DFL)
                for fd in (r, self._wake_r, self._wake_w, ours.fileno()):
                    _close(fd)
                for other in self.workers.values():
                    other.reader.close()
                    other.control.close()
                for bound in self.bound:  # another worker's sockets (reuse_port)
                    if bound is not ctx.bound:
                        for _listener, sock in bound:
                            if all(sock is not own for _, own in ctx.bound):  # UNIX: shared
                                sock.close()
                from .worker import run

                run(ctx)
            finally:
                os._exit(70)
        _close(w)
        theirs.close()
        worker = Worker(pid, index, gen, logpipe.Reader(r), ours, time.monotonic(), slot)
        self.workers[pid] = worker
        gen.workers[index] = worker

    # ------------------------------------------------------------- loop

    def run(self) -> None:
        """Watch the workers until a stop signal and the last worker's end."""
        deadline = None
        while True:
            self._step()
            if self.stopping:
                if not self.workers:
                    return
                if deadline is None:
                    deadline = time.monotonic() + self.config.timeouts.shutdown_grace + STOP_MARGIN
                elif time.monotonic() > deadline:
                    for pid in list(self.workers):
                        logger.warning("worker {} did not stop: killed", pid)
                        _kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + STOP_MARGIN

    def _step(self, timeout: float = 1.0) -> tuple[str, int] | None:
        """Wait for something to do and do it. A first-start failure comes back
        as (reason, status)."""
        now = time.monotonic()
        if self._respawn:
            timeout = max(0.0, min(timeout, min(self._respawn.values()) - now))
        readers = {w.reader.fd: w for w in self.workers.values()}
        controls = {w.control.fileno(): w for w in self.workers.values()}
        try:
            ready, _, _ = _select([self._wake_r, *readers, *controls], [], [], timeout)
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass
        failure = None
        for fd in ready:
            if fd in readers:
                readers[fd].reader.read()
            elif fd in controls:
                failure = self._message(controls[fd]) or failure
        failure = self._handle_signals() or failure
        failure = self._reap() or failure
        self._respawn_due()
        return failure

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> tuple[str, int] | None:
        failure = None
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                if self.current is None or not self.current.serving:
                    self._reload_pending = True  # once every worker serves
                elif not self.stopping:
                    self.reload_file(None)
            elif not self.stopping:
                logger.info("signal received, stopping")
                self.stop()
        return failure

    # ---------------------------------------------------------- workers

    def _message(self, worker: Worker) -> tuple[str, int] | None:
        try:
            data = worker.control.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            return None  # the worker ended; reaped on SIGCHLD
        try:
            message = json.loads(data)
        except ValueError:
            logger.error("worker {}: unreadable control message", worker.pid)
            return None
        if message.get("ready"):
            worker.ready = True
            self._check_serving(worker.generation)
            return None
        if "failed" in message:
            return self._failed(worker, message["failed"], int(message.get("status", 1)))
        op = message.get("op")
        if op == "reload":
            self.reload_file(worker.control)
        elif op == "change":
            self.change(message.get("config"), worker.control)
        else:
            _reply(worker.control, {"error": f"unknown request {op!r}"})
        return None

    def _failed(self, worker: Worker, reason: str, status: int) -> tuple[str, int] | None:
        gen = worker.generation
        if gen is self.current and not gen.serving:
            return reason, status  # the start fails
        if gen is self.next:
            self._abandon(gen, reason)
            return None
        logger.error("worker {} could not start: {}", worker.index, reason)
        return None

    def _reap(self) -> tuple[str, int] | None:
        failure = None
        while True:
            try:
                pid, status = _waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return failure
            if pid == 0:
                return failure
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            failure = self._ended(worker, status) or failure

    def _ended(self, worker: Worker, status: int) -> tuple[str, int] | None:
        for _ in range(1000):  # what it wrote before it died (bounded: never spin)
            if not worker.reader.read():
                break
        worker.reader.close()
        worker.control.close()
        if self.shared.count(worker.slot):  # it died with connections open: whose?
            self.shared.clients.forget_open()
        self.shared.reset_slot(worker.slot)  # what it had open when it died
        self._free_slots.append(worker.slot)
        _metrics_dead(worker.pid)
        folder = os.environ.get("GEOSMTP_RUN_DIR")
        if folder:  # a worker killed cannot remove its control socket itself
            with contextlib.suppress(OSError):
                os.unlink(f"{folder}/worker-{worker.pid}.sock")
        gen = worker.generation
        if gen.workers.get(worker.index) is worker:
            del gen.workers[worker.index]
        how = _how(status)
        if worker.retiring or self.stopping:
            logger.debug("worker {} (pid {}) ended: {}", worker.index, worker.pid, how)
            return None
        if gen is self.current and not gen.serving:
            return f"a worker ended while starting: {how}", 1
        if gen is self.next and not worker.ready:
            self._abandon(gen, f"a new worker ended while starting: {how}")
            return None
        logger.error(
            "worker {} (pid {}) ended unexpectedly: {}; starting another",
            worker.index,
            worker.pid,
            how,
        )
        if gen is self.current:
            young = time.monotonic() - worker.started < YOUNG
            deaths = self._young_deaths.get(worker.index, 0) + 1 if young else 0
            self._young_deaths[worker.index] = deaths
            delay = 0.0 if deaths <= 1 else min(MAX_RESPAWN_DELAY, 2.0 ** (deaths - 2))
            self._respawn[worker.index] = time.monotonic() + delay
        return None

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for index, at in list(self._respawn.items()):
            if at <= now:
                del self._respawn[index]
                gen = self.current
                if self.stopping or gen is None or index in gen.workers:
                    continue
                if not self._free_slots:  # workers of old generations still finishing
                    self._respawn[index] = now + 1.0
                    continue
                self._spawn(gen, index)

    # ----------------------------------------------------------- reload

    def reload_file(self, asker: socket.socket | None) -> None:
        """SIGHUP or the API's reload: the file again, restart keys kept."""
        try:
            if self.loader is None:
                raise ConfigError("reload: the server was started without a config file")
            self._begin(self.loader(), True, asker)
        except ConfigError as exc:
            logger.error("reload refused, configuration unchanged: {}", exc)
            if asker is not None:
                _reply(asker, {"error": str(exc)})

    def change(self, mapping: Any, asker: socket.socket) -> None:
        """The API's PATCH: a whole config mapping, no restart key changed."""
        try:
            # The API checked it too; the master, as root, does not take a
            # worker's word for it (keys naming files or programs: the file).
            cfg.check_runtime_change(cfg.to_mapping(self.config), mapping)
            self._begin(cfg.from_mapping(mapping), False, asker)
        except ConfigError as exc:
            _reply(asker, {"error": str(exc)})

    def _begin(self, new: Config, allow_restart_keys: bool, asker: socket.socket | None) -> None:
        if self.next is not None:
            raise ConfigError("a configuration change is already starting; try again")
        if len(self._free_slots) < self.count:
            raise ConfigError("too many workers still finishing their sessions; try again")
        running, change = self.runtime.plan_change(
            self.config, new, allow_restart_keys=allow_restart_keys
        )
        prepared = self.runtime.prepare(running)  # the keys, as root: ConfigError when unusable
        if running.log != self.config.log:
            logs.setup(running.log)
        notify.notify(notify.reloading())
        gen = self._generation(running, prepared)
        gen.waiting.append((asker, change))
        self.next = gen
        for index in range(self.count):
            self._spawn(gen, index)

    def _check_serving(self, gen: Generation) -> None:
        if gen is not self.next or not all(w.ready for w in gen.workers.values()):
            return
        if len(gen.workers) < self.count:
            return
        old, self.current, self.next = self.current, gen, None
        gen.serving = True
        notify.notify(notify.READY)
        self.config = gen.config
        self._respawn.clear()
        self._young_deaths.clear()
        if old is not None:
            retire = {"retire": cfg.to_mapping(gen.config)}
            for worker in old.workers.values():
                worker.retiring = True
                _reply(worker.control, retire)  # the new timeouts, for its open sessions
                _kill(worker.pid, signal.SIGTERM)
        for asker, change in gen.waiting:
            if change.changed:
                logger.info("configuration changed: {}", ", ".join(change.changed))
            if change.restart:
                logger.warning(
                    "reloaded; these need a restart to change: {}", ", ".join(change.restart)
                )
            elif asker is None:
                logger.info("reloaded {}", self.path)
            if asker is not None:
                _reply(
                    asker,
                    {
                        "changed": change.changed,
                        "restart": change.restart,
                        "config": cfg.to_mapping(gen.config),
                    },
                )
        gen.waiting.clear()

    def _abandon(self, gen: Generation, reason: str) -> None:
        """A new generation that could not start: stop it, keep the running one."""
        logger.error("configuration change refused, nothing changed: {}", reason)
        for worker in gen.workers.values():
            worker.retiring = True
            _kill(worker.pid, signal.SIGKILL)
        for asker, _change in gen.waiting:
            if asker is not None:
                _reply(asker, {"error": reason})
        gen.waiting.clear()
        self.next = None
        notify.notify(notify.READY)  # still serving, on the running config

    # ------------------------------------------------------------- stop

    def stop(self) -> None:
        """Every worker gets SIGTERM (and its grace); `run` returns when all ended."""
        self.stopping = True
        notify.notify(notify.STOPPING)
        self._respawn.clear()
        for worker in self.workers.values():
            _kill(worker.pid, signal.SIGTERM)
        # No worker starts again: once the workers have closed theirs, a new
        # client is refused by the kernel instead of waiting in a backlog.
        self.close()

    def close(self) -> None:
        for bound in self.bound:
            for _listener, sock in bound:
                sock.close()
        if self.admin is not None:
            self.admin.close()
        for path, inode in self.socket_files:  # issue 21: only if still ours
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        self.socket_files.clear()


def _reply(asker: socket.socket, message: dict) -> None:
    try:
        asker.send(json.dumps(message).encode())
    except OSError:  # the asking worker is gone
        pass


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _metrics_dead(pid: int) -> None:
    """A dead worker's live gauges leave the totals (multiprocess metrics)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from ..metrics import mark_process_dead

        mark_process_dead(pid)


# ---------------------------------------------------------------- serve


def _make_folder(key: str, path: Path, mode: int, owner: privileges.Account | None) -> None:
    """Create a configured folder for the workers' account (an existing one is
    left as the operator set it up); OSError names the key and the path."""
    try:
        make_folder(path, mode, None if owner is None else (owner.uid, owner.gid))
    except OSError as exc:
        raise OSError(exc.errno, f"{key}: cannot create '{path}': {exc.strerror}") from None


def serve(
    config: Config, loader: Any, prepared: Any, path: str | None = None, *, runtime: Runtime
) -> int:
    """Run the server: the master's whole life, its workers started with
    `runtime`. The exit status."""
    import sys

    from .listeners import raise_open_files_limit

    try:
        who, note = privileges.account(config.user, config.group)
    except ConfigError as exc:
        print(f"geosmtp: {exc}", file=sys.stderr)
        return 2
    apply_umask()
    try:
        _make_folder("log.dir", config.log.dir, LOG_DIR_MODE, None)
        if who is not None:  # the master writes the logs; the account's group reads them
            os.chown(config.log.dir, -1, who.gid)
            os.chmod(config.log.dir, LOG_DIR_MODE | stat.S_ISGID)  # files take its group
        logs.setup(config.log)
    except (OSError, ValueError) as exc:
        print(f"geosmtp: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2
    if note is not None:
        (logger.warning if who is None and os.geteuid() == 0 else logger.info)(note)
    nofile = raise_open_files_limit()
    run_dir = Path(os.environ["GEOSMTP_RUN_DIR"])  # cli._run_dir made it
    master = Master(config, loader, who, path, runtime=runtime)
    try:
        for key, folder, mode in (
            ("mail_dir", config.mail_dir, MAIL_ROOT_MODE),
            ("spool_dir", config.spool_path, PRIVATE_DIR_MODE),
            ("relay.queue_dir", config.queue_path, PRIVATE_DIR_MODE),
        ):
            _make_folder(key, folder, mode, who)
        for folder in (run_dir, run_dir / "metrics"):
            privileges.chown(folder, who)
        master.bind()
        preload()
        master.start(prepared)
    except (ConfigError, StartError, OSError) as exc:
        reason = str(exc)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            if exc.filename is not None:
                reason = f"{reason}: '{exc.filename}'"
        status = 2 if isinstance(exc, ConfigError) else 1
        if isinstance(exc, StartError):
            status = exc.status
        logger.error("cannot start: {}", reason)
        print(f"geosmtp: {reason}", file=sys.stderr)
        master.stop()
        master.run()
        master.close()
        return status
    if not master.stopping:
        logger.info(
            "geosmtp {} started as {}: mail_dir={} max_clients={} open files={} workers={} user={}",
            __version__,
            config.hostname,
            config.mail_dir,
            config.max_clients,
            nofile,
            master.count,
            who.name if who is not None else _whoami(),
        )
    if not master.stopping:
        notify.notify(f"{notify.READY}\n{notify.status(f'serving with {master.count} workers')}")
    try:
        master.run()
    except Exception:  # a bug here: stop the workers as a stop signal would
        logger.exception("master error: stopping")
        master.stop()
        master.run()
    finally:
        master.close()
    logger.info("stopped")
    return 0


#: Modules the code imports only when first needed (a record type, a codec,
#: gevent's resolver). Imported by the master before the fork: a worker that
#: dropped to `user:` may not be able to read the Python installation (under
#: /root, say).
PRELOAD = (
    "dns.rdtypes.ANY.CNAME",
    "dns.rdtypes.ANY.MX",
    "dns.rdtypes.ANY.NS",
    "dns.rdtypes.ANY.PTR",
    "dns.rdtypes.ANY.SOA",
    "dns.rdtypes.ANY.TXT",
    "dns.rdtypes.IN.A",
    "dns.rdtypes.IN.AAAA",
    "encodings.idna",
    "encodings.punycode",
    "gevent.resolver.thread",
    "geosmtp.admin.server",
)


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


def _whoami() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
