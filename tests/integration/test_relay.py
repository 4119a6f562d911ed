"""The outbound relay end to end: submission -> queue -> MX (real DNS) -> sink.

A private dnsmasq serves the MX records; the receiving servers are scripted
sinks on 127.0.0.x (tests/integration/smtp_sink.py). geosmtp is started
through its CLI, its mail to remote.test goes to whatever the MX says, on
`relay.mx_port`.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import smtplib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import listeners, users, wait_until
from tests.integration.dns_server import (
    Zone,
    dns_server,
    remote_mx,
    servfail_nameserver,
    silent_nameserver,
)
from tests.integration.smtp_sink import Script, Sink, free_port_on
from tests.integration.test_access_log import parse

PASSWORD = "relay-test-pw"
MESSAGE = (
    b"From: alice@test.example\r\nSubject: out\r\nMessage-ID: <out@test.example>\r\n\r\nhi\r\n"
)


@pytest.fixture
def relay_setup(make_server, tmp_path):
    """A sink as remote.test's MX on 127.0.0.2, and a geosmtp that relays to it.

    `zone`: what the private dnsmasq serves instead of remote.test's MX alone;
    `nameserver`: a broken nameserver (dns_server.py's, a context manager of
    its "ip:port") asked instead of any dnsmasq, with a 1 s `dns.timeout`."""

    def start(script: Script, zone: Zone | None = None, nameserver=None, **relay):  # type: ignore[no-untyped-def]
        port = free_port_on("127.0.0.2")
        sink = stack.enter_context(Sink(script, address="127.0.0.2", port=port))
        if nameserver is None:
            zone = zone or remote_mx("127.0.0.2")
            dns_config = stack.enter_context(dns_server(zone, tmp_path / "dns")).config()
        else:
            dns_config = {"nameservers": [stack.enter_context(nameserver)], "timeout": 1}
        config = {
            "listeners": listeners("submission"),
            "users": users(alice=PASSWORD),
            "auth": {"allow_plaintext": True},
            "relay": {"mx_port": port, "retry_schedule": [0.5], **relay},
            "dns": dns_config,
        }
        return make_server(config), sink

    with contextlib.ExitStack() as stack:
        yield start


def submit(server, rcpts: list[str], message: bytes = MESSAGE, **options) -> None:  # type: ignore[no-untyped-def]
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
        client.login("alice", PASSWORD)
        refused = client.sendmail("alice@test.example", rcpts, message, **options)
        assert refused == {}


def queue_empty(server) -> bool:  # type: ignore[no-untyped-def]
    return not any((server.mail_dir / ".queue" / "records").glob("*.json"))


def test_relayed_mail_reaches_the_mx_exactly(relay_setup):
    server, sink = relay_setup(Script())
    submit(server, ["bob@remote.test", "carol@remote.test", "bob@test.example"])
    (tx,) = wait_until(lambda: sink.completed, what="the sink to receive the message")
    assert tx.sender == "alice@test.example"
    assert tx.rcpts == ["bob@remote.test", "carol@remote.test"]  # one transaction
    # The content is what was submitted, behind our Return-Path/Received headers.
    head, _, _body = tx.data.partition(b"\r\n\r\n")
    assert tx.data.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
    assert b"Received: from " in head and b"Subject: out" in head
    assert not tx.bad_line_ends
    assert not tx.data.startswith(b"Return-Path:")  # a relay adds none (RFC 5321 §4.4)
    # The local recipient got it at once, the queue is empty once delivered.
    assert len(server.messages("bob")) == 1
    wait_until(lambda: queue_empty(server), what="the queue to empty")
    log = wait_until(lambda: "outcome=sent" in server.access_log() and server.access_log())
    assert "to=<bob@remote.test>" in log and "relay=mx.remote.test[127.0.0.2]" in log


def test_a_451_is_retried_and_delivered_once(relay_setup):
    server, sink = relay_setup(Script(final_replies=["451 4.3.0 try later", "250 2.0.0 ok"]))
    submit(server, ["bob@remote.test"])
    wait_until(lambda: sink.completed, timeout=20, what="the retry to be delivered")
    wait_until(lambda: queue_empty(server), what="the queue to empty")
    assert len(sink.completed) == 1
    assert [t.final_reply[:3] for t in sink.transactions if t.complete] == ["451", "250"]
    assert server.messages("alice") == []  # no bounce, no delay notice


def test_a_550_bounces_to_the_sender_with_an_rfc3464_report(relay_setup):
    script = Script(rcpt_replies={"bob@remote.test": "550 5.1.1 <bob@remote.test>: no such user"})
    server, sink = relay_setup(script)
    submit(server, ["bob@remote.test", "carol@remote.test"])
    (bounce_path,) = wait_until(lambda: server.messages("alice"), what="the bounce")
    wait_until(lambda: queue_empty(server), what="the queue to empty")
    assert [t.rcpts for t in sink.completed] == [["carol@remote.test"]]
    raw = bounce_path.read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")
    bounce = email.message_from_bytes(raw, policy=email.policy.default)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["Auto-Submitted"] == "auto-replied"
    _, status, original = bounce.iter_parts()
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    recipient = blocks[1]
    assert recipient["Final-Recipient"] == "rfc822; bob@remote.test"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert "550 5.1.1" in recipient["Diagnostic-Code"]
    assert len(blocks) == 2  # carol was delivered: not in the report
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <out@test.example>" in original.get_payload(decode=True) or (
        "<out@test.example>" in str(original)
    )


def test_notify_never_means_no_bounce(relay_setup):
    script = Script(rcpt_replies={"bob@remote.test": "550 5.1.1 no such user"})
    server, _sink = relay_setup(script)
    submit(server, ["bob@remote.test"], rcpt_options=["NOTIFY=NEVER"])
    wait_until(lambda: queue_empty(server), what="the queue to give the message up")
    wait_until(lambda: "outcome=bounced" in server.access_log(), what="the attempt logged")
    assert server.messages("alice") == []


def test_without_a_login_nothing_is_relayed(relay_setup):
    server, sink = relay_setup(Script())
    with (
        smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client,
        pytest.raises(smtplib.SMTPSenderRefused) as refused,
    ):
        client.sendmail("x@remote.test", ["bob@remote.test"], MESSAGE)
    assert refused.value.smtp_code == 530
    assert sink.connections == 0 and queue_empty(server)


def test_notify_success_on_a_local_recipient_gets_a_delivered_report(relay_setup):
    server, _sink = relay_setup(Script())
    submit(
        server,
        ["bob@test.example"],
        mail_options=["RET=HDRS", "ENVID=QQ314159"],
        rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@test.example"],
    )
    assert len(server.messages("bob")) == 1
    (report_path,) = wait_until(lambda: server.messages("alice"), what="the delivery report")
    report = email.message_from_bytes(report_path.read_bytes(), policy=email.policy.default)
    assert report["Subject"] == "Successful Mail Delivery Report"
    _, status, _ = report.iter_parts()
    per_message, recipient = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert recipient["Action"] == "delivered" and recipient["Status"] == "2.0.0"
    assert recipient["Original-Recipient"] == "rfc822; bob@test.example"


# -------------------------------------------- every attempt in the access log


def attempt_line(server, rcpt: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The fields of the queue's first access-log line for `rcpt` (the SMTP
    transaction's own lines have a `session=`)."""

    def first() -> dict[str, str] | None:
        for line in server.access_log().splitlines():
            if f" to=<{rcpt}> " in line and " session=" not in line:
                return parse(line)
        return None

    return wait_until(first, what=f"the access-log line of the attempt for {rcpt}")


