"""The outbound queue on disk: a message file and an envelope record per entry.

    queue_dir/                       (default: mail_dir/.queue)
      messages/<id>                  the message, a hard link of its spool file
      records/<id>.json              the envelope and every queued recipient's state
      quarantine/                    entries that cannot be used: <id>.json and <id>

A record is written whole to a temporary name, fsynced, renamed over the old
one, and the folder fsynced: a crash leaves the old record or the new one,
never half of either. An entry is made durable (message fsynced and linked,
record written, both folders fsynced) before the client is told `250`, in
one trip to the threadpool. A recipient is marked delivered (record rewritten,
fsynced) as soon as the remote server says `250`, so a restart re-sends at
most the attempts that were in flight.

On start every record is read again, and every field of it checked
(`read_record`). One that cannot be read or used (not JSON, a field of the
wrong type or value, its message missing) is moved to `quarantine/` with its
message, as Postfix moves a damaged queue file to `corrupt/`: reported (one
log line naming the file and the field, a metric), never deleted, never
fatal; the rest of the queue is delivered. A message without a record (the
crash came between the link and the record, so it was never acknowledged) is
removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..config import QUEUE_FOLDERS
from ..smtp.parser import MAX_PATH, SyntaxProblem, is_valid_domain, parse_mailbox
from ..storage import SpoolFile, StorageError
from ..storage.maildir import Delivery
from ..storage.modes import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, make_real_folder
from ..storage.spool import fsync_path
from ..storage.spool import unlink_quietly as _unlink_quietly

Offload = Callable[..., Any]
RECORD_VERSION = 1

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass
class QueuedRecipient:
    """One recipient of a queued message (remote, or local over LMTP) and how far it got."""

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
    #: Its final outcome (failed, or delivered with NOTIFY=SUCCESS) is to be
    #: reported and the report is not made yet: saved with the outcome, cleared
    #: once the report is made, so a crash in between makes it at the next start.
    report_due: bool = False
    #: A local recipient delivered over LMTP (`delivery.lmtp`): the address the
    #: LMTP server is given (its mailbox at its domain). None: a remote one.
    lmtp: str | None = None


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
    def unreported(self) -> list[QueuedRecipient]:
        """Finished recipients whose report is still to be made (`report_due`)."""
        return [r for r in self.recipients if r.report_due and r.state != PENDING]

    @property
    def done(self) -> bool:
        """Nothing left to do: no recipient pending, no report owed."""
        return not self.pending and not self.unreported

    def to_json(self) -> bytes:
        """What `dataclasses.asdict` gives, made field by field: asdict copies
        every value deeply, and this runs for every entry in the threadpool
        holding the GIL (45 µs a record against 15)."""
        fields = {name: getattr(self, name) for name in _RECORD_FIELDS}
        fields["recipients"] = [
            {name: getattr(r, name) for name in _RECIPIENT_FIELDS} for r in self.recipients
        ]
        return json.dumps(fields, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QueueRecord:
        """A record as written by `to_json`; BadRecord for anything else."""
        return read_record(data)


#: The fields `to_json` writes, in the dataclasses' order.
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(QueueRecord))
_RECIPIENT_FIELDS = tuple(f.name for f in dataclasses.fields(QueuedRecipient))


# ---------------------------------------------------------------- checking
# A record is read back only through `read_record`, at start and wherever else
# one is read: every field's type and value is checked, so the runner, the
# reports and the management API meet only what `QueueDestination` writes.
# Anything else is a BadRecord naming the field, and the entry goes to
# quarantine/ (Postfix's corrupt/): a disk fault, a hand edit or a bug must not
# stop the server, nor lose the message (an unknown `state` once meant
# "done": the entry was removed unsent). A field added to the dataclasses
# needs its check here; the unit tests fail until it has one.


class BadRecord(ValueError):
    """A queue record that cannot be used; `field` says where: `next_attempt`,
    `recipients[1].state`, `json` (not JSON at all), `message` (its file is gone)."""

    def __init__(self, field: str, problem: str, *value: Any) -> None:
        shown = f" ({_shown(value[0])})" if value else ""
        super().__init__(f"{field}: {problem}{shown}")
        self.field = field


def _shown(value: Any) -> str:
    """A bad value as a log line shows it: its repr (escaped), shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: A check returns what is wrong with a value, or None when it fits.
