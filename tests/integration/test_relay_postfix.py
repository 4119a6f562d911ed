"""What geosmtp sends to a private Postfix as its next hop (issue 20's "Done
when"), end to end: mail submitted with smtplib to `geosmtp -c`, relayed to
the Postfix of tests/integration/postfix.py as its smarthost (127.0.0.3, no
TLS), and checked where Postfix keeps it: its log and its Maildirs.

Postfix logs the conversation with geosmtp (`debug_peer_list` 127.0.0.0/8,
`debug_peer_level` 1: a "< client: COMMAND" line for each command read, a
"> client: REPLY" line for each reply), and every session's command counts at
its end ("disconnect from ... mail=2 rcpt=2 data=2 rset=1 quit=1"). It has
three smtpd listeners: one offering what Postfix offers (PIPELINING, SIZE,
DSN, 8BITMIME, CHUNKING), one without DSN and one without PIPELINING
(`smtpd_discard_ehlo_keywords`). Its own mail (the delivery reports it
sends) goes to `[127.0.0.1]:GEOSMTP_MX`, where the DSN tests' geosmtp
listens as an MX: never through DNS, never off loopback.

Pipelining: Postfix's log does not show how commands arrived (it reads them
one by one whether they came in one packet or several, and does not flag a
client that pipelines where PIPELINING was not offered, not even with
`smtpd_forbid_unauth_pipelining`; checked on Postfix 3.7). What it does show
is a DATA after every recipient was refused: only a client that sent DATA
before it had the RCPT replies sends it (RFC 2920 §3.1), and a client that
waits for them sends none.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Iterator

import pytest

from tests.conftest import RunningServer, free_port, listeners, users, wait_until
from tests.integration.postfix import POSTFIX_HOST, PrivatePostfix, private_postfix

PASSWORD = "nexthop-test-pw"
SUBMITTED = (
    "From: alice@test.example\r\nTo: bob@remote.test\r\nSubject: {subject}\r\n"
    "Message-ID: <{subject}@test.example>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
    "\r\nbody of {subject}\r\n"
)


def message(subject: str, head: str = "", body: str = "") -> bytes:
    text = SUBMITTED.format(subject=subject)
    return (head + text + body).encode()


@pytest.fixture(scope="module")
def geosmtp_mx_port() -> int:
    """Where geosmtp listens as an MX, for the reports Postfix sends back."""
    return free_port()


@pytest.fixture(scope="module")
def nexthop(geosmtp_mx_port: int) -> Iterator[PrivatePostfix]:
    main = {
        "debug_peer_list": "127.0.0.0/8",
        "debug_peer_level": "1",
        # Postfix's default drops return-path too (cleanup(8)): keep every
        # header geosmtp sends, so the stored copy shows whether it sent one.
        "message_drop_headers": "bcc, content-length, resent-bcc",
    }
    with private_postfix(
        main,
        listeners={
            "no-dsn": ["smtpd_discard_ehlo_keywords=dsn"],
            "no-pipelining": ["smtpd_discard_ehlo_keywords=pipelining"],
        },
        relayhost=f"[127.0.0.1]:{geosmtp_mx_port}",
    ) as server:
        yield server


class Session:
    """geosmtp relaying to one of the Postfix's listeners, and the part of
    Postfix's log written since it started."""

    def __init__(self, server: RunningServer, postfix: PrivatePostfix, offset: int) -> None:
        self.server = server
        self.postfix = postfix
        self.offset = offset

    def log(self) -> tuple[str, set[str]]:
        """Postfix's log since the start, less the lines of smtpd sessions that
        began before it (an earlier test's, the fixture's probes), and the
        smtpd processes whose session has not ended yet."""
        kept, open_ = [], set()
        for line in self.postfix.maillog()[self.offset :].splitlines():
            smtpd = re.search(r" postfix/smtpd\[(\d+)\]: ", line)
            if smtpd is None:
                kept.append(line)
                continue
            pid = smtpd.group(1)
            if line.endswith("]: connect from localhost[127.0.0.1]"):
                open_.add(pid)
            if pid in open_:
                kept.append(line)
            if " disconnect from " in line:
                open_.discard(pid)
        return "\n".join(kept) + "\n", open_

    def submit(self, rcpts: list[str], data: bytes, **options) -> None:  # type: ignore[no-untyped-def]
        port = self.server.ports["submission"]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.login("alice", PASSWORD)
            assert client.sendmail("alice@test.example", rcpts, data, **options) == {}

    def queue_empty(self) -> bool:
        return not list((self.server.mail_dir / ".queue" / "records").glob("*.json"))

    def stored(self, user: str, subject: str) -> bytes:
        """Postfix's copy of the message with that Subject in `user`'s Maildir."""

        def find() -> bytes | None:
            for path in self.postfix.delivered(user):
                data = path.read_bytes()
                if f"\nSubject: {subject}\n".encode() in data:
                    return data
            return None

        return wait_until(find, timeout=20, what=f"{subject} in {user}'s Maildir at Postfix")

    def quit(self) -> str:
        """Stop geosmtp (its cached connections end with QUIT) and return the
        log once Postfix has seen every session end."""
        self.server.stop()

        def ended() -> str | None:
            log, open_ = self.log()
            return log if "]: connect from" in log and not open_ else None

        try:
            return wait_until(ended, what="Postfix to see every session end")
        except AssertionError:
            lines = re.findall(r".*(?:connect from|lost connection|timeout|QUIT).*", self.log()[0])
            raise AssertionError("sessions not ended:\n" + "\n".join(lines)) from None


