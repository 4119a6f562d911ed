"""The outbound queue on disk: a message file and an envelope record per entry.

    queue_dir/                       (default: mail_dir/.queue)
      messages/<id>                  the message, a hard link of its spool file
      records/<id>.json              the envelope and every remote recipient's state
      quarantine/                    records (and their messages) that cannot be read

A record is written whole to a temporary name, fsynced, renamed over the old
one, and the folder fsynced: a crash leaves the old record or the new one,
never half of either. An entry is made durable (message fsynced and linked,
record written, both folders fsynced) before the client is told `250`, in
one trip to the threadpool. A recipient is marked delivered (record rewritten,
fsynced) as soon as the remote server says `250`, so a restart re-sends at
most the attempts that were in flight.

On start every record is read again. One that cannot be read, or whose
message is missing, is moved to `quarantine/` and reported, never deleted and
never fatal; a message without a record (the crash came between the link and
the record, so it was never acknowledged) is removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..storage import SpoolFile, StorageError
from ..storage.maildir import Delivery
from ..storage.modes import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, make_folder
from ..storage.spool import fsync_path
from ..storage.spool import unlink_quietly as _unlink_quietly

Offload = Callable[..., Any]
RECORD_VERSION = 1

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass
class QueuedRecipient:
    """One remote recipient of a queued message, and how far its delivery got."""

    address: str  # as the client gave it (the RCPT forward-path)
    domain: str  # where it goes (lower-case; an address literal as written)
    notify: list[str] | None = None  # RFC 3461 NOTIFY (NEVER, SUCCESS, FAILURE, DELAY)
    orcpt: str | None = None  # RFC 3461 ORCPT, as received (xtext)
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    status: str | None = None  # the last enhanced status code ("4.4.1", "2.0.0", "5.1.1")
    last_error: str | None = None  # the last failure, for the log, the DSN and `queue show`
    remote_mta: str | None = None
    delay_warned: bool = False


@dataclass
class QueueRecord:
    """A queued message's envelope and its recipients' states (records/<id>.json)."""

    id: str
    sender: str  # the reverse-path; "" is the null sender <>: never bounced to
    arrival: float
    recipients: list[QueuedRecipient]
    size: int = 0
    ret: str | None = None  # RFC 3461 RET (FULL / HDRS)
    envid: str | None = None  # RFC 3461 ENVID, as received (xtext)
    smtputf8: bool = False
    body: str | None = None  # BODY=8BITMIME
    client: str = ""
    auth_user: str | None = None
    held: bool = False  # an operator's hold: no attempts until released
    version: int = RECORD_VERSION

    @property
    def pending(self) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def done(self) -> bool:
        return not self.pending

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QueueRecord:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("version") != RECORD_VERSION:
            raise ValueError("not a queue record of this version")
        recipients = [QueuedRecipient(**r) for r in raw.pop("recipients")]
        record = cls(recipients=recipients, **raw)
        if not record.recipients or not isinstance(record.id, str):
            raise ValueError("a queue record without recipients or id")
        return record


@dataclass
class Loaded:
    """What reading the queue at start found."""

    records: list[QueueRecord] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # ids moved aside, with why
    orphans: int = 0  # messages without a record, removed


class QueueStore:
    def __init__(self, root: Path, *, fsync: bool = True, offload: Offload | None = None) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.offload = offload or (lambda fn, *args: fn(*args))
        self.messages = str(self.root / "messages")
        self.records = str(self.root / "records")
        self.quarantine_dir = str(self.root / "quarantine")
        try:
            # Private to the server, whatever the umask (`storage.modes`).
            for folder in (str(self.root), self.messages, self.records, self.quarantine_dir):
                make_folder(folder, PRIVATE_DIR_MODE)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        #: True when the spool is on this filesystem: entries are links, else copies.
        self.link = True

    def message_path(self, queue_id: str) -> str:
        return f"{self.messages}/{queue_id}"

    def _record_path(self, queue_id: str) -> str:
        return f"{self.records}/{queue_id}.json"

    # ------------------------------------------------------------ write

    def add(self, spool: SpoolFile, record: QueueRecord) -> Delivery:
        """Queue a spooled message: durable before it returns (StorageError if not).

        The returned `Delivery` takes the entry back (a later destination failed)."""
        made: list[str] = []
        try:
            spool.flush()
            self.offload(self._add, spool, record, made)
        except BaseException as exc:
            Delivery(made).undo()
            if isinstance(exc, OSError):
                raise StorageError.wrap(exc) from exc
            raise
        return Delivery(made)

    def _add(self, spool: SpoolFile, record: QueueRecord, made: list[str]) -> None:
        if self.fsync:
            spool.fsync()
        target = self.message_path(record.id)
        if self.link:
            os.link(spool.path, target)
        else:
            _copy(spool.path, target, self.fsync)
        made.append(target)
        made.append(self._record_path(record.id))
        self._write_record(record, sync_dirs=False)
        if self.fsync:
            fsync_path(self.messages)
            fsync_path(self.records)

    def save(self, record: QueueRecord) -> None:
        """Write a changed record (a recipient delivered, a retry scheduled)."""
        try:
            self.offload(self._write_record, record)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc

    def _write_record(self, record: QueueRecord, sync_dirs: bool = True) -> None:
        final = self._record_path(record.id)
        tmp = f"{self.records}/.{record.id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            data = memoryview(record.to_json())
            while data:
                data = data[os.write(fd, data) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        if self.fsync and sync_dirs:
            fsync_path(self.records)

    def remove(self, queue_id: str) -> None:
        """The entry is finished (every recipient delivered or given up)."""
        # The record goes first: a message without a record is an orphan, removed
        # at the next start; a record without its message would be quarantined.
        _unlink_quietly(self._record_path(queue_id))
        _unlink_quietly(self.message_path(queue_id))

    # ------------------------------------------------------------- read

    def load(self, mine: Callable[[str], bool] | None = None, clean: bool = True) -> Loaded:
        """Every entry on disk (those `mine` selects); unreadable ones moved to
        quarantine/.

        With `clean`, what a dead process left half-written goes: a record
        being written, a message file whose record never came. Only when no
        other process may be writing entries (at the server's start): a worker
        taking over its share of a running server's queue passes False.
        """
        out = Loaded()
        with_record: set[str] = set()
        for name in sorted(os.listdir(self.records)):
            path = f"{self.records}/{name}"
            if name.startswith("."):  # a record being written (when the process died)
                if clean:
                    _unlink_quietly(path)
                continue
            queue_id = name.removesuffix(".json")
            if mine is not None and not mine(queue_id):
                with_record.add(queue_id)
                continue
            try:
                with open(path, "rb") as f:
                    record = QueueRecord.from_json(f.read())
                if record.id != queue_id:
                    raise ValueError(f"the record says it is {record.id!r}")
                if not os.path.exists(self.message_path(queue_id)):
                    raise ValueError("its message file is missing")
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self._quarantine(name, queue_id)
                out.quarantined.append(f"{queue_id}: {exc}")
                continue
            with_record.add(queue_id)
            out.records.append(record)
        for name in os.listdir(self.messages) if clean else ():
            if name not in with_record:
                _unlink_quietly(f"{self.messages}/{name}")
                out.orphans += 1
        return out

    def _quarantine(self, record_name: str, queue_id: str) -> None:
        for src in (f"{self.records}/{record_name}", self.message_path(queue_id)):
            if os.path.exists(src):
                os.replace(src, f"{self.quarantine_dir}/{os.path.basename(src)}")

    def open_message(self, queue_id: str):  # type: ignore[no-untyped-def]
        """The queued message as a binary file (the caller closes it)."""
        try:
            return open(self.message_path(queue_id), "rb")
        except OSError as exc:
            raise StorageError.wrap(exc) from exc


def _copy(src: str, dst: str, fsync: bool) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, PRIVATE_FILE_MODE)
    if fsync:
        fsync_path(dst, directory=False)