Check = Callable[[Any], str | None]

#: The last time `datetime` can show (9999-12-31T23:59:59Z): the API's and DSN's dates.
_LAST_TIME = 253402300799.0
#: The largest count (attempts, octets) a record holds: JSON's safe integers.
_MOST = 2**53
#: The longest text a record holds in `last_error` and `remote_mta`: more than
#: any the runner writes (a remote reply is cut at `client.MAX_TEXT`, 2,000
#: characters), which it cuts to this too (`shortened`) so that no reply, nor
#: an exception's text, ever makes its own record unreadable.
MAX_TEXT = 4096
#: The client's address (`[192.0.2.1]`, `[IPv6:...]`) and the login name.
MAX_NAME = 255
_QUEUE_ID_RE = re.compile(r"[0-9A-Za-z]{1,64}")
_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_XTEXT_RE = re.compile(r"[\x21-\x7e]+")  # RFC 3461 §4: xtext is printable US-ASCII
_NOTIFY = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


def _text(limit: int) -> Check:
    """A string of at most `limit` characters, all of them UTF-8's."""

    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return "not a string"
        if len(value) > limit:
            return f"longer than {limit} characters"
        return None if _is_utf8(value) else "not UTF-8 text"

    return check


def _is_utf8(value: str) -> bool:
    """No lone surrogate (JSON's "\\ud800"): what the server writes never has
    one, and the parser, a DSN or a log line would fail on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shortened(text: str, tail: str = "") -> str:
    """`text` then `tail`, cut to `MAX_TEXT` characters in all: what the
    runner writes into `last_error` and `remote_mta` (the tail is kept)."""
    room = MAX_TEXT - len(tail)
    if len(text) > room:
        text = text[: max(room - 3, 0)] + "..."
    return (text + tail)[:MAX_TEXT]


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "not true or false"


def _count(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return "not a whole number"
    return None if 0 <= value <= _MOST else f"not between 0 and {_MOST}"


def _time(value: Any) -> str | None:
    """Seconds since the epoch, as `time.time()` gives them."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "not a number"
    if not 0 <= value <= _LAST_TIME:  # NaN fails this too (json reads `NaN`)
        return "not a time between 1970 and 9999"
    return None


def _queue_id(value: Any) -> str | None:
    if not isinstance(value, str) or not _QUEUE_ID_RE.fullmatch(value):
        return "not a queue id (letters and digits)"
    return None


def _address(value: Any) -> str | None:
    """local-part@domain as the SMTP core takes it (`parse_mailbox`, SMTPUTF8
    allowed), at most `MAX_PATH` characters as a path is (RFC 5321 §4.5.3.1.3):
    what the reports parse again, and what goes into MAIL and RCPT."""
    problem = _text(MAX_PATH)(value)
    if problem is not None:
        return problem
    try:
        parse_mailbox(value, utf8=True)
    except SyntaxProblem:
        return "not local-part@domain"
    return None


def _sender(value: Any) -> str | None:
    """The reverse-path: an address, or "" for the null sender <>."""
    return None if value == "" else _address(value)


def _domain(value: Any) -> str | None:
    if _text(MAX_PATH)(value) is not None or not is_valid_domain(value, utf8=True):
        return "not a domain"
    return None


def _xtext(value: Any) -> str | None:
    """ENVID: xtext, at most 100 characters (RFC 3461 §4.4)."""
    if not isinstance(value, str) or len(value) > 100 or not _XTEXT_RE.fullmatch(value):
        return "not xtext of at most 100 characters"
    return None


