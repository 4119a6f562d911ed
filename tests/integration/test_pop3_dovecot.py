"""geosmtp and Dovecot read the same maildrop in turn, and agree.

Mail goes into geosmtp over SMTP; a private Dovecot POP3 server (Debian's
`dovecot-pop3d`, started by the test on a loopback port) and geosmtp's POP3
listener then take turns on the same Maildir: each sees the same messages,
byte for byte and with the same sizes, and what one retrieves (moved to
`cur/`, flagged seen) and deletes the other sees done.
"""

from __future__ import annotations

import poplib
import re

from tests.conftest import listeners, users
from tests.integration.dovecot import running_dovecot
from tests.integration.pop3_client import send_mail

PASSWORD = "shared secret"


def message(n: int) -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@test.example\r\nSubject: shared {n}\r\n"
        f"Message-ID: <shared{n}@example.org>\r\n\r\nbody {n}\r\n.dot line\r\n\r\nend\r\n"
    ).encode()


def session(host: str, port: int) -> poplib.POP3:
    client = poplib.POP3(host, port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    return client


def snapshot(client: poplib.POP3) -> list[tuple[bytes, int, bytes]]:
    """Every message as (UIDL, LIST size, RETR bytes with CRLF line ends): the
    same UIDL on both servers, so a client moving between them fetches nothing twice."""
    _, listing, _ = client.list()
    uids = dict(line.split() for line in client.uidl()[1])
    out = []
    for entry in listing:
        number, size = (int(x) for x in entry.split())
        _, lines, _ = client.retr(number)
        out.append((uids[str(number).encode()], size, b"\r\n".join(lines) + b"\r\n"))
    return out


def test_geosmtp_and_dovecot_take_turns_on_one_maildrop(make_server):
    with running_dovecot({"alice": PASSWORD}) as dovecot:
        server = make_server(
            {
                "listeners": listeners("mx", "pop3"),
                "users": users(alice=PASSWORD),
                "auth": {"allow_plaintext": True},
                "mail_dir": str(dovecot.mail_dir),
            }
        )
        for n in range(4):
            send_mail(server.ports["mx"], "alice@test.example", message(n))
        dovecot.own_mail_dir()  # as root, Dovecot reads as nobody

        # geosmtp first: it lists and reads, and leaves everything.
        ours = session("127.0.0.1", server.ports["pop3"])
        first = snapshot(ours)
        ours.quit()
        assert len(first) == 4
        for n, (uid, size, text) in enumerate(first):
            assert text.endswith(message(n))
            assert size == len(text)
            assert re.fullmatch(rb"[0-9]+\.M[0-9]+P[0-9]+Q[0-9]+\.mx,S=[0-9]+,W=%d" % size, uid)

        # Dovecot sees the same messages with the same sizes; it deletes one.
        dovecot.own_mail_dir()
        theirs = session(dovecot.host, dovecot.port)
        assert snapshot(theirs) == first
        theirs.dele(2)
        theirs.quit()

        # geosmtp sees Dovecot's work: three left, the same bytes; it deletes one.
        ours = session("127.0.0.1", server.ports["pop3"])
        after = snapshot(ours)
        assert after == [first[0], first[2], first[3]]
        ours.dele(1)
        ours.quit()

        # And Dovecot sees geosmtp's.
        dovecot.own_mail_dir()
        theirs = session(dovecot.host, dovecot.port)
        assert snapshot(theirs) == [first[2], first[3]]
        theirs.quit()

        # Both left valid Maildir names: seen messages are in cur/ with "S".
        cur = sorted(p.name for p in (dovecot.mail_dir / "alice" / "cur").iterdir())
        assert len(cur) == 2 and all(":2," in name and "S" in name.split(":2,")[1] for name in cur)
        assert not list((dovecot.mail_dir / "alice" / "new").iterdir())