def queue_id(server) -> str:  # type: ignore[no-untyped-def]
    """The queue id of the one message submitted, from its transaction's line."""
    lines = [li for li in server.access_log().splitlines() if " session=" in li]
    (line,) = [parse(li) for li in lines if "result=250" in li]
    return line["queue"]


@dataclass(frozen=True)
class Attempt:
    """One kind of attempt, and the access-log line it must write."""

    rcpt: str
    status: str  # the DSN status
    outcome: str
    words: str  # found in the reason
    script: Script = field(default_factory=Script)  # the MX's (a sink on 127.0.0.2)
    zone: Zone | None = None  # None: remote.test's MX alone
    nameserver: Callable[[], Any] | None = None  # a broken one instead of dnsmasq
    mx_down: bool = False  # nothing listens at the MX's address and port
    by_mx: bool = False  # the MX answered: relay= names it


def mx_replies(reply: str, outcome: str) -> Attempt:
    """The MX answers RCPT TO:<bob@remote.test> with `reply` ("450 4.2.1 busy")."""
    return Attempt(
        "bob@remote.test",
        reply.split()[1],
        outcome,
        f"smtp; {reply}",
        script=Script(rcpt_replies={"bob@remote.test": reply}),
        by_mx=True,
    )


def null_mx_zone() -> Zone:
    zone = remote_mx("127.0.0.2")
    zone.mx["nullmx.test"] = [(0, ".")]
    return zone


