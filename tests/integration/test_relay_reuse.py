"""Connection reuse and pipelining of the relay's client (issue 20), against
real servers: the project's scripted sink (tests/integration/smtp_sink.py),
Postfix's smtp-sink, and geosmtp itself relaying to a smarthost."""

from __future__ import annotations

import io
import os
import smtplib
import ssl
import subprocess
from pathlib import Path

import gevent
import pytest

from geosmtp.relay.client import Outcome, Relay, Timeouts
from geosmtp.relay.mx import Host
from tests.conftest import listeners, users, wait_until
from tests.integration.smtp_sink import Script, Sink, accepts, free_port_on

FAST = Timeouts.all(5)
MESSAGE = b"From: alice@client.test\nSubject: reuse\n\nbody\n"
WIRE = MESSAGE.replace(b"\n", b"\r\n")
SIZE = f"SIZE={len(WIRE)}"  # RFC 1870: the size as sent, with CRLF line ends
PIPELINING = ["PIPELINING", "8BITMIME", "SIZE 10000000", "ENHANCEDSTATUSCODES"]
SMTP_SINK = "/usr/sbin/smtp-sink"


def send(relay: Relay, sink_address: str, port: int, rcpts: list[str], **kwargs):  # type: ignore[no-untyped-def]
    return relay.deliver(
        [Host("sink.test", (sink_address,))], port, "alice@client.test", rcpts,
        io.BytesIO(MESSAGE), helo_name="client.test", timeouts=FAST, **kwargs,
    )  # fmt: skip


def verbs(sink: Sink) -> list[bytes]:
    return [c.split(b" ")[0].strip().upper() for c in sink.commands]


# ------------------------------------------------------------- reuse


@pytest.mark.parametrize("extensions", [None, PIPELINING], ids=["one-by-one", "pipelining"])
def test_messages_to_one_destination_share_one_connection(extensions):
    script = Script() if extensions is None else Script(extensions=extensions)
    relay = Relay()
    with Sink(script) as sink:
        for n in range(5):
            result = send(relay, sink.address, sink.port, [f"r{n}@sink.test"])
            assert result.delivered == [f"r{n}@sink.test"] and result.tried == ()
        assert sink.connections == 1
        assert [t.rcpts for t in sink.completed] == [[f"r{n}@sink.test"] for n in range(5)]
        # a RSET before each transaction after the first; one EHLO for all
        assert verbs(sink).count(b"RSET") == 4 and verbs(sink).count(b"EHLO") == 1
        relay.close()
        wait_until(lambda: verbs(sink)[-1:] == [b"QUIT"], what="QUIT when the cache closes")


def test_the_reuse_limit_opens_a_new_connection():
    relay = Relay(reuse_limit=2)
    with Sink() as sink:
        for _ in range(5):
            assert send(relay, sink.address, sink.port, ["a@sink.test"]).delivered
        assert sink.connections == 3  # ceil(5 / 2)
        assert len(sink.completed) == 5
    relay.close()


def test_an_idle_connection_is_closed_by_the_reaper():
    relay = Relay(cache_time=0.3)
    with Sink() as sink:
        assert send(relay, sink.address, sink.port, ["a@sink.test"]).delivered
        assert len(relay.cache) == 1
        # the reaper is a greenlet: the hub runs it while the test waits in gevent
        wait_until(
            lambda: gevent.sleep(0.02) or verbs(sink)[-1:] == [b"QUIT"], what="the reaper's QUIT"
        )
        assert len(relay.cache) == 0
        assert send(relay, sink.address, sink.port, ["a@sink.test"]).delivered
        assert sink.connections == 2
    relay.close()


def test_no_reuse_when_switched_off():
    relay = Relay(cache_time=0)
    with Sink() as sink:
        for _ in range(3):
            assert send(relay, sink.address, sink.port, ["a@sink.test"]).delivered
        assert sink.connections == 3
        assert verbs(sink).count(b"QUIT") == 3


