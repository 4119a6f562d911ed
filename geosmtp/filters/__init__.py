"""Filter stages: external programs and Python callables that check or rewrite
each message before it is delivered (the `filters:` section; docs/filters.md).

What a Python stage needs is here:

    from geosmtp.filters import Accept, Reject, Replace, TempFail, cooperative

    def stage(envelope, message, context):
        ...
        return Accept()
"""

from ..pipeline.stages import Accept, Reject, Replace, StageResult, TempFail
from .calls import StageContext, cooperative
from .program import EXIT_REJECT, EXIT_TEMPFAIL

__all__ = [
    "EXIT_REJECT",
    "EXIT_TEMPFAIL",
    "Accept",
    "Reject",
    "Replace",
    "StageContext",
    "StageResult",
    "TempFail",
    "cooperative",
]
