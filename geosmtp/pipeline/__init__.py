"""The mail pipeline: spool -> filter stages -> router -> destinations."""

from .message import Message
from .pipeline import Pipeline, Verdict
from .router import Destination, MaildirDestination, NoRoute, QueueDestination, Router
from .stages import Accept, Reject, Replace, Stage, StageResult, TempFail

__all__ = [
    "Accept",
    "Destination",
    "MaildirDestination",
    "Message",
    "NoRoute",
    "Pipeline",
    "QueueDestination",
    "Reject",
    "Replace",
    "Router",
    "Stage",
    "StageResult",
    "TempFail",
    "Verdict",
]
