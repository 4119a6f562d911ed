"""One delivery attempt (geosmtp.relay.client.deliver) to real servers on loopback:
scripted sinks (tests/integration/smtp_sink.py) on 127.0.0.x and ::1, Postfix's
smtp-sink, and MX hosts found through a private dnsmasq."""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from geosmtp.relay.client import Outcome, Timeouts, deliver
from geosmtp.relay.mx import Host, Resolver
from tests.conftest import have_ipv6, wait_until
from tests.integration.dns_server import Zone, dns_server
from tests.integration.smtp_sink import Script, Sink, accepts, free_port_on

SENDER = "alice@client.test"
HELO = "client.test"
FAST = Timeouts.all(5)

MESSAGE = (
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\n"
    b"From: alice@client.test\n"
    b"To: bob@sink.test\n"
    b"Subject: dots and line ends\n"
    b"\n"
    b".a line starting with a dot\n"
    b".\n"
    b"a line with a CRLF end\r\n"
    b"..two dots\n"
    b"no final line end"
)
# What the server must receive once it has undone the dot-stuffing.
CONTENT = (
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: alice@client.test\r\n"
    b"To: bob@sink.test\r\n"
    b"Subject: dots and line ends\r\n"
    b"\r\n"
    b".a line starting with a dot\r\n"
    b".\r\n"
    b"a line with a CRLF end\r\n"
    b"..two dots\r\n"
    b"no final line end\r\n"
)
WIRE = CONTENT.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def send(sink: Sink, recipients: list[str], message: bytes = MESSAGE, **kwargs):
    """Deliver to this one sink, by address."""
    host = kwargs.pop("host", Host("sink.test", (sink.address,)))
    kwargs.setdefault("timeouts", FAST)
    kwargs.setdefault("helo_name", HELO)
    return deliver(
        [host], sink.port, kwargs.pop("sender", SENDER), recipients, io.BytesIO(message), **kwargs
    )


@pytest.fixture
def sink():
    with Sink() as s:
        yield s


# ------------------------------------------------------------- plain delivery


def test_exact_envelope_and_content_arrive(sink):
    result = send(sink, ["bob@sink.test", "carol@sink.test"], needs_8bitmime=True)
    assert result.delivered == ["bob@sink.test", "carol@sink.test"]
    for r in result.recipients:
        assert (r.outcome, r.status, r.diagnostic) == (
            Outcome.DELIVERED,
            "2.0.0",
            "smtp; 250 2.0.0 queued",
        )
    assert (result.remote_host, result.remote_address, result.remote_port) == (
        "sink.test",
        "127.0.0.1",
        sink.port,
    )
    assert result.remote_mta == "dns; sink.test" and result.tried == () and result.tls is None
    [tx] = sink.transactions
    assert tx.helo == HELO
    assert tx.mail == f"<{SENDER}> SIZE={len(CONTENT)} BODY=8BITMIME"
    assert tx.rcpts == ["bob@sink.test", "carol@sink.test"]
    assert tx.data == CONTENT
    assert tx.raw == WIRE
    assert not tx.bad_line_ends
    assert sink.commands[-1] == b"QUIT\r\n"


def test_null_sender_and_no_body_parameter_for_a_7bit_message(sink):
    result = send(sink, ["bob@sink.test"], sender="")
    assert result.delivered == ["bob@sink.test"]
    assert sink.transactions[0].mail == f"<> SIZE={len(CONTENT)}"


def test_message_from_a_path_and_from_a_file_position(sink, tmp_path):
    path = tmp_path / "msg"
    path.write_bytes(MESSAGE)
    assert deliver(
        [Host("sink.test", (sink.address,))], sink.port, SENDER, ["bob@sink.test"], path,
        helo_name=HELO, timeouts=FAST,
    ).delivered == ["bob@sink.test"]  # fmt: skip
    with open(tmp_path / "queued", "wb+") as f:
        f.write(b"a queue record before the message\n")
        start = f.tell()
        f.write(MESSAGE)
        f.seek(start)
        result = deliver(
            [Host("sink.test", (sink.address,))], sink.port, SENDER, ["bob@sink.test"], f,
            helo_name=HELO, timeouts=FAST,
        )  # fmt: skip
    assert result.delivered == ["bob@sink.test"]
    assert [t.data for t in sink.transactions] == [CONTENT, CONTENT]
    assert sink.transactions[1].mail.endswith(f"SIZE={len(CONTENT)}")


