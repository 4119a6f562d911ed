"""The mail pipeline: spool -> filter stages -> router -> destinations."""

from .message import Message, StageVerdict
from .pipeline import Pipeline, Verdict, deliver
from .router import Destination, MaildirDestination, NoRoute, Router
from .stages import Accept, Reject, Replace, Stage, StageResult, TempFail, verdict_name

__all__ = [
    "Accept",
    "Destination",
    "MaildirDestination",
    "Message",
    "NoRoute",
    "Pipeline",
    "Reject",
    "Replace",
    "Router",
    "Stage",
    "StageResult",
    "StageVerdict",
    "TempFail",
    "Verdict",
    "deliver",
    "verdict_name",
]
