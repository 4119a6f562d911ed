"""The SMTP core's settings: the protocol limits and the ESMTP extensions offered.

They are also the `limits:` and `extensions:` sections of the configuration
(`geosmtp.config` reads them into these classes), so they are defined once,
here, below the core and the config alike: pure, standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Protocol limits; RFC 5321 §4.5.3.1 gives the minimums servers must accept.

    Also the `limits:` section of the configuration: each field's metadata is
    the range the config accepts (`min`/`max`, or `positive`), so the limits
    are defined once. The maxima bound what one session may hold in memory.
    """

    #: §4.5.3.1.4: a command line, in octets including CRLF
    command_line: int = field(default=512, metadata={"min": 512, "max": 65536})
    #: §4.5.3.1.6: a line of message text, in octets including CRLF
    text_line: int = field(default=1000, metadata={"min": 1000, "max": 1024 * 1024})
    #: octets; advertised by SIZE (RFC 1870)
    max_message_size: int = field(
        default=10 * 1024 * 1024, metadata={"positive": True, "max": 4 * 1024**3}
    )
    #: §4.5.3.1.8: at least 100 must be accepted
    max_recipients: int = field(default=100, metadata={"positive": True, "max": 100_000})
    #: error replies before 421 and disconnect (like Postfix)
    max_errors: int = field(default=20, metadata={"positive": True, "max": 1000})


@dataclass(frozen=True)
class Extensions:
    """ESMTP extensions advertised in the EHLO reply."""

    pipelining: bool = True
    size: bool = True
    eightbitmime: bool = True
    enhancedstatuscodes: bool = True
    smtputf8: bool = True
    chunking: bool = True
    starttls: bool = True
    auth: bool = True
    dsn: bool = True