@pytest.mark.parametrize("extensions", [None, PIPELINING], ids=["one-by-one", "pipelining"])
def test_a_connection_the_server_closed_is_not_reused_and_costs_no_failure(extensions):
    script = Script(close_after_messages=1)
    if extensions is not None:
        script.extensions = extensions
    relay = Relay()
    with Sink(script) as sink:
        for n in range(3):
            result = send(relay, sink.address, sink.port, ["a@sink.test"])
            # the dead connection's RSET fails; a new one takes the mail, and the
            # address is not counted as failed
            assert result.delivered == ["a@sink.test"] and result.tried == (), n
        assert sink.connections == 3 and len(sink.completed) == 3
    relay.close()


@pytest.mark.parametrize("extensions", [None, PIPELINING], ids=["one-by-one", "pipelining"])
def test_a_connection_the_server_spoke_on_unasked_is_dropped_without_an_rset(extensions):
    # The server said "421 idle too long" while the connection waited in the
    # cache: the client sees it before reusing it and opens a new connection,
    # without the round trip of an RSET whose reply would only be that 421.
    script = Script(unasked_after_message="421 4.4.2 idle too long, closing")
    if extensions is not None:
        script.extensions = extensions
    relay = Relay()
    with Sink(script) as sink:
        for n in range(3):
            result = send(relay, sink.address, sink.port, ["a@sink.test"])
            assert result.delivered == ["a@sink.test"] and result.tried == (), n
            wait_until(lambda n=n: sink.unasked == n + 1, what="the unasked line sent")
        assert sink.connections == 3 and len(sink.completed) == 3
        assert b"RSET" not in verbs(sink)
    relay.close()


@pytest.mark.parametrize(
    ("script", "connections"),
    [
        (Script(final_replies=["421 4.3.2 closing", "250 2.0.0 ok"]), 2),
        (Script(final_replies=["451 4.3.0 later", "250 2.0.0 ok"]), 1),
        (Script(rcpt_replies={"x@sink.test": "421 4.3.2 closing"}), 2),
        (Script(drop_in_data_after=10), 2),
    ],
    ids=["421-at-end-of-data", "451-keeps-it", "421-to-rcpt", "lost-in-data"],
)
def test_a_connection_that_failed_is_never_reused(script, connections):
    relay = Relay()
    with Sink(script) as sink:
        first = send(relay, sink.address, sink.port, ["x@sink.test"])
        assert first.temporary == ["x@sink.test"]
        second = send(relay, sink.address, sink.port, ["y@sink.test"])
        if script.drop_in_data_after is None:
            assert second.delivered == ["y@sink.test"]
        assert sink.connections == connections
    relay.close()


def test_other_keys_get_other_connections():
    relay = Relay()
    with Sink() as sink:
        send(relay, sink.address, sink.port, ["a@sink.test"])
        send(relay, sink.address, sink.port, ["a@sink.test"], tls="none")  # another TLS mode
        r = relay.deliver(
            [Host("sink.test", (sink.address,))], sink.port, "a@x.test", ["a@sink.test"],
            io.BytesIO(MESSAGE), helo_name="other.test", timeouts=FAST,
        )  # fmt: skip
        assert r.delivered == ["a@sink.test"]
        assert sink.connections == 3
        assert {t.helo for t in sink.completed} == {"client.test", "other.test"}
    relay.close()


# ------------------------------------------------------------- pipelining


def test_pipelining_when_offered_and_one_command_at_a_time_when_not():
    rcpts = ["b@sink.test", "c@sink.test", "d@sink.test"]
    with Sink(Script(extensions=PIPELINING)) as sink:
        assert send(Relay(cache_time=0), sink.address, sink.port, rcpts).delivered == rcpts
    # MAIL and every RCPT arrived with the next command behind them: one write
    assert sink.pipelined == [
        f"MAIL FROM:<alice@client.test> {SIZE}\r\n".encode(),
        *[f"RCPT TO:<{r}>\r\n".encode() for r in rcpts],
    ]
    with Sink() as sink:
        assert send(Relay(cache_time=0), sink.address, sink.port, rcpts).delivered == rcpts
    assert sink.pipelined == []  # each command waited for its reply