def _orcpt(value: Any) -> str | None:
    """ORCPT: addr-type ";" xtext (RFC 3461 §4.2), as the session takes it."""
    if not isinstance(value, str) or len(value) > 500:
        return "not addr-type;xtext"
    addr_type, _, address = value.partition(";")
    if not addr_type.replace("-", "").isalnum() or not _XTEXT_RE.fullmatch(address):
        return "not addr-type;xtext"
    return None


def _notify(value: Any) -> str | None:
    """NOTIFY: NEVER alone, or some of SUCCESS, FAILURE, DELAY (RFC 3461 §4.1)."""
    if not isinstance(value, list) or not value or not all(isinstance(w, str) for w in value):
        return "not a list of NOTIFY words"
    words = set(value)
    if len(words) != len(value) or not words <= _NOTIFY or ("NEVER" in words and len(words) > 1):
        return "not NEVER, or some of SUCCESS, FAILURE, DELAY"
    return None


def _status(value: Any) -> str | None:
    if not isinstance(value, str) or not _STATUS_RE.fullmatch(value):
        return "not an enhanced status code (RFC 3463)"
    return None


def _one_of(*allowed: str) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value in allowed:
            return None
        return "not one of " + ", ".join(allowed)

    return check


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


#: Every field of a record (`version` and `recipients` are checked on their own).
RECORD_CHECKS: dict[str, Check] = {
    "id": _queue_id,
    "sender": _sender,  # "" is the null sender
    "arrival": _time,
    "size": _count,
    "ret": _optional(_one_of("FULL", "HDRS")),
    "envid": _optional(_xtext),
    "smtputf8": _flag,
    "body": _optional(_one_of("7BIT", "8BITMIME")),
    "client": _text(MAX_NAME),
    "auth_user": _optional(_text(MAX_NAME)),
    "held": _flag,
}

#: Every field of a recipient in a record.
RECIPIENT_CHECKS: dict[str, Check] = {
    "address": _address,
    "domain": _domain,
    "notify": _optional(_notify),
    "orcpt": _optional(_orcpt),
    "state": _one_of(PENDING, DELIVERED, FAILED),
    "attempts": _count,
    "next_attempt": _time,
    "status": _optional(_status),
    "last_error": _optional(_text(MAX_TEXT)),
    "remote_mta": _optional(_text(MAX_TEXT)),
    "delay_warned": _flag,
    "report_due": _flag,
    "lmtp": _optional(_address),
}

#: Recipient fields added after records were first written, and what a record
#: without one means: what the code that wrote it meant. `report_due` absent is
#: False: that code made its reports before the last save of an attempt and
#: never reported a finished recipient it found at start. A report lost in the
#: crash window this field closes cannot be told apart from one made, and
#: taking every finished recipient as unreported would report each again.
#: `lmtp` absent is None: that code queued remote recipients only.
ADDED_RECIPIENT_FIELDS: dict[str, Any] = {"report_due": False, "lmtp": None}


