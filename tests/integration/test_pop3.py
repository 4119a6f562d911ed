"""POP3 against the real server: mail in over SMTP, read back with real clients.

Python's `poplib` over plain POP3, STLS and implicit TLS (a trustme CA), and
a raw client for what poplib will not send. Every message is checked
byte-exact against the Maildir file it was stored in.

The tests share two servers (`plain_server`, `pop_server`), each test with a
user of its own (`user`); the ones that stop a server, count its metrics or
need a config of their own start theirs.
"""

from __future__ import annotations

import os
import poplib
import signal
import socket
import time

import pytest

from geosmtp.storage.maildir import Maildir
from tests.conftest import listeners, users, wait_until
from tests.integration.adminapi import admin_of, admin_section, ctl
from tests.integration.pop3_client import POP3Wire, send_mail, stored_as_sent

PASSWORD = "pop3 secret"
#: The users of the shared servers: one for each test (`user`).
POOL = [f"p{n}" for n in range(40)]
_unused = iter(POOL)


def body(n: int, extra: bytes = b"") -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@test.example\r\nSubject: message {n}\r\n"
        f"Message-ID: <m{n}@example.org>\r\n\r\nline one of {n}\r\n".encode()
        + extra
        + b".a line that starts with a dot\r\nlast line\r\n"
    )


def pop_config(certs) -> dict:
    """mx, pop3 (STLS) and pop3s listeners; alice, bob and the pool with
    passwords; no passwords in the clear (the default)."""
    return {
        "listeners": listeners("mx", "pop3", "pop3s"),
        "tls": certs.tls_config,
        "users": users(alice=PASSWORD, bob=PASSWORD, **dict.fromkeys(POOL, PASSWORD)),
        "timeouts": {"shutdown_grace": 0.5},
        **admin_section(),
    }


@pytest.fixture(scope="module")
def pop_server(make_module_server, certs):
    """A `pop_config` server the module's tests share."""
    return make_module_server(pop_config(certs))


@pytest.fixture(scope="module")
def plain_server(make_module_server):
    """mx and pop3 with passwords allowed in the clear (loopback testing),
    shared by the module's tests."""
    return make_module_server(
        {
            "listeners": listeners("mx", "pop3"),
            "users": users(alice=PASSWORD, bob=PASSWORD, **dict.fromkeys(POOL, PASSWORD)),
            "auth": {"allow_plaintext": True},
        }
    )


@pytest.fixture
def user() -> str:
    """A user of the shared servers that no other test logs in as or mails."""
    return next(_unused)


def stored(server, box: str = "alice") -> list[bytes]:
    """The Maildir files of `box` (new/ and cur/), in the order POP3 numbers them
    (delivery order), as POP3 must send them."""
    maildir = Maildir(server.mail_dir / box)
    return [stored_as_sent((maildir.path / m.relpath).read_bytes()) for m in maildir.list()]


def login_plain(server, user: str = "alice") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def test_poplib_fetches_mail_sent_over_smtp_byte_exact(plain_server, user):
    for n in range(3):
        send_mail(plain_server.ports["mx"], f"{user}@test.example", body(n))
    expected = stored(plain_server, user)
    assert len(expected) == 3
    client = login_plain(plain_server, user)
    count, octets = client.stat()
    assert count == 3
    assert octets == sum(len(m) for m in expected)  # CRLF line ends counted (RFC 1939 §11)
    _, listing, _ = client.list()
    assert [int(x.split()[1]) for x in listing] == [len(m) for m in expected]
    for n in range(3):
        _, lines, octets = client.retr(n + 1)
        text = b"\r\n".join(lines) + b"\r\n"
        assert text == expected[n]
        # The message as the client sent it, below the trace headers geosmtp added.
        assert text.endswith(body(n))
    client.quit()


def test_sizes_count_crlf_and_retr_restores_the_message(plain_server, user):
    tricky = body(9, b"..two dots\r\n.\r\n\r\n \r\nbare\rcr\r\n")
    send_mail(plain_server.ports["mx"], f"{user}@test.example", tricky)
    client = login_plain(plain_server, user)
    _, octets = client.stat()
    _, lines, _ = client.retr(1)
    text = b"\r\n".join(lines) + b"\r\n"
    assert text.endswith(tricky)
    assert octets == len(text)
    client.quit()