def test_pipelining_with_every_recipient_refused_sends_no_message():
    refuse = {r: "550 5.1.1 no such user" for r in ("b@sink.test", "c@sink.test")}
    relay = Relay()
    with Sink(Script(extensions=PIPELINING, rcpt_replies=refuse)) as sink:
        result = send(relay, sink.address, sink.port, list(refuse))
        assert result.permanent == list(refuse)
        assert [t.complete for t in sink.transactions] == [False]
        assert b"DATA" in verbs(sink)  # sent with the rest, refused by the server (503)
        # the connection is still good for the next message
        assert send(relay, sink.address, sink.port, ["ok@sink.test"]).delivered
        assert sink.connections == 1
    relay.close()


def test_dsn_parameters_go_to_a_server_that_offers_dsn():
    relay = Relay(cache_time=0)
    options = {
        "envid": "QQ+2B1",
        "ret": "HDRS",
        "notify": [["SUCCESS", "FAILURE"], None],
        "orcpt": ["rfc822;B@orig.test", None],
    }
    with Sink(Script(extensions=["DSN", "8BITMIME"])) as sink:
        r = send(relay, sink.address, sink.port, ["b@sink.test", "c+x@sink.test"], **options)
        assert r.delivered == ["b@sink.test", "c+x@sink.test"] and r.dsn
    rcpt_lines = [c for c in sink.commands if c.startswith(b"RCPT")]
    assert sink.transactions[0].mail == "<alice@client.test> RET=HDRS ENVID=QQ+2B1"
    assert rcpt_lines == [
        b"RCPT TO:<b@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@orig.test\r\n",
        b"RCPT TO:<c+x@sink.test> ORCPT=rfc822;c+2Bx@sink.test\r\n",  # xtext (RFC 3461 §4)
    ]
    with Sink() as sink:  # no DSN offered: no parameters, and the result says so
        r = send(relay, sink.address, sink.port, ["b@sink.test", "c@sink.test"], **options)
        assert r.delivered and not r.dsn
    assert sink.transactions[0].mail.split() == ["<alice@client.test>", SIZE]
    assert all(c.endswith(b">\r\n") for c in sink.commands if c.startswith(b"RCPT"))


def test_a_long_line_is_folded_on_the_wire():
    body = b"x" * 3000
    message = b"Subject: " + b"long " * 300 + b"\n\n" + body + b"\n"
    with Sink() as sink:
        r = Relay(cache_time=0).deliver(
            [Host("sink.test", (sink.address,))], sink.port, "a@x.test", ["b@sink.test"],
            io.BytesIO(message), helo_name="client.test", timeouts=FAST,
        )  # fmt: skip
        assert r.delivered == ["b@sink.test"]
    [tx] = sink.completed
    assert max(len(line) for line in tx.data.split(b"\r\n")) <= 998
    _, _, got_body = tx.data.partition(b"\r\n\r\n")
    assert got_body.replace(b"\r\n", b"") == body
    assert tx.mail.endswith(f"SIZE={len(tx.data)}")


# ------------------------------------------------------------- Postfix's smtp-sink


