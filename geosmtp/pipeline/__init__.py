"""The mail pipeline: spool -> filter stages -> router -> destinations."""

from .message import Message, StageVerdict
from .pipeline import Pipeline, Verdict
from .router import Destination, MaildirDestination, NoRoute, QueueDestination, Router
from .stages import Accept, Reject, Replace, Stage, StageResult, TempFail, verdict_name

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
    "StageVerdict",
    "TempFail",
    "Verdict",
    "verdict_name",
]