ATTEMPTS = {
    "nxdomain": Attempt("bob@nosuch.test", "5.1.2", "bounced", "no such domain"),
    "null MX": Attempt("bob@nullmx.test", "5.1.10", "bounced", "null MX", zone=null_mx_zone()),
    "servfail": Attempt(
        "bob@remote.test", "4.4.3", "deferred", "SERVFAIL", nameserver=servfail_nameserver
    ),
    "dns timeout": Attempt(
        "bob@remote.test", "4.4.3", "deferred", "timed out", nameserver=silent_nameserver
    ),
    "connection refused": Attempt(
        "bob@remote.test", "4.4.1", "deferred", "Connection refused", mx_down=True
    ),
    "4xx": mx_replies("450 4.2.1 mailbox busy", "deferred"),
    "5xx": mx_replies("550 5.1.1 no such user", "bounced"),
}


@pytest.mark.parametrize("case", list(ATTEMPTS))
def test_every_attempt_is_a_line_in_the_access_log(relay_setup, case):
    """Issue 16: failures before a connection (DNS, null MX, a refused
    connection) wrote no access-log line, and `done (...: failed)` in log.txt
    said nothing of why."""
    attempt = ATTEMPTS[case]
    nameserver = attempt.nameserver() if attempt.nameserver else None
    server, sink = relay_setup(attempt.script, zone=attempt.zone, nameserver=nameserver)
    if attempt.mx_down:
        sink.close()
    submit(server, [attempt.rcpt])
    line = attempt_line(server, attempt.rcpt)
    assert line["queue"] == queue_id(server)
    if attempt.by_mx:
        assert line["relay"] == f"mx.remote.test[127.0.0.2]:{sink.port}"
    else:
        assert line["relay"] == "none"
    assert float(line["delay"]) >= 0
    assert (line["status"], line["outcome"]) == (attempt.status, attempt.outcome)
    assert attempt.words in line["reason"], line["reason"]
    if attempt.outcome == "bounced":
        wait_until(lambda: queue_empty(server), what="the queue to give the message up")
        why = f"{attempt.status} {line['reason']}"
        done = f"queue {line['queue']}: done (<{attempt.rcpt}>: failed ({why}))"
        # The worker's log lines reach log.txt through the master: wait for it.
        wait_until(lambda: done in server.server_log(), what=f"{done!r} in log.txt")
        info = [li for li in server.server_log().splitlines() if " INFO " in li and done in li]
        assert len(info) == 1, server.server_log()[-3000:]
    else:
        assert not queue_empty(server)  # still queued, tried again later
