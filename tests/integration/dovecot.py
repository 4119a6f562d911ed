"""A private Dovecot POP3 server for the tests: the bench's peer
(`bench/peers/dovecot.py`, where it is described) behind a skip.

    with running_dovecot({"alice": "pw"}) as dc:
        write into dc.mail_dir / "alice" / "new" ...
        poplib.POP3(dc.host, dc.port) ...

The test skips, with the reason, when Debian's `dovecot-pop3d` is missing.
As root, Dovecot reads mail as `nobody`: its `mail_dir` is under its own temp
dir (pytest's are private to root), and files written there as root after it
started must be handed over with `dc.own_mail_dir()` before it reads them.
A test where geosmtp and Dovecot share a maildrop gives geosmtp
`mail_dir: str(dc.mail_dir)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import pytest

from bench.peers.dovecot import (
    DOVECOT,
    LMTP_SERVER,
    SIEVE_PLUGIN,
    Dovecot,
    available,
    dedup_available,
    lmtp_available,
)

__all__ = [
    "Dovecot",
    "require_dovecot",
    "require_dovecot_dedup",
    "require_dovecot_lmtp",
    "running_dovecot",
]


def require_dovecot() -> None:
    """Skip the calling test when Dovecot's POP3 server is not installed."""
    if not available():
        pytest.skip(
            f"Dovecot's POP3 server is not installed ({DOVECOT}): apt-get install dovecot-pop3d"
        )


@contextlib.contextmanager
def running_dovecot(users: Mapping[str, str], **options) -> Iterator[Dovecot]:  # type: ignore[no-untyped-def]
    """A started private Dovecot (options as for `Dovecot`), stopped and removed after."""
    require_dovecot()
    options.setdefault("mail_dir", None)
    dc = Dovecot(users=users, **options)
    try:
        yield dc.start()
    finally:
        dc.cleanup()


def require_dovecot_lmtp() -> None:
    """Skip the calling test when Dovecot's LMTP server (or its POP3) is not installed."""
    require_dovecot()
    if not lmtp_available():
        pytest.skip(
            f"Dovecot's LMTP server is not installed ({LMTP_SERVER}): apt-get install dovecot-lmtpd"
        )


def require_dovecot_dedup() -> None:
    """Skip the calling test when Dovecot's LMTP server or its Sieve plugin
    (`dedup=True`) is not installed."""
    require_dovecot_lmtp()
    if not dedup_available():
        pytest.skip(
            f"Dovecot's Sieve plugin is not installed ({SIEVE_PLUGIN}): "
            "apt-get install dovecot-sieve"
        )
