"""RFC 3461 §4 xtext, as DSN's ENVID and ORCPT carry it: printable ASCII less
"+" and "=", with "+XX" hex escapes. The SMTP core checks a client's
parameters with it and the relay client what it passes on."""

from __future__ import annotations

import re

_XTEXT_RE = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")


def is_xtext(text: str) -> bool:
    return _XTEXT_RE.fullmatch(text) is not None