@pytest.fixture
def relaying(make_server, nexthop, geosmtp_mx_port):  # type: ignore[no-untyped-def]
    """geosmtp with the Postfix's listener `port` ("main", "no-dsn",
    "no-pipelining") as its smarthost; `mx`: it also listens as an MX on
    geosmtp_mx_port (for Postfix's reports)."""

    def start(port: str = "main", mx: bool = False, **config) -> Session:  # type: ignore[no-untyped-def]
        hop = nexthop.port if port == "main" else nexthop.ports[port]
        listening = listeners("submission")
        if mx:
            listening.append({"address": "127.0.0.1", "port": geosmtp_mx_port, "role": "mx"})
        relay = {
            "smarthost": f"{POSTFIX_HOST}:{hop}",
            "smarthost_tls": "none",
            "retry_schedule": [0.5],
            "concurrency": 1,
            **config.pop("relay", {}),
        }
        offset = len(nexthop.maillog())
        server = make_server(
            {
                "listeners": listening,
                "users": users(alice=PASSWORD, dan=None),
                "auth": {"allow_plaintext": True},
                "relay": relay,
                **config,
            }
        )
        return Session(server, nexthop, offset)

    return start


def commands(log: str, verb: str) -> list[str]:
    """The commands starting with `verb` that Postfix read, as they came."""
    return re.findall(rf"\]: < [^:]+\]: ({verb}\b.*)", log)


def sessions(log: str) -> list[dict[str, str]]:
    """The command counts of each session's "disconnect from" line."""
    return [
        dict(item.split("=", 1) for item in line.split()[1:])
        for line in re.findall(r"disconnect from (\S+ .*)", log)
    ]


def unfolded_header(stored: bytes, name: bytes) -> bytes:
    """A header field's value as stored (LF line ends), unfolded (RFC 5322 §2.2.3)."""
    head = stored.partition(b"\n\n")[0]
    match = re.search(rb"^" + name + rb": (.*(?:\n[ \t].*)*)", head, re.M)
    assert match, name
    return re.sub(rb"\n(?=[ \t])", b"", match.group(1))


def geosmtp_part(stored: bytes) -> bytes:
    """What geosmtp sent, from Postfix's Maildir copy: the copy without the
    lines Postfix puts on top (Return-Path, Delivered-To, its Received field),
    with CRLF line ends again: geosmtp's own Received field comes first."""
    start = stored.index(b"\nReceived: from ", stored.index(b"by mx.remote.test (Postfix)"))
    return stored[start + 1 :].replace(b"\n", b"\r\n")


# --------------------------------------------------------------- reuse


def test_messages_relayed_one_after_another_share_connections_at_postfix(relaying):
    """Five messages, at most two per connection: Postfix counts three
    sessions (2, 2 and 1 messages, a RSET before each message after the
    first) and queues five messages."""
    session = relaying(relay={"connection_reuse_limit": 2, "connection_cache_time": 30})
    for n in range(5):
        session.submit(["bob@remote.test"], message(f"reuse-{n}"))
    for n in range(5):
        session.stored("bob", f"reuse-{n}")
    log = session.quit()
    counts = sessions(log)
    assert [c["mail"] for c in counts] == ["2", "2", "1"], counts
    assert [c.get("rset", "0") for c in counts] == ["1", "1", "0"]
    assert [c["ehlo"] for c in counts] == ["1", "1", "1"]
    assert log.count("]: connect from") == 3
    assert len(re.findall(r"\]: \w+: client=", log)) == 5  # a queue id per message
    assert len(commands(log, "RSET")) == 2