def test_a_big_message_streams_through_exactly(sink):
    line = b".dotted line that needs stuffing, more or less 64 octets long..\n"
    message = b"Subject: big\n\n" + line * 60_000  # ~3.8 MB
    result = send(sink, ["bob@sink.test"], message)
    assert result.delivered == ["bob@sink.test"]
    assert sink.transactions[0].data == message.replace(b"\n", b"\r\n")


# -------------------------------------------------------- replies and failures


def test_451_then_250_is_delivered_once_on_the_retry():
    with Sink(Script(final_replies=["451 4.3.0 try again later", "250 2.0.0 queued"])) as sink:
        first = send(sink, ["bob@sink.test"])
        assert first.temporary == ["bob@sink.test"]
        r = first["bob@sink.test"]
        assert (r.status, r.diagnostic) == ("4.3.0", "smtp; 451 4.3.0 try again later")
        assert r.reply is not None and r.reply.code == 451
        second = send(sink, ["bob@sink.test"])
        assert second.delivered == ["bob@sink.test"]
    assert len(sink.transactions) == 2
    assert [t.data for t in sink.completed] == [CONTENT]


def test_550_for_one_recipient_only():
    script = Script(rcpt_replies={"bad@sink.test": "550 5.1.1 <bad@sink.test>: no such user"})
    with Sink(script) as sink:
        result = send(sink, ["good@sink.test", "bad@sink.test"])
    assert result.delivered == ["good@sink.test"]
    assert result.permanent == ["bad@sink.test"]
    bad = result["bad@sink.test"]
    assert bad.status == "5.1.1"
    assert bad.diagnostic == "smtp; 550 5.1.1 <bad@sink.test>: no such user"
    [tx] = sink.transactions
    assert tx.rcpts == ["good@sink.test"] and tx.refused == ["bad@sink.test"]
    assert tx.data == CONTENT


def test_rcpt_4xx_and_552_are_temporary():
    script = Script(
        rcpt_replies={
            "later@sink.test": "450 4.2.1 mailbox busy",
            "toomany@sink.test": "552 5.5.3 too many recipients",  # RFC 5321 §4.5.3.1.10
        }
    )
    with Sink(script) as sink:
        result = send(sink, ["ok@sink.test", "later@sink.test", "toomany@sink.test"])
    assert result.delivered == ["ok@sink.test"]
    assert result.temporary == ["later@sink.test", "toomany@sink.test"]
    assert result["later@sink.test"].status == "4.2.1"
    assert result["toomany@sink.test"].status == "4.5.3"
    assert result["toomany@sink.test"].diagnostic == "smtp; 552 5.5.3 too many recipients"


def test_no_accepted_recipient_sends_no_data():
    script = Script(rcpt_replies={"a@sink.test": "550 5.1.1 no", "b@sink.test": "551 no"})
    with Sink(script) as sink:
        result = send(sink, ["a@sink.test", "b@sink.test"])
    assert result.permanent == ["a@sink.test", "b@sink.test"]
    assert result["b@sink.test"].status == "5.0.0"
    assert b"DATA\r\n" not in sink.commands


@pytest.mark.parametrize(
    ("mail_reply", "outcome", "status"),
    [
        ("550 5.7.1 sender rejected", Outcome.PERMANENT, "5.7.1"),
        ("451 4.7.1 greylisted", Outcome.TEMPORARY, "4.7.1"),
        ("421 4.3.2 shutting down", Outcome.TEMPORARY, "4.3.2"),
    ],
)
def test_mail_from_reply_decides_for_everyone(mail_reply, outcome, status):
    with Sink(Script(mail_reply=mail_reply)) as sink:
        result = send(sink, ["a@sink.test", "b@sink.test"])
    assert [r.outcome for r in result.recipients] == [outcome, outcome]
    assert {r.status for r in result.recipients} == {status}
    assert result.recipients[0].diagnostic == f"smtp; {mail_reply}"
    assert not any(c.startswith(b"RCPT") for c in sink.commands)


