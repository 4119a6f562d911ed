"""One path from a received message to every destination.

    spool ─► stages (filters) ─► router ─┬─► Maildir (local recipients)
                                         └─► outbound queue (remote ones; and
                                             local ones for an LMTP server,
                                             `delivery.lmtp`)

`Pipeline.process` takes a message that is whole in the spool and returns one
`Verdict` for the whole message (`process_each`: one per recipient, for
LMTP). `delivered` only once every destination has it durably (fsynced); if
one destination fails, the others are taken back, so a retry by the client
can never make a duplicate, and the verdict is a temporary failure. The
spool file is removed once the message is delivered or refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..mail import Recipient
from ..storage import StorageError
from ..storage.maildir import Delivery
from .message import Message, StageVerdict
from .router import NoRoute, Router
from .stages import Accept, Reject, Replace, Stage, TempFail, verdict_name


@dataclass(frozen=True)
class Verdict:
    """The pipeline's answer. The protocol shell words the reply: `delivered`
    is its `250`; a failure carries the stage's own reply (filters) or none,
    in which case the shell uses its wording for `no_space` / a local error."""

    delivered: bool
    temporary: bool = False  # 4xx (try again later) rather than 5xx
    reason: str = ""  # for the server log
    no_space: bool = False  # the disk or a quota is full: 452 4.3.1
    code: int | None = None  # a stage's refusal: its reply code and status,
    status: str | None = None
    text: str | None = None  # and its text (None: the server's wording)
    destinations: tuple[str, ...] = ()  # where it went, for logs and metrics
    stage: str | None = None  # the stage that refused it
    #: A stage's refusal: the metrics label it is counted under (`filter`,
    #: `sender-checks`, `dkim-sign`); None for every other failure (`storage`).
    group: str | None = None


class StageObserver(Protocol):
    """Told about every stage that ran (the server's metrics)."""

    def stage_done(self, stage: str, verdict: str, failure: str | None, seconds: float) -> None: ...


class Pipeline:
    def __init__(
        self,
        router: Router,
        stages: Sequence[Stage] = (),
        after_delivery: Callable[[Message], None] | None = None,
        observer: StageObserver | None = None,
    ) -> None:
        self.router = router
        #: Replaced whole (never changed in place) when the configuration
        #: changes: a message already in the stages goes on with the list it began.
        self.stages = list(stages)
        #: Called once a message is delivered everywhere, its spool file still
        #: there (success reports for NOTIFY=SUCCESS).
        self.after_delivery = after_delivery
        self.observer = observer

    def process(self, message: Message) -> Verdict:
        """Filter, route and deliver `message`; the spool file is gone afterwards."""
        try:
            verdict = self._filter(message)
            if verdict is None:
                verdict = self._deliver(message)
            return verdict
        finally:
            message.spool.remove()

    def process_each(self, message: Message) -> list[Verdict]:
        """`process` with one verdict per recipient, in the envelope's order (LMTP,
        RFC 2033 §4.2): the stages run once, for the whole message; then each
        mailbox gets its own delivery, so one that fails fails its recipients
        alone. Recipients of one mailbox share its delivery (one copy) and its
        verdict. The spool file is gone afterwards."""
        try:
            refused = self._filter(message)
            if refused is not None:
                return [refused] * len(message.envelope.recipients)
            return self._deliver_each(message)
        finally:
            message.spool.remove()

    def _deliver_each(self, message: Message) -> list[Verdict]:
        envelope = message.envelope
        if self.router.local is self.router.remote:
            # delivery.lmtp: the queue takes every recipient in one entry under
            # the message's queue id (one per mailbox would each claim that id),
            # and its runner answers for each recipient on the way out.
            return [self._deliver(message)] * len(envelope.recipients)
        by_box: dict[object, list[Recipient]] = {}
        for recipient in envelope.recipients:
            # A remote recipient (box None) is delivered on its own.
            key = recipient.box if recipient.box is not None else id(recipient)
            by_box.setdefault(key, []).append(recipient)
        outcome: dict[int, Verdict] = {}
        delivered: set[int] = set()
        made: list[Delivery] = []
        try:
            for group in by_box.values():
                part = dataclasses.replace(
                    message, envelope=dataclasses.replace(envelope, recipients=tuple(group))
                )
                verdict, done = _place(self.router, part)
                made += done
                for recipient in group:
                    outcome[id(recipient)] = verdict
                if verdict.delivered:
                    delivered.update(map(id, group))
        except BaseException:
            # Stopped half-way (a kill at a stop): no reply goes out, so no
            # mailbox keeps a copy the client's retry would duplicate.
            for delivery in made:
                delivery.undo()
            raise
        for delivery in made:
            delivery.commit()
        if delivered and self.after_delivery is not None:
            ordered = tuple(r for r in envelope.recipients if id(r) in delivered)
            self.after_delivery(
                dataclasses.replace(
                    message, envelope=dataclasses.replace(envelope, recipients=ordered)
                )
            )
        return [outcome[id(r)] for r in envelope.recipients]

    def _filter(self, message: Message) -> Verdict | None:
        stages = self.stages
        if not stages:
            return None
        try:
            message.spool.flush()  # stages read the file: all of it must be there
        except StorageError as exc:
            return Verdict(False, True, str(exc), no_space=exc.no_space)
        for stage in stages:
            applies = getattr(stage, "applies", None)
            if applies is not None and not applies(message):
                continue
            started = time.perf_counter()
            result = None
            try:
                result = stage.process(message)
                if isinstance(result, Replace):
                    result.spool.flush()
            except StorageError as exc:  # the stage could not write its rewrite
                if isinstance(result, Replace):
                    result.spool.remove()
                self._observe(message, stage.name, "tempfail", "storage", started)
                return Verdict(
                    False,
                    True,
                    f"{stage.name}: {exc}",
                    no_space=exc.no_space,
                    stage=stage.name,
                )
            if not isinstance(result, Accept | Replace | TempFail | Reject):
                raise TypeError(f"stage {stage.name!r} returned {result!r}")
            failure = None if isinstance(result, Replace) else result.failure
            self._observe(message, stage.name, verdict_name(result), failure, started)
            if isinstance(result, Accept):
                continue
            if isinstance(result, Replace):
                message.spool.remove()
                message.spool = result.spool
                continue
            return Verdict(
                False,
                isinstance(result, TempFail),
                f"{stage.name}: {result.reason}",
                code=result.code,
                status=result.status,
                text=result.text,
                stage=stage.name,
                group=getattr(stage, "group", "filter"),
            )
        return None

    def _observe(
        self, message: Message, stage: str, verdict: str, failure: str | None, started: float
    ) -> None:
        message.verdicts.append(StageVerdict(stage, verdict, failure))
        if self.observer is not None:
            self.observer.stage_done(stage, verdict, failure, time.perf_counter() - started)

    def _deliver(self, message: Message) -> Verdict:
        verdict = deliver(self.router, message)
        if verdict.delivered and self.after_delivery is not None:
            self.after_delivery(message)
        return verdict


def deliver(router: Router, message: Message) -> Verdict:
    """`message` to every destination the router gives its recipients, all or
    nothing; no stage runs and nothing is called after. The pipeline's last
    step, and the port that the queue's reports come in by (`queue.reports`):
    the server's own messages, which no stage needs to see again. The spool
    file stays (the caller removes it)."""
    verdict, done = _place(router, message)
    for delivery in done:
        delivery.commit()
    return verdict


def _place(router: Router, message: Message) -> tuple[Verdict, list[Delivery]]:
    """`deliver` less the commit: the verdict, and the deliveries made (none
    when it failed), for the caller to commit or take back."""
    try:
        routes = router.route(message.envelope.recipients)
    except NoRoute as exc:
        return Verdict(False, True, str(exc)), []
    done = []
    try:
        for destination, recipients in routes:
            done.append(destination.deliver(message, recipients))
    except StorageError as exc:
        for delivery in done:  # all or nothing: no destination keeps a copy
            delivery.undo()
        return Verdict(False, True, str(exc), no_space=exc.no_space), []
    except BaseException:
        for delivery in done:
            delivery.undo()
        raise
    return Verdict(True, destinations=tuple(d.name for d, _ in routes)), done