def test_top_sends_headers_and_n_lines(plain_server, user):
    send_mail(plain_server.ports["mx"], f"{user}@test.example", body(1))
    client = login_plain(plain_server, user)
    _, lines, _ = client.top(1, 1)
    blank = lines.index(b"")
    assert lines[blank + 1 :] == [b"line one of 1"]
    assert b"Subject: message 1" in lines[:blank]
    _, lines, _ = client.top(1, 0)
    assert lines[-1] == b""
    client.quit()


def test_uidl_is_unique_and_stable_across_sessions_and_restarts(make_server):
    overrides = {
        "listeners": listeners("mx", "pop3"),
        "users": users(alice=PASSWORD),
        "auth": {"allow_plaintext": True},
    }
    server = make_server(overrides)
    for n in range(4):
        send_mail(server.ports["mx"], "alice@test.example", body(n))
    client = login_plain(server)
    _, first, _ = client.uidl()
    client.retr(2)  # moves it to cur/ with the seen flag: the uid stays
    client.quit()
    uids = [line.split()[1] for line in first]
    assert len(set(uids)) == 4
    assert all(0 < len(u) <= 70 and all(0x21 <= b <= 0x7E for b in u) for u in uids)
    client = login_plain(server)
    assert client.uidl()[1] == first
    client.quit()
    assert server.stop() == 0
    # The same folder, a new process.
    restarted = make_server({**overrides, "mail_dir": str(server.mail_dir)})
    client = login_plain(restarted)
    assert client.uidl()[1] == first
    client.quit()


def test_retr_marks_the_message_seen_in_cur(plain_server, user):
    send_mail(plain_server.ports["mx"], f"{user}@test.example", body(1))
    send_mail(plain_server.ports["mx"], f"{user}@test.example", body(2))
    new_before = list((plain_server.mail_dir / user / "new").iterdir())
    assert len(new_before) == 2
    # Message 1 is the first delivered (Maildir names do not sort as text:
    # the microseconds have no leading zeros), which is what the list gives.
    first = Maildir(plain_server.mail_dir / user).list()[0].filename
    assert first in {p.name for p in new_before}
    client = login_plain(plain_server, user)
    client.retr(1)
    client.quit()
    cur = list((plain_server.mail_dir / user / "cur").iterdir())
    assert len(cur) == 1
    assert cur[0].name.endswith(":2,S")
    assert cur[0].name.split(":")[0] == first
    assert b"Subject: message 1\r\n" in stored_as_sent(cur[0].read_bytes())
    assert len(list((plain_server.mail_dir / user / "new").iterdir())) == 1


def test_dele_takes_effect_only_after_quit(plain_server, user):
    for n in range(3):
        send_mail(plain_server.ports["mx"], f"{user}@test.example", body(n))
    # A dropped connection deletes nothing (RFC 1939 §6).
    client = login_plain(plain_server, user)
    client.dele(1)
    client.dele(2)
    client.close()  # no QUIT
    wait_until(
        lambda: any(
            "dele=0/3" in line and f"user={user} " in line
            for line in plain_server.access_log().splitlines()
        ),
        what="the logout line",
    )
    assert len(stored(plain_server, user)) == 3
    # RSET unmarks.
    client = login_plain(plain_server, user)
    client.dele(1)
    client.rset()
    assert client.stat()[0] == 3
    client.dele(2)
    with pytest.raises(poplib.error_proto, match="-ERR"):
        client.retr(2)
    assert client.stat()[0] == 2
    client.quit()
    left = stored(plain_server, user)
    assert len(left) == 2
    assert all(b"Subject: message 1" not in m for m in left)


def test_second_login_to_the_same_maildrop_is_in_use(plain_server, user):
    first = login_plain(plain_server, user)
    second = poplib.POP3("127.0.0.1", plain_server.ports["pop3"], timeout=10)
    second.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    first.quit()
    # Released at QUIT: the next login works.
    second.user(user)
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_the_lock_is_released_when_the_client_vanishes(plain_server, user):
    client = login_plain(plain_server, user)
    client.sock.shutdown(socket.SHUT_RDWR)
    client.sock.close()

    def can_login() -> bool:
        try:
            login_plain(plain_server, user).quit()
            return True
        except poplib.error_proto:
            return False

    wait_until(can_login, what="the lock to be released")


