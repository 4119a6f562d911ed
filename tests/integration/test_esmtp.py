"""ESMTP extensions against the real server: EHLO keywords, PIPELINING, CHUNKING (BDAT),
SMTPUTF8, 8BITMIME, SIZE, and switching them off in the config."""

from __future__ import annotations

import smtplib
import unicodedata

import pytest

from tests.conftest import listeners, users
from tests.integration.wire import Wire

PASSWORD = "esmtp-secret-pw"
MAX_SIZE = 20_000


@pytest.fixture(scope="module")
def esmtp_server(make_module_server, certs):
    return make_module_server(
        {
            "listeners": listeners("mx"),
            "tls": certs.tls_config,
            "users": users(alice=PASSWORD, bob=None),
            "limits": {"max_message_size": MAX_SIZE},
        }
    )


def ehlo_lines(wire: Wire) -> list[str]:
    return wire.expect("EHLO client.example", 250).splitlines()[1:]


def body_of(path) -> bytes:
    """The stored message without the trace fields the server put in front."""
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <")
    head, _, rest = data.partition(b"\n\tby ")
    assert b"Received: from " in head
    # The Received field ends with its "for <...>; date" or "; date" continuation line.
    _, _, after = rest.partition(b"\n")
    while after.startswith(b"\t"):
        _, _, after = after.partition(b"\n")
    return after


# -------------------------------------------------------------------- EHLO


