"""The `filters:` stages: external programs and Python callables in the pipeline.

Every stage shares one policy (`FilterStage`): whether it applies to a
message (`enabled`, `roles`, `mail`), a slot among `filter_concurrency`
before it runs (waited for until the message's reply is due, then `451`),
its `timeout`, and what its failure means (`on_failure`). The two kinds
differ only in how they run: `ProgramStage` (a program, `program.py`) and
`PythonStage` (a callable in the filter thread pool, or as a greenlet).

`Filters` builds the stages from the config and holds what they share: the
slots, the thread pool, the spool their rewrites are written to.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import gevent
from gevent.lock import BoundedSemaphore
from gevent.threadpool import ThreadPool
from loguru import logger

from .. import logs
from ..config import Config, Filter
from ..pipeline import Accept, Message, Reject, Replace, StageResult, TempFail
from ..storage import Spool, StorageError
from ..storage.spool import read_return_path, without_return_paths
from .calls import StageContext, is_cooperative, load_callable
from .program import EXIT_REJECT, EXIT_TEMPFAIL, PROGRAM_PATH, reply_text, run_program

_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


class Slot:
    """A slot taken: `release()` gives it back (once, however often it is called).
    A run that outlives its stage (a Python stage's thread past its timeout)
    is `handed_off`: it releases the slot itself when it really ends."""

    __slots__ = ("_semaphore", "_slots", "handed_off")

    def __init__(self, slots: Slots, semaphore: BoundedSemaphore) -> None:
        self._slots: Slots | None = slots
        self._semaphore = semaphore
        self.handed_off = False

    def release(self) -> None:
        if self._slots is not None:
            self._slots.running -= 1
            self._slots = None
            self._semaphore.release()


class Slots:
    """Filter runs at once (`filter_concurrency`): a program, or a Python stage's
    thread, holds a slot until it has really ended."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore = BoundedSemaphore(limit)
        self.running = 0
        self.waiting = 0

    def resize(self, limit: int) -> None:
        """A new limit for runs that start from now; runs in flight give their
        slot back where they took it."""
        if limit != self.limit:
            self.limit = limit
            self._semaphore = BoundedSemaphore(limit)

    def acquire(self, timeout: float) -> Slot | None:
        """Wait up to `timeout` seconds for a slot (None when none came free)."""
        semaphore = self._semaphore
        self.waiting += 1
        try:
            if not semaphore.acquire(timeout=max(timeout, 0.0)):
                return None
        finally:
            self.waiting -= 1
        self.running += 1
        return Slot(self, semaphore)


class Filters:
    """The configured filter stages and what they share."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.slots = Slots(1)
        self._pool: ThreadPool | None = None
        self.stages: list[FilterStage] = []
        self.hostname = ""
        self.max_wait = 600.0  # for a message without a deadline (none from a session)
        self.default_max_output = 0

    def configure(self, config: Config) -> None:
        """Build the stages of `config` (messages already in the pipeline go on
        with the ones they began with)."""
        self.hostname = config.hostname
        self.max_wait = config.timeouts.data_total
        self.default_max_output = 2 * config.limits.max_message_size
        self.slots.resize(config.filter_concurrency)
        if self._pool is not None:
            self._pool.maxsize = config.filter_concurrency
        self.stages = [
            (ProgramStage if f.command is not None else PythonStage)(f, self)
            for f in config.filters
        ]

    @property
    def pool(self) -> ThreadPool:
        """The threads Python stages run in: not the hub's, so that a slow or
        stuck stage can never hold up the storage's fsyncs."""
        if self._pool is None:
            self._pool = ThreadPool(self.slots.limit)
        return self._pool

    def by_name(self, name: str) -> FilterStage | None:
        for stage in self.stages:
            if stage.name == name:
                return stage
        return None


class FilterStage:
    """What every filter stage does around its run (see the module's docstring)."""

    kind = "?"

    def __init__(self, conf: Filter, filters: Filters) -> None:
        self.conf = conf
        self.name = conf.name
        self.filters = filters
        self.roles = frozenset(conf.roles) if conf.roles is not None else None

    def applies(self, message: Message) -> bool:
        """Enabled, and the message is one it is for. Reports the server writes
        itself (no listener role) never pass through a filter: a failing filter
        must not cost a bounce."""
        conf = self.conf
        if not conf.enabled or not message.role:
            return False
        if self.roles is not None and message.role not in self.roles:
            return False
        if conf.mail == "all":
            return True
        outbound = bool(message.envelope.remote)
        return outbound if conf.mail == "outbound" else not outbound

    def process(self, message: Message) -> StageResult:
        now = time.monotonic()
        deadline = message.deadline if message.deadline is not None else now + self.filters.max_wait
        slot = self.filters.slots.acquire(deadline - now)
        if slot is None:
            logger.warning(
                "{}: filter {}: no free slot (filter_concurrency {}) before the reply was due",
                message.queue_id,
                self.name,
                self.filters.slots.limit,
            )
            return TempFail("no free filter slot in time", failure="busy")
        try:
            timeout = min(self.conf.timeout, deadline - time.monotonic())
            if timeout <= 0:
                return TempFail("no time left to run the filter", failure="busy")
            outcome = self._run(message, timeout, slot)
        finally:
            if not slot.handed_off:
                slot.release()
        if isinstance(outcome, str):
            return self._failed(message, outcome)
        if isinstance(outcome, Replace):
            return self._own_return_path_only(outcome)
        return outcome

    def _own_return_path_only(self, rewrite: Replace) -> Replace:
        """The rewrite without the `Return-Path:` fields the filter wrote: the
        server's own (the first line, put back by the stage) is the only one a
        local copy keeps, and the relay passes none on. StorageError as the
        pipeline takes it from a stage."""
        try:
            rewrite.spool.flush()
            new = without_return_paths(self.filters.spool, rewrite.spool)
        except StorageError:
            rewrite.spool.remove()
            raise
        if new is None:
            return rewrite
        rewrite.spool.remove()
        return Replace(new)

    def _run(self, message: Message, timeout: float, slot: Slot) -> StageResult | str:
        """The stage's own verdict, or a failure ("timeout", "exit=3", ...)."""
        raise NotImplementedError

    def _failed(self, message: Message, failure: str) -> StageResult:
        policy = self.conf.on_failure
        reason = f"failed ({failure}), on_failure: {policy}"
        if policy == "pass":
            return Accept(failure=failure)
        if policy == "reject":
            return Reject(reason, failure=failure)
        return TempFail(reason, failure=failure)

    def _open(self, message: Message) -> tuple[BinaryIO, bytes]:
        """The spooled message for reading, after its Return-Path (returned)."""
        try:
            source = open(message.spool.path, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        try:
            return source, read_return_path(source)
        except BaseException:
            source.close()
            raise

    def info(self) -> dict[str, Any]:
        """What the management API shows of this stage."""
        conf = self.conf
        return {
            "name": self.name,
            "kind": self.kind,
            "command": conf.command,
            "call": conf.call,
            "enabled": conf.enabled,
            "roles": conf.roles,
            "mail": conf.mail,
            "timeout": conf.timeout,
            "max_output": conf.max_output,
            "on_failure": conf.on_failure,
        }


class ProgramStage(FilterStage):
    """An external program: the message on stdin, the new one on stdout."""

    kind = "command"

    def _run(self, message: Message, timeout: float, slot: Slot) -> StageResult | str:
        argv = self.conf.command or []
        max_output = self.conf.max_output or self.filters.default_max_output
        source, return_path = self._open(message)
        try:
            output = self.filters.spool.open()
            try:
                output.write(return_path)  # the program sees and writes the message without it
                run = run_program(
                    argv,
                    self.environment(message),
                    source,
                    output,
                    timeout=timeout,
                    max_output=max_output,
                )
            except BaseException:
                output.remove()
                raise
        finally:
            source.close()
        said = reply_text(run.stderr)
        if run.failure is None and run.status == 0 and run.output:
            return Replace(output)
        output.remove()
        if run.failure is None and run.status == 0:
            return Accept()  # nothing on stdout: the message goes on unchanged
        if run.failure is None and run.status == EXIT_TEMPFAIL:
            return TempFail(f"exit {EXIT_TEMPFAIL}: {said or 'no reason given'}", text=said)
        if run.failure is None and run.status == EXIT_REJECT:
            return Reject(f"exit {EXIT_REJECT}: {said or 'no reason given'}", text=said)
        if run.failure is not None:
            failure = run.failure
        elif run.status is not None and run.status < 0:
            failure = f"signal={-run.status}"
        else:
            failure = f"exit={run.status}"
        logger.warning(
            "{}: filter {}: {}{}",
            message.queue_id,
            self.name,
            run.error or failure.replace("=", " "),
            _stderr_summary(run.stderr),
        )
        return failure

    def environment(self, message: Message) -> dict[str, str]:
        """The program's whole environment (docs/filters.md lists it): the
        envelope and where the message came from, and a PATH; nothing of the
        server's own."""
        env = message.envelope
        values = {
            "PATH": PROGRAM_PATH,
            "GEOSMTP_STAGE": self.name,
            "GEOSMTP_QUEUE_ID": message.queue_id,
            "GEOSMTP_SENDER": env.sender_address,
            "GEOSMTP_RECIPIENTS": " ".join(r.mailbox.address for r in env.recipients),
            "GEOSMTP_CLIENT_ADDRESS": message.client,
            "GEOSMTP_HELO": env.helo,
            "GEOSMTP_AUTH_USER": env.auth_user or "",
            "GEOSMTP_ROLE": message.role,
            "GEOSMTP_TLS": "yes" if env.tls else "no",
            "GEOSMTP_SIZE": str(message.size),
            "GEOSMTP_HOSTNAME": self.filters.hostname,
        }
        # A NUL cannot pass exec (and none of these can hold one after the parser).
        return {k: v.replace("\0", "") for k, v in values.items()}


class PythonStage(FilterStage):
    """A Python callable (`calls.py` has its contract)."""

    kind = "call"

    def __init__(self, conf: Filter, filters: Filters) -> None:
        super().__init__(conf, filters)
        self.function = load_callable(conf.call or "")
        self.cooperative = is_cooperative(self.function)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "cooperative": self.cooperative}

    def _run(self, message: Message, timeout: float, slot: Slot) -> StageResult | str:
        source, return_path = self._open(message)
        context = StageContext(
            stage=self.name,
            queue_id=message.queue_id,
            client=message.client,
            role=message.role,
            size=message.size,
            hostname=self.filters.hostname,
            _spool=self.filters.spool,
            _return_path=return_path,
        )

        def call() -> Any:
            # An exception comes back as a value: raised in the greenlet or
            # the thread, gevent would also log it as an unhandled error.
            try:
                return self.function(message.envelope, source, context)
            except Exception as exc:
                return _Raised(exc)

        if self.cooperative:
            return self._in_greenlet(message, call, timeout, source, context)
        return self._in_thread(message, call, timeout, source, context, slot)

    def _in_greenlet(
        self,
        message: Message,
        call: Callable[[], Any],
        timeout: float,
        source: BinaryIO,
        context: StageContext,
    ) -> StageResult | str:
        greenlet = gevent.spawn(call)
        try:
            greenlet.join(timeout)
            ended = greenlet.ready()
        finally:
            greenlet.kill()  # at a timeout (or when this greenlet is killed): stop it
            source.close()
        if not ended:
            context.discard_unused(None)
            return self._log_failure(message, "timeout", f"no result after {timeout:g} s")
        return self._outcome(message, greenlet, context)

    def _in_thread(
        self,
        message: Message,
        call: Callable[[], Any],
        timeout: float,
        source: BinaryIO,
        context: StageContext,
        slot: Slot,
    ) -> StageResult | str:
        pending = self.filters.pool.spawn(call)
        ended = False
        try:
            pending.wait(timeout)
            ended = pending.ready()
        finally:
            if not ended:
                # A thread cannot be stopped: its slot, its file and whatever it
                # wrote are given back when it ends, whenever that is.
                slot.handed_off = True
                gevent.spawn(self._after_thread, pending, source, context, slot)
        if not ended:
            return self._log_failure(message, "timeout", f"no result after {timeout:g} s")
        source.close()
        return self._outcome(message, pending, context)

    def _outcome(self, message: Message, done: Any, context: StageContext) -> StageResult | str:
        """What the callable returned (or raised), as a verdict or a failure."""
        result = done.value if done.successful() else _Raised(done.exception)
        if isinstance(result, _Raised):
            context.discard_unused(None)
            return self._raised(message, result.exception)
        verdict = self._verdict(message, result, context)
        context.discard_unused(verdict.spool if isinstance(verdict, Replace) else None)
        return verdict

    @staticmethod
    def _after_thread(pending: Any, source: BinaryIO, context: StageContext, slot: Slot) -> None:
        try:
            pending.wait()
        finally:
            source.close()
            context.discard_unused(None)
            slot.release()

    def _verdict(self, message: Message, result: Any, context: StageContext) -> StageResult | str:
        """The callable's result as the pipeline takes it; anything else is a failure."""
        if isinstance(result, Accept):
            return Accept()
        if isinstance(result, Replace):
            if not context.made(result.spool):
                return self._log_failure(
                    message, "error", "returned Replace() of a file not from context.new_message()"
                )
            return Replace(result.spool)
        if isinstance(result, TempFail):
            code, status = _own_reply(result.code, result.status, 4, 451, "4.3.0")
            return TempFail(result.reason, code, status, reply_text(result.text))
        if isinstance(result, Reject):
            code, status = _own_reply(result.code, result.status, 5, 554, "5.7.1")
            return Reject(result.reason, code, status, reply_text(result.text))
        return self._log_failure(
            message, "error", f"returned {logs.clean(repr(result), 100)}, not a verdict"
        )

    def _raised(self, message: Message, exc: BaseException | None) -> str:
        logger.opt(exception=exc).warning(
            "{}: filter {}: the callable raised {}", message.queue_id, self.name, type(exc).__name__
        )
        return "error"

    def _log_failure(self, message: Message, failure: str, detail: str) -> str:
        logger.warning("{}: filter {}: {}", message.queue_id, self.name, detail)
        return failure


class _Raised:
    """What a Python stage raised, returned from its greenlet or thread."""

    __slots__ = ("exception",)

    def __init__(self, exception: BaseException | None) -> None:
        self.exception = exception


def _stderr_summary(stderr: bytes) -> str:
    """ "; stderr: first line ... last line" for the log (a traceback's last line
    says what it was), or "" when it wrote nothing."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    shown = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return "; stderr: " + logs.clean(shown, 400)


def _own_reply(
    code: Any, status: Any, kind: int, default_code: int, default_status: str
) -> tuple[int, str]:
    """A Python stage's code and status if they are of the right class (4 or 5),
    else the defaults: a stage cannot turn a TempFail into a 5xx or a 2xx."""
    if not (isinstance(code, int) and code // 100 == kind):
        code = default_code
    if not (isinstance(status, str) and _STATUS_RE.fullmatch(status) and status[0] == str(kind)):
        status = default_status
    return code, status