def test_wrong_password_is_auth_error_and_logged(plain_server, user):
    failures = plain_server.access_log().count("result=auth-failed")
    client = poplib.POP3("127.0.0.1", plain_server.ports["pop3"], timeout=10)
    client.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong")
    client.quit()
    wait_until(
        lambda: plain_server.access_log().count("result=auth-failed") == failures + 1,
        what="access line",
    )


def test_no_password_in_the_clear_without_tls(pop_server, user):
    with POP3Wire.connect(pop_server.ports["pop3"]) as wire:
        status, capa = wire.multi("CAPA")
        assert status.startswith(b"+OK")
        assert b"STLS" in capa
        assert not any(c.startswith((b"USER", b"SASL")) for c in capa)
        assert wire.cmd(f"USER {user}").startswith(b"-ERR")
        assert wire.cmd("AUTH PLAIN AGFsaWNlAHBvcDMgc2VjcmV0").startswith(b"-ERR")


def test_stls_then_login(pop_server, certs, user):
    client = poplib.POP3("127.0.0.1", pop_server.ports["pop3"], timeout=10)
    client.stls(context=certs.client_context())
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert "STLS" not in client.capa()
    send_mail(pop_server.ports["mx"], f"{user}@test.example", body(1))
    client.user(user)
    client.pass_(PASSWORD)
    _, lines, _ = client.retr(1)
    assert (b"\r\n".join(lines) + b"\r\n").endswith(body(1))
    client.quit()


def test_implicit_tls_pop3s(pop_server, certs, user):
    send_mail(pop_server.ports["mx"], f"{user}@test.example", body(1))
    client = poplib.POP3_SSL(
        "127.0.0.1", pop_server.ports["pop3s"], timeout=10, context=certs.client_context()
    )
    client.user(user)
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1
    client.dele(1)
    client.quit()
    assert stored(pop_server, user) == []


def test_auth_plain_and_login_over_pop3s(pop_server, certs, user):
    import base64

    ctx = certs.client_context()
    with POP3Wire.connect(pop_server.ports["pop3s"], context=ctx) as wire:
        status, mechs = wire.multi("AUTH")
        assert status.startswith(b"+OK")
        assert {b"PLAIN", b"LOGIN"} <= set(mechs)
        token = base64.b64encode(f"\0{user}\0".encode() + PASSWORD.encode()).decode()
        assert wire.cmd(f"AUTH PLAIN {token}").startswith(b"+OK")
        assert wire.cmd("QUIT").startswith(b"+OK")
    with POP3Wire.connect(pop_server.ports["pop3s"], context=ctx) as wire:
        assert wire.cmd("AUTH LOGIN").startswith(b"+ ")
        assert wire.cmd(base64.b64encode(user.encode()).decode()).startswith(b"+ ")
        assert wire.cmd(base64.b64encode(PASSWORD.encode()).decode()).startswith(b"+OK")
        assert wire.cmd("STAT").startswith(b"+OK 0 0")
        assert wire.cmd("QUIT").startswith(b"+OK")


def test_pipelined_commands_come_back_in_order(plain_server, user):
    for n in range(3):
        send_mail(plain_server.ports["mx"], f"{user}@test.example", body(n))
    expected = stored(plain_server, user)
    with POP3Wire.connect(plain_server.ports["pop3"]) as wire:
        assert b"PIPELINING" in wire.multi("CAPA")[1]
        wire.send(
            f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\nRETR 3\r\nDELE 2\r\n"
            "LIST\r\nQUIT\r\n".encode()
        )
        assert wire.line().startswith(b"+OK")  # USER
        assert wire.line().startswith(b"+OK")  # PASS
        assert wire.line().startswith(b"+OK 3 ")
        for n in (0, 2):
            assert wire.line().startswith(b"+OK")
            assert b"\r\n".join(wire.lines()) + b"\r\n" == expected[n]
        assert wire.line().startswith(b"+OK")  # DELE
        assert wire.line().startswith(b"+OK")  # LIST
        assert [x.split()[0] for x in wire.lines()] == [b"1", b"3"]
        assert wire.line().startswith(b"+OK")  # QUIT
        assert wire.closed()
    assert len(stored(plain_server, user)) == 2


