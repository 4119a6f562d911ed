"""Mail storage behind narrow interfaces: the spool (messages being received),
Maildir (write: deliver a spooled message; read: list, open, flag, POP3
sizes and UIDLs), the maildrop lock, and POP3's UPDATE made all or nothing
across a crash (`expunge`: a roll-forward journal)."""

from .errors import MaildropBusy, StorageError
from .lock import MaildropLock
from .maildir import Maildir, MaildirStore, StoredMessage, uid_for
from .spool import Spool, SpoolFile

__all__ = [
    "Maildir",
    "MaildirStore",
    "MaildropBusy",
    "MaildropLock",
    "Spool",
    "SpoolFile",
    "StorageError",
    "StoredMessage",
    "uid_for",
]