# --------------------------------------------------------------- pipelining


@pytest.mark.parametrize("port", ["main", "no-pipelining"])
def test_pipelining_where_postfix_offers_it_and_not_where_it_does_not(relaying, port):
    """Both recipients unknown to Postfix (550 5.1.1): where PIPELINING was
    offered, geosmtp sent DATA with MAIL and the RCPTs, before their replies
    (Postfix answers it 554, no valid recipients); where it was not, geosmtp
    waited for the RCPT replies and sent no DATA. Either way nothing is
    stored and alice gets one bounce."""
    session = relaying(port)
    session.submit(["nobody@remote.test", "none@remote.test"], message(f"pipe-{port}"))
    wait_until(lambda: session.server.messages("alice"), what="the bounce to alice")
    log = session.quit()
    (counts,) = sessions(log)
    assert counts["mail"] == "1" and counts["rcpt"] == "0/2"
    assert len(commands(log, "RCPT")) == 2
    if port == "main":
        assert "250-PIPELINING" in log
        assert commands(log, "DATA") == ["DATA"]
        assert "> localhost[127.0.0.1]: 554 5.5.1 Error: no valid recipients" in log
        assert counts["data"] == "0/1"
    else:
        assert "discarding EHLO keywords: PIPELINING" in log
        assert commands(log, "DATA") == [] and "data" not in counts
    assert not session.postfix.delivered("nobody") and not session.postfix.delivered("none")
    (bounce,) = session.server.messages("alice")
    assert b"Action: failed" in bounce.read_bytes()


# --------------------------------------------------------------- SIZE


def test_size_is_the_size_of_what_is_sent_with_long_lines_folded(relaying):
    """A 2,000-octet body line and a 1,500-octet header line (geosmtp takes
    them: limits.text_line 4000); Postfix stores no line over 998 octets, the
    text unfolded is the original, and SIZE= is the octet count of what
    geosmtp sent (its trace field added, the lines folded), not the client's."""
    session = relaying(limits={"text_line": 4000})
    long_header = "X-Long: " + " ".join(f"w{i:04d}" for i in range(250))  # 1,507 octets
    long_body = "".join(f"{i:04d}" for i in range(500))  # 2,000 octets, no space
    submitted = message("long-lines", head=long_header + "\r\n", body=long_body + "\r\n")
    assert len(long_header) > 1500 and len(long_body) == 2000
    session.submit(["bob@remote.test"], submitted)
    stored = session.stored("bob", "long-lines")
    assert max(len(line) for line in stored.split(b"\n")) <= 998
    assert unfolded_header(stored, b"X-Long") == long_header[len("X-Long: ") :].encode()
    body = stored.partition(b"\n\n")[2]
    assert body.replace(b"\n", b"") == f"body of long-lines{long_body}".encode()
    sent = geosmtp_part(stored)
    assert sent.startswith(b"Received: from ") and b"by mx.test.example" in sent
    log = session.quit()
    (mail,) = commands(log, "MAIL")
    size = int(re.search(r" SIZE=(\d+)", mail).group(1))  # type: ignore[union-attr]
    # What Postfix received is what it stored below its own fields, CRLF
    # again; the data's end (CRLF . CRLF) is not counted (RFC 1870 §4).
    assert size == len(sent)
    assert size > len(submitted)  # the trace field and the folds: not the client's size
    # Postfix's qmgr logs a size= of its own: its queue file's content (its
    # Received field added, each line a record with a record header), which
    # is not what was received on the wire and not comparable with SIZE=.


# --------------------------------------------------------------- Return-Path