def test_bad_input_gets_err_and_the_server_goes_on(plain_server, user):
    with POP3Wire.connect(plain_server.ports["pop3"]) as wire:
        assert wire.cmd("FROB").startswith(b"-ERR")
        assert wire.cmd("").startswith(b"-ERR")
        assert wire.cmd("STAT").startswith(b"-ERR")  # not before login
        wire.send(b"USER " + b"x" * 5000 + b"\r\n")
        assert wire.line().startswith(b"-ERR")
        assert wire.cmd("\x00\xff".encode("latin-1").decode("latin-1")).startswith(b"-ERR")
        assert wire.cmd(f"USER {user}").startswith(b"+OK")
        assert wire.cmd(f"PASS {PASSWORD}").startswith(b"+OK")
        for bad in ("RETR", "RETR 0", "RETR 1", "RETR -1", "RETR x", "TOP 1", "DELE 99"):
            assert wire.cmd(bad).startswith(b"-ERR"), bad
        assert wire.cmd("NOOP").startswith(b"+OK")
        assert wire.cmd("QUIT").startswith(b"+OK")
    client = login_plain(plain_server, user)
    client.quit()


def test_autologout_deletes_nothing(make_server):
    server = make_server(
        {
            "listeners": listeners("mx", "pop3"),
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
            "timeouts": {"pop3_autologout": 0.5},
        }
    )
    send_mail(server.ports["mx"], "alice@test.example", body(1))
    with POP3Wire.connect(server.ports["pop3"]) as wire:
        wire.cmd("USER alice")
        assert wire.cmd(f"PASS {PASSWORD}").startswith(b"+OK")
        assert wire.cmd("DELE 1").startswith(b"+OK")
        # Silent past the timer: logged out, and UPDATE never happens.
        assert wire.line().startswith(b"-ERR")
        assert wire.closed()
    assert len(stored(server)) == 1
    wait_until(lambda: "result=timeout" in server.access_log(), what="the logout line")


def test_access_log_metrics_and_sessions(make_server, certs):
    pop_server = make_server(pop_config(certs))  # its own: the counts are of this test alone
    send_mail(pop_server.ports["mx"], "alice@test.example", body(1))
    client = poplib.POP3_SSL(
        "127.0.0.1", pop_server.ports["pop3s"], timeout=10, context=certs.client_context()
    )
    client.user("alice")
    client.pass_(PASSWORD)
    admin = admin_of(pop_server)
    sessions = admin.sessions()
    pop = [s for s in sessions if s.get("protocol") == "pop3"]
    assert len(pop) == 1
    assert pop[0]["user"] == "alice" and pop[0]["tls"] is True
    client.retr(1)
    client.dele(1)
    client.quit()

    def logged_out() -> str:
        lines = [x for x in pop_server.access_log().splitlines() if "proto=pop3" in x]
        return "\n".join(lines) if any("result=quit" in x for x in lines) else ""

    log = wait_until(logged_out, what="the logout line")
    assert "result=login" in log and "user=alice" in log
    assert "retr=1/" in log and "dele=1/1" in log
    metrics = admin.exposition()
    assert 'geosmtp_pop3_logins_total{listener="pop3s' in metrics
    assert "geosmtp_pop3_retrieved_messages_total" in metrics
    assert any(
        line.startswith("geosmtp_pop3_deleted_messages_total") and line.endswith(" 1.0")
        for line in metrics.splitlines()
    )