@pytest.mark.parametrize(
    ("final", "outcome", "status"),
    [
        ("554 5.6.0 message refused", Outcome.PERMANENT, "5.6.0"),
        ("452 4.3.1 insufficient storage", Outcome.TEMPORARY, "4.3.1"),
    ],
)
def test_end_of_data_reply_decides_for_the_accepted(final, outcome, status):
    script = Script(final_replies=[final], rcpt_replies={"x@sink.test": "550 5.1.1 no"})
    with Sink(script) as sink:
        result = send(sink, ["a@sink.test", "x@sink.test", "b@sink.test"])
    assert result["a@sink.test"].outcome is result["b@sink.test"].outcome is outcome
    assert result["a@sink.test"].status == status
    assert result["x@sink.test"].status == "5.1.1"  # refused at RCPT, whatever came after


def test_data_refused():
    with Sink(Script(data_reply="554 5.5.1 no valid recipients")) as sink:
        result = send(sink, ["a@sink.test"])
    assert result.permanent == ["a@sink.test"]
    with Sink(Script(data_reply="250 what?")) as sink:  # not 354: a protocol error
        result = send(sink, ["a@sink.test"])
    assert result.temporary == ["a@sink.test"] and result["a@sink.test"].status == "4.5.0"


def test_connection_dropped_in_the_middle_of_data():
    with Sink(Script(drop_in_data_after=100)) as sink:
        result = send(sink, ["a@sink.test", "b@sink.test"])
    assert result.temporary == ["a@sink.test", "b@sink.test"]
    r = result["a@sink.test"]
    assert r.status == "4.4.2"
    assert r.diagnostic.startswith(
        f"x-geosmtp; lost connection with sink.test[127.0.0.1]:{sink.port} while "
    )
    assert result.remote_host == "sink.test"  # the server that decided
    [tx] = sink.transactions
    assert not tx.complete


@pytest.mark.parametrize(
    ("step", "stage"),
    [
        ("MAIL", "sending MAIL FROM"),
        ("RCPT", "sending RCPT TO"),
        ("DATA", "sending DATA"),
        (".", "waiting for the reply to the end of data"),
    ],
)
def test_a_server_that_stalls_past_the_timeout(step, stage):
    with Sink(Script(stall_at=step)) as sink:
        started = time.monotonic()
        result = send(sink, ["a@sink.test"], timeouts=Timeouts.all(1))
        assert time.monotonic() - started < 10
    r = result["a@sink.test"]
    assert (r.outcome, r.status) == (Outcome.TEMPORARY, "4.4.2")
    assert r.diagnostic == (
        f"x-geosmtp; conversation with sink.test[127.0.0.1]:{sink.port} timed out while {stage}"
    )


def test_rfc_5321_default_timeouts():
    with Sink(Script()) as sink:
        result = send(sink, ["a@sink.test"], timeouts=Timeouts())
    assert result.delivered == ["a@sink.test"]


# ----------------------------------------------- hosts and addresses, in order