def read_record(data: bytes) -> QueueRecord:
    """A record's file as a `QueueRecord`, every field checked; BadRecord otherwise."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise BadRecord("json", f"not a JSON record: {exc}") from None
    if not isinstance(raw, dict):
        raise BadRecord("json", "not a JSON object")
    version = raw.get("version")
    if type(version) is not int or version != RECORD_VERSION:  # not True, nor 1.0
        raise BadRecord("version", f"not {RECORD_VERSION}", version)
    fields = _checked(raw, RECORD_CHECKS, "", {"version", "recipients"})
    rcpts = raw.get("recipients")
    if "recipients" not in raw:
        raise BadRecord("recipients", "missing")
    if not isinstance(rcpts, list) or not rcpts:
        raise BadRecord("recipients", "not a list of at least one recipient")
    recipients = []
    for i, rcpt in enumerate(rcpts):
        where = f"recipients[{i}]"
        if not isinstance(rcpt, dict):
            raise BadRecord(where, "not a JSON object")
        rcpt = {**ADDED_RECIPIENT_FIELDS, **rcpt}  # a record written before them
        recipient = QueuedRecipient(**_checked(rcpt, RECIPIENT_CHECKS, f"{where}.", set()))
        if not recipient.address.endswith("@" + recipient.domain):
            raise BadRecord(f"{where}.domain", "not the address's domain", recipient.domain)
        recipients.append(recipient)
    return QueueRecord(recipients=recipients, **fields)


def _checked(
    raw: dict[str, Any], checks: dict[str, Check], where: str, apart: set[str]
) -> dict[str, Any]:
    """`raw`'s fields, each one checked (and present); `apart` are checked elsewhere."""
    for name in raw:
        if name not in checks and name not in apart:
            raise BadRecord(f"{where}{name}", "not a field of a queue record")
    for name, check in checks.items():
        if name not in raw:
            raise BadRecord(f"{where}{name}", "missing")
        problem = check(raw[name])
        if problem is not None:
            raise BadRecord(f"{where}{name}", problem, raw[name])
    return {name: raw[name] for name in checks}


@dataclass
class Quarantined:
    """An entry found unusable at start, and where its files went."""

    queue_id: str
    problem: str  # what is wrong, naming the field (BadRecord's text)
    record: str  # the record's file, as it was named: records/<id>.json
    moved: list[str] = field(default_factory=list)  # where its files are now: quarantine/...
    error: str | None = None  # why they could not be moved (then they are left in place)

    def __str__(self) -> str:
        return f"{self.queue_id}: {self.problem}"


@dataclass
class Loaded:
    """What reading the queue at start found."""

    records: list[QueueRecord] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)  # moved aside, with why
    orphans: int = 0  # messages without a record, removed


