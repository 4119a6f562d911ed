"""Symbolic links in mail_dir, against the real server: a Maildir, or a folder
or message in it, that is a link is never followed, by SMTP delivery (451:
the client keeps the message) or by POP3 (`-ERR [SYS/TEMP]` at login; a
linked message is neither listed, read nor deleted)."""

from __future__ import annotations

import poplib
import smtplib
from pathlib import Path

import pytest

from tests.conftest import listeners, users, wait_until
from tests.integration.pop3_client import TIMEOUT, POP3Wire, send_mail

PASSWORD = "pop3 secret"
VICTIM = "1700000000.M1P1.victim:2,S"


@pytest.fixture
def pop_server(make_server):
    return make_server(
        {
            "listeners": listeners("mx", "pop3"),
            "users": users(alice=PASSWORD, bob=PASSWORD),
            "auth": {"allow_plaintext": True},
        }
    )


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside mail_dir, with a file in it someone cares about."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / VICTIM).write_bytes(b"Subject: not mail\n\nsecret\n")
    return folder


def relink(path: Path, outside: Path) -> None:
    """Replace the folder `path` (made if missing) by a symbolic link to `outside`."""
    path.mkdir(parents=True, exist_ok=True)
    path.rename(path.with_name(path.name + ".moved"))
    path.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("folder", ["", "tmp", "new", "cur"])
def test_smtp_delivery_through_a_symlinked_folder_is_a_451(pop_server, outside, folder):
    """`tmp` too: the Maildir is checked whole before its first delivery."""
    alice = pop_server.mail_dir / "alice"
    (alice / "new").mkdir(parents=True)
    relink(alice / folder if folder else alice, outside)
    with smtplib.SMTP("127.0.0.1", pop_server.ports["mx"], timeout=TIMEOUT) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("sender@example.org", ["bob@test.example", "alice@test.example"], b"x")
        assert info.value.smtp_code == 451
    assert sorted(p.name for p in outside.iterdir()) == [VICTIM]  # nothing written there
    assert pop_server.messages("bob") == []  # nor for bob: all or nothing
    link = alice / folder if folder else alice
    warning = f"WARNING mailbox alice: {link} is a symbolic link: not followed"
    # Through the master's log pipe: it shows up shortly after the reply.
    wait_until(lambda: warning in pop_server.server_log(), what="the warning")


def test_pop3_login_on_a_symlinked_cur_is_a_temporary_error(pop_server, outside):
    send_mail(pop_server.ports["mx"], "alice@test.example", b"Subject: mine\r\n\r\nx\r\n")
    relink(pop_server.mail_dir / "alice" / "cur", outside)
    with POP3Wire.connect(pop_server.ports["pop3"]) as pop:
        assert pop.cmd("USER alice").startswith(b"+OK")
        assert pop.cmd(f"PASS {PASSWORD}").startswith(b"-ERR [SYS/TEMP]")
    # Nothing outside was listed to be read or deleted.
    assert sorted(p.name for p in outside.iterdir()) == [VICTIM]
    assert (outside / VICTIM).read_bytes() == b"Subject: not mail\n\nsecret\n"


def test_pop3_neither_lists_reads_nor_deletes_a_symlinked_message(pop_server, outside):
    send_mail(pop_server.ports["mx"], "alice@test.example", b"Subject: mine\r\n\r\nx\r\n")
    cur = pop_server.mail_dir / "alice" / "cur"
    (cur / VICTIM).symlink_to(outside / VICTIM)
    client = poplib.POP3("127.0.0.1", pop_server.ports["pop3"], timeout=TIMEOUT)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1  # the delivered message only
    _, lines, _ = client.retr(1)
    assert b"Subject: mine" in lines
    client.dele(1)
    with pytest.raises(poplib.error_proto):
        client.retr(2)
    client.quit()
    assert (outside / VICTIM).read_bytes() == b"Subject: not mail\n\nsecret\n"
    assert (cur / VICTIM).is_symlink()  # not ours to remove either
    assert [p.name for p in cur.iterdir()] == [VICTIM]