def test_every_address_of_every_host_is_tried_in_order():
    """mx1: one address refuses, one greets with 421; mx2: a 5xx greeting; mx3 takes it."""
    port = free_port_on("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
    with (
        Sink(Script(greeting="421 4.3.2 busy, try later"), "127.0.0.3", port) as busy,
        Sink(Script(greeting="554 5.7.1 go away"), "127.0.0.4", port) as hostile,
        Sink(Script(), "127.0.0.5", port) as good,
    ):
        hosts = [
            Host("mx1.test", ("127.0.0.2", "127.0.0.3"), 10),  # nothing listens on .2
            Host("mx2.test", ("127.0.0.4",), 20),
            Host("mx3.test", ("127.0.0.5",), 30),
        ]
        result = deliver(
            hosts, port, SENDER, ["bob@dest.test"], io.BytesIO(MESSAGE),
            helo_name=HELO, timeouts=FAST,
        )  # fmt: skip
    assert result.delivered == ["bob@dest.test"]
    assert (result.remote_host, result.remote_address) == ("mx3.test", "127.0.0.5")
    assert [(t.host, t.address, t.status) for t in result.tried] == [
        ("mx1.test", "127.0.0.2", "4.4.1"),
        ("mx1.test", "127.0.0.3", "4.3.2"),
        ("mx2.test", "127.0.0.4", "4.7.1"),  # a 5xx greeting only skips the host
    ]
    assert result.tried[0].diagnostic == (
        f"x-geosmtp; connect to mx1.test[127.0.0.2]:{port}: Connection refused"
    )
    assert result.tried[1].diagnostic == "smtp; 421 4.3.2 busy, try later"
    assert (busy.connections, hostile.connections, good.connections) == (1, 1, 1)
    assert busy.transactions == hostile.transactions == []
    assert [t.data for t in good.transactions] == [CONTENT]


def test_when_no_address_takes_the_mail_everyone_waits_with_the_last_reason():
    port = free_port_on("127.0.0.2", "127.0.0.3")
    with Sink(Script(stall_at="greeting"), "127.0.0.3", port):
        result = deliver(
            [Host("mx1.test", ("127.0.0.2",)), Host("mx2.test", ("127.0.0.3",))],
            port, SENDER, ["a@dest.test", "b@dest.test"], io.BytesIO(MESSAGE),
            helo_name=HELO, timeouts=Timeouts.all(1),
        )  # fmt: skip
    assert result.temporary == ["a@dest.test", "b@dest.test"]
    assert result.remote_host is None and result.relay == "none"
    assert [t.address for t in result.tried] == ["127.0.0.2", "127.0.0.3"]
    last = result.tried[-1]
    assert (
        result["a@dest.test"].diagnostic
        == last.diagnostic
        == (
            f"x-geosmtp; conversation with mx2.test[127.0.0.3]:{port} timed out"
            " while receiving the initial server greeting"
        )
    )
    assert result["a@dest.test"].status == "4.4.2"


def test_an_address_shared_by_two_hosts_is_tried_once():
    port = free_port_on("127.0.0.2")
    result = deliver(
        [Host("mx1.test", ("127.0.0.2",)), Host("mx2.test", ("127.0.0.2",))],
        port, SENDER, ["a@dest.test"], io.BytesIO(MESSAGE), helo_name=HELO, timeouts=FAST,
    )  # fmt: skip
    assert [t.host for t in result.tried] == ["mx1.test"]


@pytest.mark.skipif(not have_ipv6(), reason="no IPv6 on loopback")
def test_ipv6_address():
    with Sink(Script(), "::1") as sink:
        result = send(sink, ["a@sink.test"], host=Host("v6.test", ("::1",)))
    assert result.delivered == ["a@sink.test"]
    assert result.relay == f"v6.test[::1]:{sink.port}"


def test_a_host_without_addresses_is_connected_to_by_name(sink):
    """A smarthost named in the config: the system's resolver finds its addresses."""
    result = send(sink, ["a@sink.test"], host=Host("localhost"))
    assert result.delivered == ["a@sink.test"]
    assert result.relay == f"localhost[localhost]:{sink.port}"


def test_mx_hosts_from_dns_first_refuses_second_takes_it(tmp_path):
    """The whole path: MX records in a real DNS server, then delivery."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    zone = Zone(
        mx={"dest.test": [(10, "mx1.dest.test"), (20, "mx2.dest.test")]},
        hosts={"mx1.dest.test": ["127.0.0.2"], "mx2.dest.test": ["127.0.0.3"]},
    )
    with dns_server(zone, tmp_path) as dns, Sink(Script(), "127.0.0.3", port) as sink:
        hosts = Resolver([dns.nameserver], timeout=3).resolve_mx("dest.test")
        result = deliver(
            hosts, port, SENDER, ["bob@dest.test"], io.BytesIO(MESSAGE),
            helo_name=HELO, timeouts=FAST,
        )  # fmt: skip
    assert [(t.host, t.address) for t in result.tried] == [("mx1.dest.test", "127.0.0.2")]
    assert result.delivered == ["bob@dest.test"]
    assert result.remote_mta == "dns; mx2.dest.test"
    assert sink.transactions[0].rcpts == ["bob@dest.test"]
    assert sink.transactions[0].data == CONTENT


# ------------------------------------------------- EHLO, SIZE, 8BITMIME, SMTPUTF8


def test_helo_when_ehlo_is_refused():
    with Sink(Script(ehlo_reply="502 5.5.1 no EHLO here")) as sink:
        result = send(sink, ["a@sink.test"], needs_8bitmime=True)
    assert result.delivered == ["a@sink.test"]
    assert sink.transactions[0].mail == f"<{SENDER}>"  # no extensions after HELO
    assert sink.transactions[0].helo == HELO


def test_ehlo_4xx_moves_on():
    with Sink(Script(ehlo_reply="421 4.7.0 not now")) as sink:
        result = send(sink, ["a@sink.test"])
    assert result.temporary == ["a@sink.test"]
    assert result.tried[0].diagnostic == "smtp; 421 4.7.0 not now"


def test_8bit_message_to_a_server_without_8bitmime_fails_without_sending():
    with Sink(Script(extensions=["SIZE 100000"])) as sink:
        result = send(sink, ["a@sink.test"], b"Subject: caf\xc3\xa9\n\nbody\n", needs_8bitmime=True)
    r = result["a@sink.test"]
    assert (r.outcome, r.status) == (Outcome.PERMANENT, "5.6.3")
    assert "8BITMIME" in r.diagnostic
    assert result.remote_mta == "dns; sink.test"
    assert sink.transactions == [] and not any(c.startswith(b"MAIL") for c in sink.commands)


def test_7bit_message_declared_8bit_goes_to_a_server_without_8bitmime():
    with Sink(Script(extensions=[])) as sink:
        result = send(sink, ["a@sink.test"], needs_8bitmime=True)
    assert result.delivered == ["a@sink.test"]
    assert sink.transactions[0].mail == f"<{SENDER}>"


def test_undeclared_8bit_content_is_still_caught():
    with Sink(Script(extensions=["ENHANCEDSTATUSCODES"])) as sink:
        result = send(sink, ["a@sink.test"], MESSAGE + b"\xff")
    assert result["a@sink.test"].status == "5.6.3"


def test_smtputf8_needed_but_not_offered_is_a_permanent_5_6_7():
    with Sink(Script(extensions=["8BITMIME", "SIZE 100000"])) as sink:
        declared = send(sink, ["a@sink.test"], needs_smtputf8=True)
        by_address = send(sink, ["jörg@sink.test"])
    for result, rcpt in ((declared, "a@sink.test"), (by_address, "jörg@sink.test")):
        r = result[rcpt]
        assert (r.outcome, r.status) == (Outcome.PERMANENT, "5.6.7")
        assert "SMTPUTF8" in r.diagnostic
    assert sink.transactions == []


def test_smtputf8_when_offered(sink):
    message = "From: jörg@client.test\nSubject: grüße\n\nbody\n".encode()
    result = send(sink, ["zoë@sink.test"], message, sender="jörg@client.test", needs_8bitmime=True)
    assert result.delivered == ["zoë@sink.test"]
    [tx] = sink.transactions
    assert tx.mail == f"<jörg@client.test> SIZE={len(tx.data)} BODY=8BITMIME SMTPUTF8"
    assert tx.rcpts == ["zoë@sink.test"]
    assert tx.data == message.replace(b"\n", b"\r\n")


def test_size_over_the_servers_limit_fails_without_sending():
    with Sink(Script(extensions=["8BITMIME", "SIZE 100"])) as sink:
        result = send(sink, ["a@sink.test"])
    r = result["a@sink.test"]
    assert (r.outcome, r.status) == (Outcome.PERMANENT, "5.3.4")
    assert f"({len(CONTENT)} octets)" in r.diagnostic and "SIZE 100" in r.diagnostic
    assert sink.transactions == []


def test_size_is_what_is_sent_and_no_size_without_the_extension():
    """Issue 20: SIZE= is measured from the file as it is sent (CRLF line ends,
    less the dot-stuffing, RFC 1870 §3), not the size the message came with."""
    with Sink(Script(extensions=["8BITMIME", "SIZE"])) as sink:  # SIZE without a limit
        assert send(sink, ["a@sink.test"]).delivered == ["a@sink.test"]
    [tx] = sink.transactions
    assert tx.mail == f"<{SENDER}> SIZE={len(CONTENT)}" and tx.data == CONTENT
    assert len(CONTENT) != len(MESSAGE)
    with Sink(Script(extensions=["8BITMIME"])) as sink:
        send(sink, ["a@sink.test"])
    assert sink.transactions[0].mail == f"<{SENDER}>"


def test_a_looping_message_never_connects(sink):
    result = send(sink, ["a@sink.test"], b"Received: x\n" * 51 + MESSAGE)
    assert result["a@sink.test"].status == "5.4.6"
    assert sink.connections == 0


@pytest.mark.parametrize(
    ("extensions", "why"),
    [
        ([f"X-PADDING-{i}" for i in range(1000)], "reply with too many lines"),
        ([f"X-PADDING-{i} {'x' * 1000}" for i in range(100)], "reply too long"),
    ],
)
def test_a_reply_that_never_ends_is_cut_off(extensions, why):
    with Sink(Script(extensions=extensions)) as sink:
        result = send(sink, ["a@sink.test"])
    assert result.temporary == ["a@sink.test"]
    assert result.tried[0].diagnostic.endswith(f"while performing the EHLO handshake: {why}")


# ------------------------------------------------------------------- TLS


@pytest.fixture
def server_tls(certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.cert, certs.key)
    return ctx


def test_opportunistic_starttls_when_offered(server_tls):
    with Sink(Script(tls=server_tls)) as sink:
        result = send(sink, ["a@sink.test"])  # the default context checks nothing
    assert result.delivered == ["a@sink.test"]
    assert result.tls is not None and result.tls.startswith("TLSv1.")
    [tx] = sink.transactions
    assert tx.tls and tx.data == CONTENT and tx.helo == HELO
    # EHLO, STARTTLS, EHLO again (RFC 3207 §4.2), then the transaction
    verbs = [c.split()[0] for c in sink.commands]
    assert verbs[:4] == [b"EHLO", b"STARTTLS", b"EHLO", b"MAIL"]


def test_opportunistic_plaintext_when_not_offered(sink):
    result = send(sink, ["a@sink.test"])
    assert result.delivered == ["a@sink.test"] and result.tls is None


def test_opportunistic_tls_handshake_failure_retries_the_host_in_plaintext(server_tls):
    with Sink(Script(tls=server_tls, broken_tls=True)) as sink:
        result = send(sink, ["a@sink.test"])
    assert result.delivered == ["a@sink.test"]
    assert result.tls is None
    assert sink.connections == 2
    [failed] = result.tried
    assert failed.status == "4.7.5" and "TLS handshake" in failed.diagnostic
    assert not sink.transactions[0].tls


def test_opportunistic_tls_with_a_checking_context_falls_back_on_a_bad_certificate(
    server_tls, certs
):
    with Sink(Script(tls=server_tls)) as sink:
        result = send(
            sink, ["a@sink.test"], host=Host("wrong-name.test", ("127.0.0.1",)),
            tls_context=certs.client_context(),
        )  # fmt: skip
    assert result.delivered == ["a@sink.test"] and result.tls is None
    assert "CERTIFICATE_VERIFY_FAILED" in result.tried[0].diagnostic


def test_opportunistic_starttls_refused_goes_on_in_plaintext(server_tls):
    with Sink(Script(tls=server_tls, starttls_reply="454 4.7.0 TLS not available")) as sink:
        result = send(sink, ["a@sink.test"])
    assert result.delivered == ["a@sink.test"] and result.tls is None
    assert sink.connections == 1


def test_required_starttls_checks_the_certificate(server_tls, certs):
    with Sink(Script(tls=server_tls)) as sink:
        ok = send(
            sink, ["a@sink.test"], host=Host("localhost", ("127.0.0.1",)), tls="starttls",
            tls_context=certs.client_context(),
        )  # fmt: skip
        wrong = send(
            sink, ["a@sink.test"], host=Host("wrong-name.test", ("127.0.0.1",)),
            tls="starttls", tls_context=certs.client_context(),
        )  # fmt: skip
        untrusted = send(sink, ["a@sink.test"], tls="starttls")  # the system's CAs
    assert ok.delivered == ["a@sink.test"] and ok.tls is not None
    for failed in (wrong, untrusted):
        r = failed["a@sink.test"]
        assert (r.outcome, r.status) == (Outcome.TEMPORARY, "4.7.5")
        assert "CERTIFICATE_VERIFY_FAILED" in r.diagnostic
        assert len(failed.tried) == 1  # no plaintext retry when TLS is required
    assert len(sink.transactions) == 1


def test_required_starttls_not_offered(sink):
    result = send(sink, ["a@sink.test"], tls="starttls")
    r = result["a@sink.test"]
    assert (r.outcome, r.status) == (Outcome.TEMPORARY, "4.7.4")
    assert "TLS is required, but was not offered" in r.diagnostic
    assert sink.transactions == []


def test_implicit_tls(server_tls, certs):
    with Sink(Script(implicit_tls=server_tls)) as sink:
        result = send(
            sink, ["a@sink.test"], host=Host("localhost", ("127.0.0.1",)), tls="tls",
            tls_context=certs.client_context(),
        )  # fmt: skip
    assert result.delivered == ["a@sink.test"] and result.tls is not None
    assert sink.transactions[0].tls and sink.transactions[0].data == CONTENT


def test_implicit_tls_to_a_plaintext_server_fails(sink, certs):
    result = send(sink, ["a@sink.test"], tls="tls", tls_context=certs.client_context())
    assert result["a@sink.test"].status == "4.7.5"


def test_no_tls_at_all_when_told(server_tls):
    with Sink(Script(tls=server_tls)) as sink:
        result = send(sink, ["a@sink.test"], tls="none")
    assert result.delivered == ["a@sink.test"] and result.tls is None
    assert b"STARTTLS\r\n" not in sink.commands


# ------------------------------------------------------------------- AUTH


@pytest.mark.parametrize("mechanisms", [("PLAIN",), ("LOGIN",), ("CRAM-MD5", "PLAIN")])
def test_auth_over_starttls(server_tls, certs, mechanisms):
    script = Script(tls=server_tls, users={"alice": "sêcret pw"}, auth_mechanisms=mechanisms)
    with Sink(script) as sink:
        result = send(
            sink, ["a@sink.test"], host=Host("localhost", ("127.0.0.1",)), tls="starttls",
            tls_context=certs.client_context(), auth=("alice", "sêcret pw"),
        )  # fmt: skip
    assert result.delivered == ["a@sink.test"]
    assert sink.transactions[0].auth == "alice"


def test_auth_refused_is_temporary_and_sends_nothing(server_tls, certs):
    with Sink(Script(tls=server_tls, users={"alice": "right"})) as sink:
        result = send(
            sink, ["a@sink.test"], host=Host("localhost", ("127.0.0.1",)), tls="starttls",
            tls_context=certs.client_context(), auth=("alice", "wrong"),
        )  # fmt: skip
    r = result["a@sink.test"]
    assert (r.outcome, r.status) == (Outcome.TEMPORARY, "4.7.8")
    assert r.diagnostic == "smtp; 535 5.7.8 authentication credentials invalid"
    assert "wrong" not in repr(result)
    assert sink.transactions == []


def test_credentials_never_go_over_plaintext_unless_told(sink):
    with Sink(Script(users={"alice": "pw"})) as plain:
        refused = send(plain, ["a@sink.test"], auth=("alice", "pw"))
        told = send(plain, ["a@sink.test"], auth=("alice", "pw"), tls="none")
    assert refused["a@sink.test"].status == "4.7.0"
    assert "without TLS" in refused["a@sink.test"].diagnostic
    assert told.delivered == ["a@sink.test"]
    assert [t.auth for t in plain.transactions] == ["alice"]
    no_auth = send(sink, ["a@sink.test"], auth=("alice", "pw"), tls="none")
    assert "offers no AUTH" in no_auth["a@sink.test"].diagnostic


# ------------------------------------------------------- Postfix's smtp-sink


SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


@pytest.fixture
def postfix_sink(tmp_path):
    """Postfix's smtp-sink on 127.0.0.6, dumping each transaction to a file."""
    if not Path(SMTP_SINK).exists():
        pytest.skip("Postfix's smtp-sink is not installed (Debian package postfix)")

    def start(*options: str):
        port = free_port_on("127.0.0.6")
        dump = tmp_path / f"dump{port}"
        dump.mkdir(mode=0o777)
        as_root = ["-u", "root"] if os.geteuid() == 0 else []  # required when root
        proc = subprocess.Popen(
            [SMTP_SINK, *as_root, "-d", f"{dump}/msg.", *options, f"127.0.0.6:{port}", "10"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"smtp-sink exited with {proc.returncode}")
            return accepts("127.0.0.6", port)

        wait_until(listening, timeout=10, what="smtp-sink to listen")
        return port, dump

    started: list[subprocess.Popen] = []
    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_delivery_to_postfix_smtp_sink(postfix_sink):
    port, dump = postfix_sink()
    message = MESSAGE + b"\ncaf\xc3\xa9\n"
    result = deliver(
        [Host("postfix.test", ("127.0.0.6",))], port, SENDER, ["bob@dest.test", "eve@dest.test"],
        io.BytesIO(message), helo_name=HELO, timeouts=FAST, needs_8bitmime=True,
    )  # fmt: skip
    assert result.delivered == ["bob@dest.test", "eve@dest.test"]
    assert result["bob@dest.test"].diagnostic == "smtp; 250 2.0.0 Ok"
    files = wait_until(lambda: list(dump.iterdir()), what="smtp-sink's dump")
    # smtp-sink writes LF line ends, its own X- and Received: lines first, a blank line last
    text = wait_until(lambda: (d := files[0].read_bytes()).endswith(b"\n\n") and d, what="dump")
    head, _, content = text.partition(b"\nReceived: from client.test")
    assert head.split(b"\n") == [
        b"X-Client-Addr: 127.0.0.1",
        b"X-Client-Proto: ESMTP",
        b"X-Helo-Args: client.test",
        f"X-Mail-Args: <{SENDER}> BODY=8BITMIME".encode(),
        # smtp-sink offers DSN: the original recipient goes on (RFC 3461 §4.2, issue 20)
        b"X-Rcpt-Args: <bob@dest.test> ORCPT=rfc822;bob@dest.test",
        b"X-Rcpt-Args: <eve@dest.test> ORCPT=rfc822;eve@dest.test",
    ]
    content = content.split(b"\n", 3)[3]  # the rest of smtp-sink's own Received: field
    expected = (CONTENT + b"caf\xc3\xa9\r\n").replace(b"\r\n", b"\n")
    assert content == expected + b"\n"


def test_postfix_smtp_sink_refusing_recipients(postfix_sink):
    port, _ = postfix_sink("-f", "RCPT", "-B", "550 5.1.1 no such user here")
    result = deliver(
        [Host("postfix.test", ("127.0.0.6",))], port, SENDER, ["bob@dest.test"],
        io.BytesIO(MESSAGE), helo_name=HELO, timeouts=FAST,
    )  # fmt: skip
    r = result["bob@dest.test"]
    assert (r.outcome, r.status) == (Outcome.PERMANENT, "5.1.1")
    assert r.diagnostic == "smtp; 550 5.1.1 no such user here"


# ------------------------------------------------------------------- gevent


def test_deliveries_cooperate_under_gevent_monkey_patching():
    """As the server runs it (`patch_all()` first): a delivery waiting on a silent
    server lets the others run, and smtplib's sockets, TLS included, are gevent's."""
    script = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import io, json, gevent
        from geosmtp.relay.client import Timeouts, deliver
        from geosmtp.relay.mx import Host
        from tests.integration.smtp_sink import Script, Sink

        ticks = []
        def ticker():
            for i in range(200):
                ticks.append(i)
                gevent.sleep(0.01)

        def send(sink, timeouts):
            r = deliver([Host("sink.test", (sink.address,))], sink.port, "a@x.test",
                        ["b@sink.test"], io.BytesIO(b"Subject: hi\\n\\nbody\\n"),
                        helo_name="client.test", timeouts=timeouts)
            return [r.recipients[0].outcome.value, r.recipients[0].diagnostic]

        with Sink(Script(stall_at="MAIL")) as silent, Sink() as good:
            t = gevent.spawn(ticker)
            slow = gevent.spawn(send, silent, Timeouts.all(1))
            fast = [gevent.spawn(send, good, Timeouts.all(5)) for _ in range(5)]
            gevent.joinall([slow, *fast], timeout=20)
            t.kill()
            print(json.dumps({"slow": slow.value, "fast": [g.value for g in fast],
                              "ticks": len(ticks), "completed": len(good.completed)}))
        """
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    outcome, diagnostic = result["slow"]
    assert outcome == "temporary" and "timed out while sending MAIL FROM" in diagnostic
    assert [v[0] for v in result["fast"]] == ["delivered"] * 5
    assert result["completed"] == 5
    assert result["ticks"] >= 20  # the hub ran while a delivery waited (blocked: 1 or 2)
