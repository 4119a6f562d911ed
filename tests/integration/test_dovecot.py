"""The private Dovecot POP3 server the POP3 tests and the bench compare with:
it serves Maildirs written by hand, byte for byte, and leaves nothing behind."""

from __future__ import annotations

import os
import poplib

import pytest

from bench.probe import process_tree
from geosmtp.auth import hash_password
from tests.conftest import wait_until
from tests.integration.dovecot import running_dovecot

# A message in the Maildir form geosmtp stores: LF line endings.
FIRST = (
    b"From: alice@test.example\nTo: bob@test.example\nSubject: dots and 8 bits\n\n"
    b"first line\n.\n.leading dot\n..two dots\n\n"
    + "caf\u00e9 \u00fcber\n".encode()
    + b"\xff\xfe raw octets\n"
    + b"x" * 1000
    + b"\nlast line\n"
)
SECOND = b"Subject: already seen\n\n" + b"".join(
    b"line %06d of a longer one\n" % i for i in range(12000)
)


def deliver(dc, box: str, name: str, data: bytes, sub: str = "new") -> None:  # type: ignore[no-untyped-def]
    for folder in ("cur", "new", "tmp"):
        (dc.mail_dir / box / folder).mkdir(parents=True, exist_ok=True)
    (dc.mail_dir / box / sub / name).write_bytes(data)


def files(path) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


def test_dovecot_serves_hand_made_maildir_byte_exact():
    with running_dovecot({"alice": "alice-pw", "bob": hash_password("bob-pw")}) as dc:
        deliver(dc, "alice", "1700000000.M1P1Q1.test", FIRST)
        deliver(dc, "alice", "1700000001.M1P1Q2.test:2,S", SECOND, sub="cur")
        deliver(dc, "bob", "1700000002.M1P1Q3.test", FIRST)
        dc.own_mail_dir()  # written as root after it started: hand them to its mail user

        pop = poplib.POP3(dc.host, dc.port, timeout=10)
        pop.user("alice")
        pop.pass_("alice-pw")
        crlf_sizes = [len(m) + m.count(b"\n") for m in (FIRST, SECOND)]
        assert pop.stat() == (2, sum(crlf_sizes))  # RFC 1939 §11: sizes count CRLF
        assert pop.list()[1] == [b"1 %d" % crlf_sizes[0], b"2 %d" % crlf_sizes[1]]
        # pop3_uidl_format = %f: the Maildir base name, without the info.
        assert pop.uidl()[1] == [b"1 1700000000.M1P1Q1.test", b"2 1700000001.M1P1Q2.test"]
        for n, expected in ((1, FIRST), (2, SECOND)):
            _resp, lines, _octets = pop.retr(n)  # poplib undoes the dot-stuffing
            assert b"\n".join(lines) + b"\n" == expected
        pop.dele(1)
        pop.dele(2)
        pop.quit()

        bob = poplib.POP3(dc.host, dc.port, timeout=10)
        bob.user("bob")
        bob.pass_("bob-pw")  # geosmtp's argon2id hash, checked by Dovecot's libsodium
        assert b"\n".join(bob.retr(1)[1]) + b"\n" == FIRST
        bob.quit()  # no DELE: the message stays, seen

        # alice's Maildir is empty; bob's message moved to cur/ and got the S flag.
        assert files(dc.mail_dir) == ["bob/cur/1700000002.M1P1Q3.test:2,S"]
        # Dovecot's indexes and uidlists are in its own dir, none in the Maildirs.
        kept = [p.name for p in dc.dovecot_files()]
        assert "dovecot-uidlist" in kept
        assert all(dc.mail_dir not in p.parents for p in dc.dovecot_files())
        tree = process_tree(dc.pid)
        assert len(tree) > 3  # master, log, config, auth, anvil, ...
        root = dc.root
    # Stopped: every process of the instance ends, and its dir is removed.
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in tree), what="dovecot to end")
    assert not root.exists()


def test_dovecot_refuses_a_wrong_password():
    with running_dovecot({"alice": "alice-pw"}) as dc:
        pop = poplib.POP3(dc.host, dc.port, timeout=10)
        pop.user("alice")
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop.pass_("wrong")
        pop.close()