def test_ehlo_on_mx_lists_the_extensions(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        lines = ehlo_lines(wire)
    assert lines[: lines.index("VRFY")] == ["PIPELINING", f"SIZE {MAX_SIZE}"]
    for keyword in ("8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "STARTTLS"):
        assert keyword in lines, lines
    assert not [line for line in lines if line.startswith("AUTH")]  # not before TLS


def test_ehlo_after_starttls_offers_auth_not_starttls(esmtp_server, certs):
    with smtplib.SMTP(esmtp_server.host, esmtp_server.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=certs.client_context())
        client.ehlo("client.example")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert not client.has_extn("starttls")
        for keyword in ("pipelining", "size", "8bitmime", "smtputf8", "chunking"):
            assert client.has_extn(keyword), keyword


def test_helo_gets_no_extensions(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        assert wire.expect("HELO client.example", 250) == "mx.test.example"
        # Parameters are ESMTP: after HELO they are refused.
        assert wire.cmd("MAIL FROM:<a@b.example> BODY=8BITMIME")[0] == 555


def test_switched_off_extensions_vanish(make_server, certs):
    server = make_server(
        {
            "tls": certs.tls_config,
            "users": users(alice=PASSWORD, bob=None),
            "auth": {"allow_plaintext": True},
            "extensions": {
                "pipelining": False,
                "size": False,
                "eightbitmime": False,
                "enhancedstatuscodes": False,
                "smtputf8": False,
                "chunking": False,
                "starttls": False,
                "auth": False,
                "dsn": False,
            },
        }
    )
    with Wire.connect(server.host, server.port) as wire:
        assert ehlo_lines(wire) == ["VRFY"]
        assert wire.cmd("STARTTLS")[0] == 500
        assert wire.cmd(f"AUTH PLAIN {'AGFsaWNlAHg='}")[0] == 503
        code, text = wire.cmd("MAIL FROM:<carol@remote.example> SIZE=100")
        assert code == 555 and not text.startswith("5.")  # no enhanced status codes
        assert wire.cmd("MAIL FROM:<carol@remote.example> BODY=8BITMIME")[0] == 555
        assert wire.cmd("MAIL FROM:<carol@remote.example> SMTPUTF8")[0] == 555
        assert wire.cmd("MAIL FROM:<carol@remote.example>") == (250, "Ok")
        assert wire.cmd("RCPT TO:<alice@test.example>") == (250, "Ok")
        assert wire.cmd("BDAT 5 LAST")[0] == 500
        assert wire.cmd("DATA")[0] == 354
        assert wire.cmd("Subject: plain\r\n\r\nold-style\r\n.")[0] == 250
    (path,) = server.messages("alice")
    assert body_of(path) == b"Subject: plain\n\nold-style\n"


def test_extensions_on_by_default_but_starttls_needs_a_certificate(shared_server):
    server = shared_server  # the default config
    with Wire.connect(server.host, server.port) as wire:
        lines = ehlo_lines(wire)
    assert "STARTTLS" not in lines and "CHUNKING" in lines and "PIPELINING" in lines


# ---------------------------------------------------------------- SIZE


def test_size_parameter_over_the_limit_is_552(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.expect("EHLO client.example", 250)
        code, text = wire.cmd(f"MAIL FROM:<carol@remote.example> SIZE={MAX_SIZE + 1}")
        assert code == 552 and text.startswith("5.3.4"), text
        wire.expect(f"MAIL FROM:<carol@remote.example> SIZE={MAX_SIZE}", 250)


# ------------------------------------------------------------ PIPELINING


def test_pipelined_transaction_gets_replies_in_order(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.expect("EHLO client.example", 250)
        wire.send(
            b"MAIL FROM:<carol@remote.example>\r\n"
            b"RCPT TO:<pipe1@test.example>\r\n"
            b"RCPT TO:<nobody@remote.example>\r\n"
            b"RCPT TO:<pipe2@test.example>\r\n"
            b"DATA\r\n"
        )
        replies = [wire.reply() for _ in range(5)]
        assert [code for code, _ in replies] == [250, 250, 550, 250, 354], replies
        assert replies[2][1].startswith("5.7.1")  # relay refused, in its place
        wire.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        code, text = wire.reply()
        assert code == 250 and "queued as" in text
        assert wire.reply()[0] == 221
    for box in ("pipe1", "pipe2"):
        (path,) = esmtp_server.messages(box)
        assert body_of(path) == b"Subject: pipelined\n\nbody\n"


def test_two_messages_in_one_write(esmtp_server):
    one = (
        b"MAIL FROM:<carol@remote.example>\r\nRCPT TO:<twice@test.example>\r\nDATA\r\n"
        b"Subject: %d\r\n\r\nmessage %d\r\n.\r\n"
    )
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.send(b"EHLO client.example\r\n" + one % (1, 1) + one % (2, 2) + b"QUIT\r\n")
        codes = [wire.reply()[0] for _ in range(10)]
        assert codes == [250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
        assert wire.is_closed()
    bodies = sorted(body_of(p) for p in esmtp_server.messages("twice"))
    assert bodies == [b"Subject: 1\n\nmessage 1\n", b"Subject: 2\n\nmessage 2\n"]


def test_commands_pipelined_behind_a_refused_data_are_still_answered(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.send(
            b"EHLO client.example\r\nMAIL FROM:<carol@remote.example>\r\n"
            b"RCPT TO:<nobody@remote.example>\r\nDATA\r\nNOOP\r\n"
        )
        codes = [wire.reply()[0] for _ in range(5)]
        # No valid recipient: DATA is 503, and the NOOP that follows is a command.
        assert codes == [250, 250, 550, 503, 250]


# -------------------------------------------------------------- CHUNKING


def bdat(wire: Wire, chunk: bytes, last: bool = False) -> tuple[int, str]:
    wire.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
    return wire.reply()


def start_transaction(wire: Wire, box: str) -> None:
    wire.expect("EHLO client.example", 250)
    wire.expect("MAIL FROM:<carol@remote.example>", 250)
    wire.expect(f"RCPT TO:<{box}@test.example>", 250)


def test_bdat_chunks_make_one_message(esmtp_server):
    chunks = [
        b"Subject: chunked\r\n\r\nfirst line\r\n",
        b"QUIT\r\nRSET\r\n.\r\n",  # commands and the DATA terminator are data here
        b"line split across chunks \r",
        b"\nno final newline",
    ]
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        start_transaction(wire, "chunks")
        for chunk in chunks[:-1]:
            code, text = bdat(wire, chunk)
            assert code == 250, text
        code, text = bdat(wire, chunks[-1], last=True)
        assert code == 250 and "queued as" in text, text
        wire.expect("NOOP", 250)  # the session goes on after the message
    (path,) = esmtp_server.messages("chunks")
    assert body_of(path) == b"".join(chunks).replace(b"\r\n", b"\n")


def test_bdat_pipelined_in_one_write(esmtp_server):
    body = b"Subject: one write\r\n\r\n" + bytes(range(256)) * 4
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.send(
            b"EHLO client.example\r\nMAIL FROM:<carol@remote.example> BODY=BINARYMIME\r\n"
            b"RSET\r\nMAIL FROM:<carol@remote.example>\r\nRCPT TO:<bdatpipe@test.example>\r\n"
            + b"BDAT 10\r\n"
            + body[:10]
            + b"BDAT %d LAST\r\n" % (len(body) - 10)
            + body[10:]
            + b"QUIT\r\n"
        )
        codes = [wire.reply()[0] for _ in range(7)]
        # BINARYMIME is not offered: that MAIL is refused, the rest goes through.
        assert codes == [250, 501, 250, 250, 250, 250, 250], codes
        assert wire.reply()[0] == 221
    (path,) = esmtp_server.messages("bdatpipe")
    assert body_of(path) == body.replace(b"\r\n", b"\n")


def test_bdat_over_the_size_limit_is_552_and_the_next_chunk_is_discarded(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        start_transaction(wire, "bigchunk")
        big = b"x" * (MAX_SIZE + 1)
        wire.send(b"BDAT %d\r\n" % len(big) + big + b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\n")
        code, text = wire.reply()
        assert code == 552 and text.startswith("5.3.4"), text
        # The pipelined chunk is read (its "QUIT"s are not commands) and refused.
        code, text = wire.reply()
        assert code == 503, text
        wire.expect("NOOP", 250)
    assert esmtp_server.messages("bigchunk") == []
    assert esmtp_server.tmp_files() == []


def test_a_long_line_is_refused_by_bdat_as_by_data(esmtp_server):
    """RFC 5321 §4.5.3.1.6 without BINARYMIME: the verb that carries the line does not matter."""
    line = b"z" * (MAX_SIZE // 2) + b"\r\n"
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        start_transaction(wire, "longline")
        wire.expect("DATA", 354)
        code, text = wire.cmd(b"Subject: long\r\n\r\n" + line + b".")
        assert code == 500 and text.startswith("5.5.2"), text
        wire.expect("MAIL FROM:<carol@remote.example>", 250)
        wire.expect("RCPT TO:<longline@test.example>", 250)
        code, text = bdat(wire, b"Subject: long\r\n\r\n" + line, last=True)
        assert code == 500 and text.startswith("5.5.2"), text
        wire.expect("NOOP", 250)
    assert esmtp_server.messages("longline") == []
    assert esmtp_server.tmp_files() == []


def test_data_after_bdat_is_503(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        start_transaction(wire, "mixed")
        assert bdat(wire, b"Subject: x\r\n\r\n")[0] == 250
        code, text = wire.cmd("DATA")
        assert code == 503, text
        assert wire.cmd("RCPT TO:<other@test.example>")[0] == 503
        # RSET abandons the transaction; nothing is stored, no spool is left.
        wire.expect("RSET", 250)
        wire.expect("QUIT", 221)
    assert esmtp_server.messages("mixed") == []
    assert esmtp_server.tmp_files() == []


def test_bdat_without_transaction_reads_and_refuses_the_chunk(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.expect("EHLO client.example", 250)
        code, _ = bdat(wire, b"QUIT\r\n", last=True)
        assert code == 503
        wire.expect("NOOP", 250)  # the QUIT in the chunk was not run


def test_bdat_zero_last_ends_the_message(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        start_transaction(wire, "zerolast")
        assert bdat(wire, b"Subject: z\r\n\r\nbody\r\n")[0] == 250
        code, text = bdat(wire, b"", last=True)
        assert code == 250 and "queued as" in text
    (path,) = esmtp_server.messages("zerolast")
    assert body_of(path) == b"Subject: z\n\nbody\n"


# ---------------------------------------------------- SMTPUTF8, 8BITMIME


def test_smtputf8_recipient_goes_to_a_normalised_mailbox(esmtp_server):
    decomposed = unicodedata.normalize("NFD", "José")  # "Jose" + combining acute
    message = "Subject: olá\r\nFrom: zoë@test.example\r\n\r\nçà et là\r\n".encode()
    with smtplib.SMTP(esmtp_server.host, esmtp_server.port, timeout=10) as client:
        refused = client.sendmail(
            "zoë@remote.example",
            [f"{decomposed}@test.example", "josé@test.example"],
            message,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
        assert refused == {}
    # One directory, NFC and lower case, whatever form the client used.
    assert "jos\u00e9" in [p.name for p in esmtp_server.mail_dir.iterdir()]
    assert not [p for p in esmtp_server.mail_dir.iterdir() if p.name.startswith("jose")]
    paths = esmtp_server.messages("jos\u00e9")
    assert len(paths) == 1  # the two spellings are one mailbox: delivered once
    data = paths[0].read_bytes()
    assert data.startswith("Return-Path: <zoë@remote.example>\n".encode())
    assert body_of(paths[0]) == message.replace(b"\r\n", b"\n")


def test_utf8_address_without_smtputf8_is_553(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.expect("EHLO client.example", 250)
        code, text = wire.cmd("MAIL FROM:<zoë@remote.example>".encode())
        assert code == 553 and text.startswith("5.6.7"), text
        wire.expect("MAIL FROM:<carol@remote.example>", 250)
        code, text = wire.cmd("RCPT TO:<josé@test.example>".encode())
        assert code == 553 and text.startswith("5.6.7"), text
        wire.expect("RSET", 250)
        # With the parameter, the same addresses are fine.
        wire.expect("MAIL FROM:<zoë@remote.example> SMTPUTF8".encode(), 250)
        wire.expect("RCPT TO:<josé@test.example>".encode(), 250)


def test_smtputf8_mailbox_names_stay_safe(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.expect("EHLO client.example", 250)
        wire.expect("MAIL FROM:<carol@remote.example> SMTPUTF8", 250)
        for local in ("a\u2028b", "x\u200by", "\u202eevil", "..", "a/b"):
            code, text = wire.cmd(f'RCPT TO:<"{local}"@test.example>'.encode())
            assert code in (501, 550), (local, code, text)
    names = [p.name for p in esmtp_server.mail_dir.iterdir()]
    assert all(name.isprintable() and "/" not in name for name in names), names


def test_8bit_body_with_body_8bitmime_is_stored_byte_exact(esmtp_server):
    body = b"Subject: 8bit\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n"
    body += bytes(range(0x80, 0x100)) + b"\r\n\xff\xfe\x00\x01 bytes\r\n..dot\r\n"
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.expect("EHLO client.example", 250)
        wire.expect("MAIL FROM:<carol@remote.example> BODY=8BITMIME", 250)
        wire.expect("RCPT TO:<eightbit@test.example>", 250)
        wire.expect("DATA", 354)
        wire.send(body + b".\r\n")
        assert wire.reply()[0] == 250
    (path,) = esmtp_server.messages("eightbit")
    expected = body.replace(b"\r\n..dot", b"\r\n.dot").replace(b"\r\n", b"\n")
    assert body_of(path) == expected


def test_body_parameter_values(esmtp_server):
    with Wire.connect(esmtp_server.host, esmtp_server.port) as wire:
        wire.expect("EHLO client.example", 250)
        assert wire.cmd("MAIL FROM:<c@remote.example> BODY=8BITMIME")[0] == 250
        wire.expect("RSET", 250)
        assert wire.cmd("MAIL FROM:<c@remote.example> BODY=7BIT")[0] == 250
        wire.expect("RSET", 250)
        assert wire.cmd("MAIL FROM:<c@remote.example> BODY=BINARYMIME")[0] == 501
        assert wire.cmd("MAIL FROM:<c@remote.example> FOO=BAR")[0] == 555