def test_a_clients_return_path_goes_neither_to_postfix_nor_to_a_local_copy(relaying):
    """A submitted `Return-Path: <evil@x.example>` to bob (relayed) and dan
    (local): Postfix (which here keeps a Return-Path it is sent) stores only
    its own, the envelope sender; dan's copy has exactly one, the same."""
    session = relaying()
    data = message("return-path", head="Return-Path: <evil@x.example>\r\n")
    session.submit(["bob@remote.test", "dan@test.example"], data)
    stored = session.stored("bob", "return-path")
    assert b"evil" not in stored
    assert re.findall(rb"(?im)^return-path:.*$", stored) == [b"Return-Path: <alice@test.example>"]
    (local,) = wait_until(lambda: session.server.messages("dan"), what="dan's copy")
    copy = local.read_bytes()
    assert b"evil" not in copy
    assert re.findall(rb"(?im)^return-path:.*$", copy) == [b"Return-Path: <alice@test.example>"]
    session.quit()  # no session left to the next test


# --------------------------------------------------------------- DSN

DSN_OPTIONS = {
    "mail_options": ["RET=HDRS", "ENVID=abc123"],
    "rcpt_options": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@remote.test"],
}


def reports(session: Session) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for p in session.server.messages("alice")
    ]


def by(report: email.message.EmailMessage) -> str:
    """Its Reporting-MTA."""
    return status_blocks(report)[0]["Reporting-MTA"]


def status_blocks(report: email.message.EmailMessage) -> list:
    assert report.get_content_type() == "multipart/report"
    status = list(report.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()


def test_dsn_parameters_go_on_to_postfix_which_reports_the_delivery_itself(relaying):
    """Postfix offers DSN: it reads RET, ENVID, NOTIFY and ORCPT from
    geosmtp, and sends alice the success report itself (to geosmtp's MX
    listener); geosmtp sends no `relayed` notice, so alice gets one report."""
    session = relaying(mx=True)
    session.submit(["bob@remote.test"], message("dsn-on"), **DSN_OPTIONS)
    session.stored("bob", "dsn-on")
    (report,) = wait_until(
        lambda: [r for r in reports(session) if by(r) == "dns; mx.remote.test"],
        timeout=20,
        what="Postfix's report",
    )
    wait_until(session.queue_empty, what="geosmtp's queue to empty")
    log = session.quit()
    assert [by(r) for r in reports(session)] == ["dns; mx.remote.test"]  # none of geosmtp's
    (mail,) = commands(log, "MAIL")
    assert mail.split()[1] == "FROM:<alice@test.example>"
    assert mail.split()[3:] == ["RET=HDRS", "ENVID=abc123"]  # after SIZE=
    (rcpt,) = [c for c in commands(log, "RCPT") if "bob@remote.test" in c]
    params = dict(p.split("=", 1) for p in rcpt.split()[2:])
    assert set(params["NOTIFY"].split(",")) == {"SUCCESS", "FAILURE"}
    assert params["ORCPT"] == "rfc822;bob@remote.test"
    assert "sender delivery status notification" in log
    blocks = status_blocks(report)
    assert blocks[0]["Original-Envelope-Id"] == "abc123"
    assert blocks[1]["Action"] == "delivered"


def test_without_dsn_at_postfix_the_parameters_stay_and_geosmtp_reports_relayed(relaying):
    """Postfix without DSN: geosmtp sends none of the parameters, and alice
    gets exactly one report, geosmtp's `relayed` notice (RFC 3461 §6.2.2.2)."""
    session = relaying("no-dsn", mx=True)
    session.submit(["bob@remote.test"], message("dsn-off"), **DSN_OPTIONS)
    session.stored("bob", "dsn-off")
    wait_until(lambda: reports(session), timeout=20, what="geosmtp's report")
    wait_until(session.queue_empty, what="geosmtp's queue to empty")
    log = session.quit()
    (report,) = reports(session)
    assert "discarding EHLO keywords: DSN" in log
    (mail,) = commands(log, "MAIL")
    assert mail.split()[0:2] == ["MAIL", "FROM:<alice@test.example>"]
    assert [p.split("=")[0] for p in mail.split()[2:]] == ["SIZE"]
    assert commands(log, "RCPT") == ["RCPT TO:<bob@remote.test>"]
    assert "sender delivery status notification" not in log
    blocks = status_blocks(report)
    assert blocks[0]["Reporting-MTA"] == "dns; mx.test.example"
    assert blocks[0]["Original-Envelope-Id"] == "abc123"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"
    assert blocks[1]["Action"] == "relayed"
    assert len(session.server.messages("alice")) == 1
