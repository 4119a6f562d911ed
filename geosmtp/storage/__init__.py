"""Mail storage behind narrow interfaces: the spool (messages being received)
and Maildir (write: deliver a spooled message; read: list, open, flag, delete)."""

from .errors import StorageError
from .maildir import Maildir, MaildirStore, StoredMessage
from .spool import Spool, SpoolFile

__all__ = ["Maildir", "MaildirStore", "Spool", "SpoolFile", "StorageError", "StoredMessage"]