@pytest.fixture
def postfix_sink_log(tmp_path: Path):
    """Postfix's smtp-sink with -c (counters) and -v (the conversation) on
    127.0.0.6: yields (port, a function returning its output so far)."""
    if not os.path.exists(SMTP_SINK):
        pytest.skip("Postfix's smtp-sink is not installed")
    port = free_port_on("127.0.0.6")
    log = tmp_path / "smtp-sink.log"
    as_root = ["-u", "root"] if os.geteuid() == 0 else []  # required when root
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [SMTP_SINK, *as_root, "-c", "-v", f"127.0.0.6:{port}", "10"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"smtp-sink exited with {proc.returncode}")
            return accepts("127.0.0.6", port)

        wait_until(listening, timeout=10, what="smtp-sink to listen")
        yield port, lambda: log.read_bytes().replace(b"\r", b"\n").decode("utf-8", "replace")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_reuse_counted_at_postfix_smtp_sink(postfix_sink_log):
    port, output = postfix_sink_log
    relay = Relay(reuse_limit=4)
    for n in range(6):
        r = send(relay, "127.0.0.6", port, [f"r{n}@dest.test", "s@dest.test"])
        assert r.delivered == [f"r{n}@dest.test", "s@dest.test"] and r.dsn
        assert r["s@dest.test"].outcome is Outcome.DELIVERED
    relay.close()
    log = wait_until(lambda: "quit=2 mesg=6" in (o := output()) and o, what="smtp-sink's count")
    # ceil(6 / 4) connections, not 6: an EHLO and a QUIT each (the fixture's
    # probe that saw smtp-sink listen is a session without either)
    assert log.count("EHLO client.test") == 2 and log.count(": QUIT") == 2
    assert log.count("MAIL FROM:") == 6 and log.count(": RSET") == 4


def test_relayed_messages_reuse_one_connection_through_geosmtp(make_server):
    """End to end: five messages submitted to geosmtp, relayed to a smarthost one
    after the other (relay.concurrency 1), go over one connection."""
    with Sink() as sink:
        server = make_server(
            {
                "listeners": listeners("submission"),
                "users": users(alice="pw-reuse"),
                "auth": {"allow_plaintext": True},
                "relay": {
                    "smarthost": f"127.0.0.1:{sink.port}",
                    "smarthost_tls": "none",
                    "retry_schedule": [0.5],
                    "concurrency": 1,
                    "connection_cache_time": 30,
                },
            }
        )
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
            client.login("alice", "pw-reuse")
            for n in range(5):
                message = f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()
                assert client.sendmail("alice@test.example", [f"r{n}@remote.test"], message) == {}
        wait_until(lambda: len(sink.completed) == 5, what="five relayed messages")
        assert sink.connections == 1
        assert verbs(sink).count(b"RSET") == 4
        log = wait_until(lambda: (a := server.access_log()).count("outcome=sent") == 5 and a)
        assert log.count("relay=127.0.0.1[127.0.0.1]") == 5
        server.stop()
        wait_until(lambda: verbs(sink)[-1:] == [b"QUIT"], what="QUIT at the server's stop")


# ------------------------------------------------------------- review (issue 20)


def _server_tls(certs) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.cert, certs.key)
    return ctx


def test_a_connection_checked_for_one_name_or_context_is_not_reused_for_another(certs):
    """A cached connection's certificate was checked against one host name
    with one context: a message to another MX name on the same address, or
    after the context changed (a reload's `smarthost_ca_file`), must check
    again on a new connection (Postfix keys its cache with the TLS policy and
    the name it verified), not go on one that was never checked for it."""
    relay = Relay()
    trusting = certs.client_context()

    def to(name: str, context: ssl.SSLContext | None) -> object:
        return relay.deliver(
            [Host(name, ("127.0.0.1",))], sink.port, "alice@client.test", ["a@sink.test"],
            io.BytesIO(MESSAGE), helo_name="client.test", timeouts=FAST, tls="starttls",
            tls_context=context,
        )  # fmt: skip

    with Sink(Script(tls=_server_tls(certs))) as sink:
        assert to("localhost", trusting).delivered == ["a@sink.test"]
        assert to("localhost", trusting).delivered == ["a@sink.test"]
        assert sink.connections == 1  # the same name and context: reused
        for name, context in (("wrong-name.test", trusting), ("localhost", None)):
            r = to(name, context)["a@sink.test"]
            assert (r.outcome, r.status) == (Outcome.TEMPORARY, "4.7.5")
            assert "CERTIFICATE_VERIFY_FAILED" in r.diagnostic
        assert sink.connections == 3 and len(sink.completed) == 2
    relay.close()