def test_ctl_lists_and_kicks_a_pop3_session(pop_server, certs, user):
    send_mail(pop_server.ports["mx"], f"{user}@test.example", body(1))
    admin = admin_of(pop_server)
    admin.quiet()
    with POP3Wire.connect(pop_server.ports["pop3s"], context=certs.client_context()) as wire:
        wire.cmd(f"USER {user}")
        assert wire.cmd(f"PASS {PASSWORD}").startswith(b"+OK")
        assert wire.cmd("DELE 1").startswith(b"+OK")
        listing = ctl(pop_server, "sessions")
        assert listing.returncode == 0, listing.stderr
        (row,) = [
            line.split()
            for line in listing.stdout.splitlines()
            if "pop3s:" in line and line.split()[-1] == user
        ]
        assert row[3] == "transaction"
        kick = ctl(pop_server, "kick", row[0])
        assert kick.returncode == 0, kick.stderr
        line = wire.line()
        assert line.startswith(b"-ERR") and b"administrator" in line
        assert wire.closed()
    assert len(stored(pop_server, user)) == 1  # kicked before QUIT: nothing deleted


def test_retr_of_a_large_message_streams_in_bounded_memory(make_server):
    server = make_server(
        {
            "listeners": listeners("mx", "pop3"),
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
            "limits": {"max_message_size": 64 << 20},
            "workers": 1,  # the one process that sends the message
        }
    )
    big = body(1, (b"x" * 998 + b"\r\n") * 30_000)  # 30 MB
    send_mail(server.ports["mx"], "alice@test.example", big)
    pid = server.worker

    def rss_kb() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))

    before = rss_kb()
    with POP3Wire.connect(server.ports["pop3"]) as wire:
        wire.cmd("USER alice")
        wire.cmd(f"PASS {PASSWORD}")
        assert wire.cmd("RETR 1").startswith(b"+OK")
        received = 0
        while True:  # read the body without keeping it
            line = wire.line()
            if line == b".":
                break
            received += len(line) + 2
        wire.cmd("QUIT")
    assert received >= len(big)
    assert rss_kb() - before < 16 * 1024  # far less than the 30 MB message


def test_a_server_stop_gets_err_and_deletes_nothing(make_server, certs):
    pop_server = make_server(pop_config(certs))  # its own: the test stops it
    send_mail(pop_server.ports["mx"], "alice@test.example", body(1))
    ctx = certs.client_context()
    with POP3Wire.connect(pop_server.ports["pop3s"], context=ctx) as wire:
        wire.cmd("USER alice")
        assert wire.cmd(f"PASS {PASSWORD}").startswith(b"+OK")
        assert wire.cmd("DELE 1").startswith(b"+OK")
        os.kill(pop_server.process.pid, signal.SIGTERM)
        assert wire.line().startswith(b"-ERR")
    assert pop_server.process.wait(timeout=30) == 0
    assert len(stored(pop_server)) == 1


def test_over_the_cap_a_pop3_client_gets_err_at_once(make_server):
    server = make_server(
        {
            "listeners": listeners("mx", "pop3"),
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
            "max_clients": 1,
        }
    )
    with POP3Wire.connect(server.ports["pop3"]) as first:
        assert first.cmd("NOOP").startswith(b"-ERR")  # the session is open
        with POP3Wire.connect(server.ports["pop3"], greet=False) as second:
            line = second.line()
            assert line.startswith(b"-ERR [SYS/TEMP]"), line
            assert second.closed()
        assert first.cmd("USER alice").startswith(b"+OK")  # the first goes on


# ---- issue 19 (soak): replies are not held back by Nagle's algorithm ------------


def test_each_retr_answers_without_waiting_for_the_clients_delayed_ack(plain_server, user):
    """A RETR's reply is several writes (the +OK line, the text, the final dot):
    with Nagle's algorithm the last one waits for the client's ACK of the
    ones before, which a client delays by 40 ms or more (Linux's minimum), so
    every RETR took 40+ ms on an idle machine (the soak's POP3 sessions: 0.5 s
    for 11 messages). The fastest of ten RETRs shows it, whatever else the
    machine is doing: with the delay none can be under 40 ms."""
    for n in range(10):
        send_mail(plain_server.ports["mx"], f"{user}@test.example", body(n))
    client = login_plain(plain_server, user)
    times = []
    for n in range(10):
        started = time.perf_counter()
        client.retr(n + 1)
        times.append(time.perf_counter() - started)
    client.quit()
    assert min(times) < 0.020, f"the fastest of 10 RETRs took {min(times) * 1000:.1f} ms"