class QueueStore:
    def __init__(self, root: Path, *, fsync: bool = True, offload: Offload | None = None) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.offload = offload or (lambda fn, *args: fn(*args))
        self.messages, self.records, self.quarantine_dir = (
            str(self.root / name) for name in QUEUE_FOLDERS
        )
        try:
            # Private to the server, whatever the umask (`storage.modes`), and
            # never reached through a link: SymlinkRefused (`make_real_folder`).
            for folder in (str(self.root), self.messages, self.records, self.quarantine_dir):
                make_real_folder(folder, PRIVATE_DIR_MODE)
        except OSError as exc:
            raise StorageError.wrap(exc) from exc
        #: True when the spool is on this filesystem: entries are links, else copies.
        self.link = True
        #: messages/ and records/ opened once, for their fsyncs: an entry's
        #: trip to the threadpool made four calls fewer (an open and a close
        #: per folder, each a path lookup and a turn of the GIL with the hub).
        self._folder_fds: dict[str, int] = {}
        if fsync:
            try:
                for folder in (self.messages, self.records):
                    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    self._folder_fds[folder] = fd
                    weakref.finalize(self, os.close, fd)
            except OSError as exc:
                raise StorageError.wrap(exc) from exc

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
            self._fsync_folder(self.messages)
            self._fsync_folder(self.records)

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
            try:
                data = memoryview(record.to_json())
                while data:
                    data = data[os.write(fd, data) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            # A full disk, say: no half-written record stays behind (holding
            # the room that is short) until the next start cleans it.
            _unlink_quietly(tmp)
            raise
        if self.fsync and sync_dirs:
            self._fsync_folder(self.records)

    def _fsync_folder(self, folder: str) -> None:
        """fsync messages/ or records/ (after names in it changed)."""
        os.fsync(self._folder_fds[folder])

    def remove(self, queue_id: str) -> None:
        """The entry is finished (every recipient delivered or given up)."""
        # The record goes first: a message without a record is an orphan, removed
        # at the next start; a record without its message would be quarantined.
        _unlink_quietly(self._record_path(queue_id))
        _unlink_quietly(self.message_path(queue_id))

    # ------------------------------------------------------------- read

    def load(self, mine: Callable[[str], bool] | None = None, clean: bool = True) -> Loaded:
        """Every entry on disk (those `mine` selects), each record checked
        (`read_record`); those that cannot be used are moved to quarantine/.

        With `clean`, what a dead process left half-written goes: a record
        being written, a message file whose record never came. Only when no
        other process may be writing entries (at the server's start): a worker
        taking over its share of a running server's queue passes False.
        """
        out = Loaded()
        with_record: set[str] = set()  # messages that stay: their record is (or was) here
        for name in sorted(os.listdir(self.records)):
            path = f"{self.records}/{name}"
            if name.startswith("."):  # a record being written (when the process died)
                if clean:
                    _unlink_quietly(path)
                continue
            queue_id = name.removesuffix(".json")
            with_record.add(queue_id)
            if mine is not None and not mine(queue_id):
                continue
            try:
                out.records.append(self._read(path, queue_id))
            except BadRecord as exc:
                out.quarantined.append(self._quarantine(name, queue_id, str(exc)))
        for name in os.listdir(self.messages) if clean else ():
            if name not in with_record:
                _unlink_quietly(f"{self.messages}/{name}")
                out.orphans += 1
        return out

    def _read(self, path: str, queue_id: str) -> QueueRecord:
        """The record at `path`, checked, with its message; BadRecord if unusable."""
        try:
            # Not through a link, and never waiting on a FIFO: a file the store wrote.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise BadRecord("file", "not a regular file")
                data = f.read()
        except OSError as exc:
            raise BadRecord("file", f"cannot be read: {exc.strerror or exc}") from None
        record = read_record(data)
        if record.id != queue_id:
            raise BadRecord("id", f"not the file's name, {queue_id}.json", record.id)
        try:
            is_file = stat.S_ISREG(os.lstat(self.message_path(queue_id)).st_mode)
        except OSError:
            is_file = False
        if not is_file:
            raise BadRecord("message", f"its message file messages/{queue_id} is missing")
        return record

    def _quarantine(self, record_name: str, queue_id: str, problem: str) -> Quarantined:
        """Move an entry's record and message (whichever exists) to quarantine/,
        under names no earlier entry there has: never deleted, never overwritten.
        The message goes first: a crash between the two leaves a record without
        its message, quarantined at the next start, never an orphan removed."""
        out = Quarantined(queue_id, problem, f"records/{record_name}")
        stem = self._free_name(queue_id)
        moves = [
            (self.message_path(queue_id), stem),
            (f"{self.records}/{record_name}", f"{stem}.json"),
        ]
        try:
            for src, name in moves:
                if os.path.lexists(src):
                    os.rename(src, f"{self.quarantine_dir}/{name}")
                    out.moved.append(f"quarantine/{name}")
            if self.fsync:
                for folder in (self.quarantine_dir, self.messages, self.records):
                    fsync_path(folder)
        except OSError as exc:
            out.error = str(exc)
        return out

    def _free_name(self, queue_id: str) -> str:
        """`queue_id`, or `queue_id.N`: a name in quarantine/ no file has, nor its `.json`."""
        name, n = queue_id, 0
        while os.path.lexists(f"{self.quarantine_dir}/{name}") or os.path.lexists(
            f"{self.quarantine_dir}/{name}.json"
        ):
            n += 1
            name = f"{queue_id}.{n}"
        return name

    def quarantined_count(self) -> int:
        """How many records are in quarantine/ (for an operator to look at)."""
        try:
            return sum(1 for name in os.listdir(self.quarantine_dir) if name.endswith(".json"))
        except OSError:
            return 0

    def open_message(self, queue_id: str) -> BinaryIO:
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
