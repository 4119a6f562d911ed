"""The SMTP core's ESMTP extensions, STARTTLS, AUTH and listener roles (issue 4).

PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8
(RFC 6531), ENHANCEDSTATUSCODES (RFC 2034, RFC 3463), CHUNKING (RFC 3030),
STARTTLS (RFC 3207), AUTH (RFC 4954), and the relay decision. Cases run in
the three modes of `smtp_helpers.run`: whole, byte by byte, and pipelined.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import random
import re

import pytest

from geosmtp.protocol import NEED_DATA, PAUSED, CloseConnection, sasl
from geosmtp.smtp import (
    AuthRequest,
    Extensions,
    Limits,
    MessageData,
    MessageEnd,
    MessageStart,
    RecipientPolicy,
    Security,
    SMTPConnection,
    StartTLS,
    State,
    TransactionAborted,
    TransactionRejected,
)
from geosmtp.smtp import replies as R

from .smtp_helpers import (
    DATA,
    EHLO,
    GO_AHEAD,
    HANDSHAKE,
    HOST,
    MAIL,
    MODES,
    OK,
    QUEUED,
    RCPT,
    RCPT_OK,
    SENDER_OK,
    TXN,
    Result,
    drain,
    feed,
    make_conn,
    run,
)

#: A listener with a certificate and users: STARTTLS offered, AUTH after TLS.
TLS = Security(tls_available=True, auth_available=True)
#: AUTH offered in the clear (local testing only).
PLAIN_AUTH = Security(auth_available=True, auth_plaintext=True)
#: An implicit-TLS listener (submissions).
IMPLICIT_TLS = Security(tls_active=True, auth_available=True)

STARTTLS = b"STARTTLS\r\n"
READY = b"220 2.0.0 Ready to start TLS\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
AUTH_FAILED = b"535 5.7.8 Authentication credentials invalid\r\n"
CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
BAD_BASE64 = b"501 5.5.2 Cannot decode response\r\n"
NEED_TLS = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
AUTH_REQUIRED = b"530 5.7.0 Authentication required\r\n"
RELAY_DENIED = b"550 5.7.1 Relay access denied\r\n"
RELAY_LATER = b"451 4.3.2 Relaying is not available yet; try again later\r\n"
UNKNOWN_USER = b"550 5.1.1 Recipient address rejected: user unknown\r\n"
BAD_NAME = b"550 5.1.3 Recipient address rejected: invalid mailbox name\r\n"
NEEDS_UTF8 = b"553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter\r\n"
NOT_OWNED = b"553 5.7.1 Sender address rejected: not owned by the logged-in user\r\n"
TOO_BIG = b"552 5.3.4 Error: message exceeds fixed maximum message size\r\n"
SIZE_TOO_BIG = b"552 5.3.4 Error: message size exceeds fixed maximum\r\n"
TLS_UNAVAILABLE = b"454 4.7.0 TLS not available due to temporary reason\r\n"
TLS_ACTIVE = b"503 5.5.1 Error: TLS already active\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
NEED_EHLO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
IN_TRANSACTION = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
BAD_PARAMETER = b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"
BAD_VALUE = b"501 5.5.4 Bad parameter value\r\n"

ENHANCED_RE = re.compile(rb"^([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3} ")


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def auth_plain(user: str = "alice", password: str = "secret") -> bytes:
    return b"AUTH PLAIN " + b64(f"\0{user}\0{password}") + b"\r\n"


def chunk(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def octets(n: int) -> bytes:
    return b"250 2.0.0 Ok: %d octets received\r\n" % n


def ehlo_keywords(res: Result) -> list[str]:
    """The keywords of the last EHLO reply in `res`."""
    ehlo = [r for r in res.reply_lines if r[0] == b"250-" + HOST.encode()]
    return [line[4:].decode() for line in ehlo[-1][1:]]


def tail(res: Result, n: int) -> list[bytes]:
    """The last `n` replies, each joined back into its wire form."""
    return [b"".join(line + b"\r\n" for line in r) for r in res.reply_lines[-n:]]


# --------------------------------------------------------------- EHLO keywords

ALL_PLAIN = [
    "PIPELINING",
    "SIZE 10485760",
    "VRFY",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "DSN",
    "SMTPUTF8",
    "CHUNKING",
]


@pytest.mark.parametrize(
    ("security", "extra"),
    [
        (Security(), []),
        (Security(tls_available=True), ["STARTTLS"]),
        (TLS, ["STARTTLS"]),  # AUTH only after TLS
        (Security(auth_available=True), []),
        (PLAIN_AUTH, ["AUTH PLAIN LOGIN"]),
        (Security(auth_plaintext=True), []),  # nobody has a password: no AUTH
        (IMPLICIT_TLS, ["AUTH PLAIN LOGIN"]),
        (Security(tls_active=True, tls_available=True), []),  # TLS already: no STARTTLS
        (
            Security(tls_available=True, auth_available=True, auth_plaintext=True),
            ["STARTTLS", "AUTH PLAIN LOGIN"],
        ),
    ],
)
def test_ehlo_keywords_follow_security(security, extra):
    res = run(EHLO, "whole", make_conn(security=security))
    keywords = ehlo_keywords(res)
    assert sorted(keywords) == sorted(ALL_PLAIN + extra)
    # STARTTLS and AUTH sit after VRFY, before ENHANCEDSTATUSCODES
    assert keywords[:3] == ALL_PLAIN[:3] and keywords[-5:] == ALL_PLAIN[-5:]


@pytest.mark.parametrize(
    ("field", "keyword"),
    [
        ("pipelining", "PIPELINING"),
        ("size", "SIZE"),
        ("eightbitmime", "8BITMIME"),
        ("enhancedstatuscodes", "ENHANCEDSTATUSCODES"),
        ("smtputf8", "SMTPUTF8"),
        ("chunking", "CHUNKING"),
        ("starttls", "STARTTLS"),
        ("auth", "AUTH"),
    ],
)
def test_each_extension_can_be_switched_off(field, keyword):
    security = Security(tls_available=True, auth_available=True, auth_plaintext=True)
    on = ehlo_keywords(run(EHLO, "whole", make_conn(security=security)))
    off_conn = make_conn(extensions=Extensions(**{field: False}), security=security)
    off = ehlo_keywords(run(EHLO, "whole", off_conn))
    assert [k.split()[0] for k in on if k.split()[0] != keyword] == [k.split()[0] for k in off]
    assert keyword in [k.split()[0] for k in on]


@pytest.mark.parametrize("mode", MODES)
def test_ehlo_after_tls_offers_auth_and_not_starttls(mode):
    res = run([EHLO, STARTTLS, HANDSHAKE, EHLO], mode, make_conn(security=TLS))
    first, second = [r for r in res.reply_lines if r[0] == b"250-" + HOST.encode()]
    assert b"250-STARTTLS" in first and not any(b"AUTH" in line for line in first)
    assert not any(b"STARTTLS" in line for line in second)
    assert b"250-AUTH PLAIN LOGIN" in second


# ------------------------------------------------------------------ PIPELINING


@pytest.mark.parametrize("mode", MODES)
def test_a_whole_transaction_in_one_write_gets_every_reply_in_order(mode):
    script = [
        EHLO,
        b"MAIL FROM:<sender@example.org> SIZE=20 BODY=8BITMIME\r\n",
        RCPT,
        b"RCPT TO:<someone@elsewhere.test>\r\n",
        b"RCPT TO:<bob@example.test>\r\n",
        DATA,
        b"hello\r\n.\r\n",
        b"MAIL FROM:<>\r\n",
        RCPT,
        chunk(b"two\r\n", last=True),
        b"QUIT\r\n",
    ]
    res = run(script, mode, make_conn())
    assert tail(res, 10) == [
        SENDER_OK,
        RCPT_OK,
        RELAY_DENIED,
        RCPT_OK,
        GO_AHEAD,
        QUEUED,
        SENDER_OK,
        RCPT_OK,
        QUEUED,
        b"221 2.0.0 mx.example.test closing connection\r\n",
    ]
    assert res.messages == [b"hello\n", b"two\n"]


def test_input_behind_a_pause_is_kept():
    """Commands pipelined behind AUTH and behind the end of a message wait, then run."""
    conn = make_conn(security=PLAIN_AUTH)
    conn.receive_data(EHLO + auth_plain() + MAIL + RCPT + chunk(b"x\r\n", last=True) + b"NOOP\r\n")
    event = conn.next_event()
    assert isinstance(event, AuthRequest)
    conn.receive_data(b"RSET\r\n")  # more arrives while the password is checked
    assert conn.next_event() is PAUSED and conn.next_event() is PAUSED
    assert b"235" not in conn.data_to_send()
    conn.auth_result("alice")
    kinds = []
    while not isinstance(event := conn.next_event(), MessageEnd):
        assert event is not NEED_DATA and event is not PAUSED
        kinds.append(type(event))
    assert kinds == [MessageStart, MessageData]
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == AUTH_OK + SENDER_OK + RCPT_OK
    conn.message_stored("Q9")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as Q9\r\n" + OK + OK
    assert event.envelope.auth_user == "alice"


# ------------------------------------------------------------------------ SIZE


@pytest.mark.parametrize("mode", MODES)
def test_size_advertises_the_configured_limit(mode):
    res = run(EHLO, mode, make_conn(Limits(max_message_size=31337)))
    assert "SIZE 31337" in ehlo_keywords(res)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (b"SIZE=1000", SENDER_OK),
        (b"size=1000", SENDER_OK),
        (b"SIZE=0", SENDER_OK),
        (b"SIZE=1001", SIZE_TOO_BIG),
        (b"SIZE=99999999999999999999", SIZE_TOO_BIG),
        (b"SIZE=999999999999999999999", BAD_VALUE),  # 21 digits
        (b"SIZE", BAD_VALUE),
        (b"SIZE=", b"501 "),  # no value after "=" is a syntax error
        (b"SIZE=-1", BAD_VALUE),
        (b"SIZE=1e3", BAD_VALUE),
        ("SIZE=\uff11\uff12".encode(), BAD_VALUE),  # fullwidth digits are not digits here
    ],
)
def test_declared_size_is_checked_at_mail(mode, param, expected):
    conn = make_conn(Limits(max_message_size=1000))
    res = run([EHLO, b"MAIL FROM:<s@example.org> " + param + b"\r\n", RCPT], mode, conn)
    replies = tail(res, 2)
    assert replies[0].startswith(expected)
    if expected == SENDER_OK:
        assert replies[1] == RCPT_OK
    else:
        assert replies[1] == NEED_MAIL and res.conn.state is State.GREETED
    if expected == SIZE_TOO_BIG:
        (rejected,) = res.of(TransactionRejected)
        assert rejected.stage == "MAIL" and rejected.reply is R.SIZE_DECLARED_TOO_BIG
        assert rejected.address == "s@example.org"


@pytest.mark.parametrize("mode", MODES)
def test_size_parameter_is_refused_when_size_is_off(mode):
    conn = make_conn(extensions=Extensions(size=False))
    res = run([EHLO, b"MAIL FROM:<s@example.org> SIZE=10\r\n"], mode, conn)
    assert "SIZE" not in " ".join(ehlo_keywords(res))
    assert tail(res, 1) == [BAD_PARAMETER]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_bdat", [False, True])
def test_real_size_is_enforced_whatever_was_declared(mode, use_bdat):
    conn = make_conn(Limits(max_message_size=100))
    body = b"x" * 98 + b"\r\n" + b"y\r\n"  # 103 octets
    mail = b"MAIL FROM:<s@example.org> SIZE=10\r\n"
    if use_bdat:
        script = [EHLO, mail, RCPT, chunk(body, last=True), b"NOOP\r\n"]
    else:
        script = [EHLO, mail, RCPT, DATA, body + b".\r\n", b"NOOP\r\n"]
    res = run(script, mode, conn)
    assert tail(res, 2) == [TOO_BIG, OK]
    assert not res.of(MessageEnd)
    (rejected,) = res.of(TransactionRejected)
    assert rejected.stage == ("BDAT" if use_bdat else "DATA")
    assert rejected.size == 103


@pytest.mark.parametrize("mode", MODES)
def test_size_off_still_enforces_the_limit(mode):
    conn = make_conn(Limits(max_message_size=10), Extensions(size=False))
    res = run([*TXN, b"0123456789\r\n.\r\n"], mode, conn)
    assert tail(res, 1) == [TOO_BIG]


# -------------------------------------------------------------------- 8BITMIME

EIGHT_BIT = bytes(range(0x80, 0x100)) + b"\r\n" + "Grüße, 世界\r\n".encode()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("body", [b"7BIT", b"8BITMIME", b"8bitmime", b"7bit"])
def test_body_parameter_accepted(mode, body):
    mail = b"MAIL FROM:<s@example.org> BODY=" + body + b"\r\n"
    res = run([EHLO, mail, RCPT, DATA, EIGHT_BIT + b".\r\n"], mode)
    assert tail(res, 4) == [SENDER_OK, RCPT_OK, GO_AHEAD, QUEUED]
    assert res.of(MessageEnd)[0].envelope.mail_params == {"BODY": body.decode()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (b"BODY=BINARYMIME", BAD_VALUE),  # not offered (RFC 3030 §3)
        (b"BODY=8BIT", BAD_VALUE),
        (b"BODY", BAD_VALUE),
    ],
)
def test_body_parameter_refused(mode, param, expected):
    res = run([EHLO, b"MAIL FROM:<s@example.org> " + param + b"\r\n"], mode)
    assert tail(res, 1) == [expected]
    assert res.conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
def test_body_parameter_needs_8bitmime(mode):
    conn = make_conn(extensions=Extensions(eightbitmime=False))
    res = run([EHLO, b"MAIL FROM:<s@example.org> BODY=8BITMIME\r\n"], mode, conn)
    assert "8BITMIME" not in ehlo_keywords(res)
    assert tail(res, 1) == [BAD_PARAMETER]
    res = run([b"HELO c\r\n", b"MAIL FROM:<s@example.org> BODY=8BITMIME\r\n"], mode)
    assert tail(res, 1) == [BAD_PARAMETER]  # no EHLO, no extensions


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_bdat", [False, True])
def test_8bit_octets_are_stored_exactly(mode, use_bdat):
    mail = b"MAIL FROM:<s@example.org> BODY=8BITMIME\r\n"
    content = EIGHT_BIT + b"\x00\x7f\xff\xfe\r\n"
    if use_bdat:
        script = [EHLO, mail, RCPT, chunk(content[:100]), chunk(content[100:], last=True)]
    else:
        script = [EHLO, mail, RCPT, DATA, content + b".\r\n"]
    res = run(script, mode)
    assert res.messages == [content.replace(b"\r\n", b"\n")]
    assert res.of(MessageEnd)[0].size == len(content)


# -------------------------------------------------------------------- SMTPUTF8

UTF8_SENDER = "MAIL FROM:<jösé@exämple.org> SMTPUTF8\r\n".encode()


@pytest.mark.parametrize("mode", MODES)
def test_utf8_sender_with_smtputf8(mode):
    res = run([EHLO, UTF8_SENDER, "RCPT TO:<Ünïcödé@example.test>\r\n".encode()], mode)
    assert tail(res, 2) == [SENDER_OK, RCPT_OK]
    env = res.conn.envelope
    assert env.smtputf8 and env.sender_address == "jösé@exämple.org"
    (recipient,) = env.recipients
    assert recipient.box == "ünïcödé"  # case-folded
    assert recipient.mailbox.local_part == "Ünïcödé"  # as the client wrote it


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "mail",
    [
        "MAIL FROM:<jösé@example.org>\r\n",
        "MAIL FROM:<jose@exämple.org>\r\n",
        "MAIL FROM:<jösé@example.org> BODY=8BITMIME\r\n",
    ],
)
def test_utf8_sender_without_smtputf8_is_553(mode, mail):
    res = run([EHLO, mail.encode(), b"NOOP\r\n"], mode)
    assert tail(res, 2) == [NEEDS_UTF8, OK]
    assert res.conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rcpt", ["<jösé@example.test>", "<alice@exämple.test>"])
def test_utf8_recipient_without_smtputf8_is_553(mode, rcpt):
    res = run([EHLO, MAIL, f"RCPT TO:{rcpt}\r\n".encode(), RCPT], mode)
    assert tail(res, 3) == [SENDER_OK, NEEDS_UTF8, RCPT_OK]
    assert [r.box for r in res.conn.envelope.recipients] == ["alice"]


@pytest.mark.parametrize("mode", MODES)
def test_utf8_address_when_smtputf8_is_off(mode):
    conn = make_conn(extensions=Extensions(smtputf8=False))
    res = run([EHLO, UTF8_SENDER, b"MAIL FROM:<a@example.org> SMTPUTF8\r\n"], mode, conn)
    assert "SMTPUTF8" not in ehlo_keywords(res)
    assert tail(res, 2) == [NEEDS_UTF8, BAD_PARAMETER]


@pytest.mark.parametrize("mode", MODES)
def test_utf8_address_after_helo_is_553(mode):
    res = run([b"HELO c\r\n", UTF8_SENDER], mode)
    assert tail(res, 1) == [NEEDS_UTF8]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [b"SMTPUTF8=yes", b"SMTPUTF8="])
def test_smtputf8_takes_no_value(mode, value):
    res = run([EHLO, b"MAIL FROM:<a@example.org> " + value + b"\r\n"], mode)
    assert tail(res, 1)[0][:3] in (b"501", b"555")
    assert res.conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("local", "box"),
    [
        ("\uff2aösé", "jösé"),  # fullwidth: NFKC
        ("jose\u0301", "josé"),  # combining accent: composed
        ("STRASSE", "strasse"),
        ("straße", "strasse"),  # case-folded
        ("ﬁle", "file"),  # ligature
        ("ünï.cödé+tag", "ünï.cödé+tag"),
    ],
)
def test_utf8_mailbox_names_are_normalised(mode, local, box):
    res = run([EHLO, UTF8_SENDER, f"RCPT TO:<{local}@example.test>\r\n".encode()], mode)
    assert tail(res, 1) == [RCPT_OK]
    assert [r.box for r in res.conn.envelope.recipients] == [box]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "local",
    [
        "a\u202eb",  # right-to-left override
        "a\u200bb",  # zero-width space
        "a\u00a0b",  # no-break space
        "a\uff0fb",  # fullwidth solidus becomes "/"
        "\uff0e\uff0e",  # fullwidth full stops become ".."
        "a\uff0e\uff0eb",
        "\uff0ehidden",
        "\u0301x",  # a lone combining mark first
        "ᅟ",  # Hangul filler
        "x" * 30 + "é" * 20,  # 70 octets: over the 64-octet limit for a name
        '"a/b"',
        '"."',
        '"a\\"b"',
    ],
)
def test_unsafe_mailbox_names_are_550_5_1_3(mode, local):
    res = run([EHLO, UTF8_SENDER, f"RCPT TO:<{local}@example.test>\r\n".encode(), RCPT], mode)
    refused = tail(res, 2)[0]
    assert refused == BAD_NAME or refused.startswith(b"501 5.1.3 ")  # syntax or name
    assert tail(res, 1) == [RCPT_OK]
    assert [r.box for r in res.conn.envelope.recipients] == ["alice"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("configured", ["exämple.test", "xn--exmple-cua.test", "EXÄMPLE.TEST"])
@pytest.mark.parametrize(
    "domain", ["exämple.test", "EXÄMPLE.TEST", "xn--exmple-cua.test", "XN--EXMPLE-CUA.test"]
)
def test_idn_local_domain_in_either_form(mode, configured, domain):
    conn = make_conn(domains=[configured])
    res = run([EHLO, UTF8_SENDER, f"RCPT TO:<alice@{domain}>\r\n".encode()], mode, conn)
    assert tail(res, 1) == [RCPT_OK]
    assert [r.box for r in res.conn.envelope.recipients] == ["alice"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "domain",
    [
        "".join(chr(ord(c) + 0xFEE0) for c in "example") + ".test",  # fullwidth
        "exa\u00admple.test",  # soft hyphen
        "exa\u200bmple.test",  # zero-width space
        "example\u3002test",  # ideographic full stop
    ],
)
def test_domains_idna_maps_onto_a_local_one_are_local(mode, domain):
    # IDNA (nameprep) maps these onto example.test: delivered here, not relayed.
    rcpt = f"RCPT TO:<alice@{domain}>\r\n".encode()
    res = run([EHLO, UTF8_SENDER, rcpt], mode, make_conn(domains=["example.test"]))
    assert tail(res, 1) == [RCPT_OK]
    assert [r.box for r in res.conn.envelope.recipients] == ["alice"]


# --------------------------------------------------------- ENHANCEDSTATUSCODES


def _enhanced_scripts() -> list[tuple[SMTPConnection, list]]:
    limits = Limits(max_message_size=50)
    bad_utf8 = "MAIL FROM:<jösé@example.org>\r\n".encode()
    return [
        (
            make_conn(limits, security=TLS),
            [
                EHLO,
                auth_plain(),  # 538: not before TLS
                b"STARTTLS now\r\n",  # 501
                STARTTLS,  # 220 2.0.0
                HANDSHAKE,
                STARTTLS,  # 503
                b"AUTH PLAIN x\r\n",  # 503: EHLO first
                EHLO,
                auth_plain("alice", "wrong"),  # 535
                b"AUTH CRAM-MD5\r\n",  # 504
                b"AUTH PLAIN !!!\r\n",  # 501 5.5.2
                b"AUTH LOGIN\r\n",  # 334
                b"*\r\n",  # 501 5.7.0
                b"AUTH PLAIN\r\n",  # 334
                b"x" * 13000 + b"\r\n",  # 500 5.5.6
                auth_plain(),  # 235
                auth_plain(),  # 503 already
                MAIL,
                b"RCPT TO:<x@elsewhere.test>\r\n",  # 451 4.3.2
                b"RCPT TO:<a%b@example.test>\r\n",  # 550 5.1.3
                RCPT,
                chunk(b"hello"),  # 250 octets
                DATA,  # 503
                chunk(b"", last=True),  # 250 queued
                MAIL,
                RCPT,
                chunk(b"x" * 60, last=True),  # 552
                bad_utf8,  # 553 5.6.7
                b"MAIL FROM:<a@example.org> SIZE=51\r\n",  # 552
                b"BDAT 3 LAST\r\nabc",  # 503
                b"BDAT x\r\n",  # 501
                b"HELP\r\n",  # 214
                b"QUIT\r\n",  # 221
            ],
        ),
        (
            make_conn(security=Security(auth_required=True)),
            [EHLO, STARTTLS, MAIL, b"RCPT TO:<x@elsewhere.test>\r\n"],  # 454, 530, 503
        ),
        (
            make_conn(security=dataclasses.replace(PLAIN_AUTH, sender_must_match=True)),
            [EHLO, auth_plain(), b"MAIL FROM:<bob@example.test>\r\n"],  # 553 5.7.1
        ),
        (make_conn(), [EHLO, MAIL, b"RCPT TO:<x@elsewhere.test>\r\n"]),  # 550 5.7.1
        (make_conn(security=Security(trusted=True)), [EHLO, MAIL, b"RCPT TO:<x@a.test>\r\n"]),
    ]


def test_every_new_reply_carries_an_enhanced_code():
    checked = set()
    for conn, script in _enhanced_scripts():
        res = run(script, "whole", conn)
        for reply in res.reply_lines:
            first = reply[0]
            if first[:4] in (b"250-", b"250 ") and first[4:].startswith(HOST.encode()):
                # RFC 2034 §3: not on the replies to EHLO and HELO
                assert not any(ENHANCED_RE.match(line) for line in reply)
                continue
            if first[:1] == b"3":
                assert not any(ENHANCED_RE.match(line) for line in reply), first
                checked.add(first[:3])
                continue
            assert ENHANCED_RE.match(first), first
            checked.add(first[:3] + b" " + first[4:].split(b" ", 1)[0])
    assert checked >= {
        b"220 2.0.0",  # STARTTLS
        b"235 2.7.0",
        b"535 5.7.8",
        b"538 5.7.11",
        b"530 5.7.0",
        b"454 4.7.0",
        b"501 5.7.0",
        b"501 5.5.2",
        b"500 5.5.6",
        b"503 5.5.1",
        b"504 5.5.4",
        b"451 4.3.2",
        b"550 5.7.1",
        b"550 5.1.3",
        b"553 5.6.7",
        b"553 5.7.1",
        b"552 5.3.4",
        b"250 2.0.0",
        b"214 2.0.0",
        b"221 2.0.0",
        b"334",
    }


@pytest.mark.parametrize("mode", MODES)
def test_no_enhanced_codes_on_new_replies_when_disabled(mode):
    conn = make_conn(extensions=Extensions(enhancedstatuscodes=False), security=TLS)
    script = [
        EHLO,
        auth_plain(),
        STARTTLS,
        HANDSHAKE,
        EHLO,
        auth_plain("alice", "no"),
        auth_plain(),
        MAIL,
        b"RCPT TO:<x@elsewhere.test>\r\n",
    ]
    res = run(script, mode, conn)
    assert "ENHANCEDSTATUSCODES" not in ehlo_keywords(res)
    assert b"220 Ready to start TLS\r\n" in res.replies
    assert tail(res, 4) == [
        b"535 Authentication credentials invalid\r\n",
        b"235 Authentication successful\r\n",
        b"250 Ok\r\n",
        b"451 Relaying is not available yet; try again later\r\n",
    ]
    assert not any(ENHANCED_RE.match(line) for line in res.lines)


# -------------------------------------------------------------------- CHUNKING

BDAT_TXN = [EHLO, MAIL, RCPT]


@pytest.mark.parametrize("mode", MODES)
def test_bdat_single_last_chunk(mode):
    message = b"Subject: hi\r\nMessage-ID: <b1@example.org>\r\n\r\nbody\r\n"
    res = run([*BDAT_TXN, chunk(message, last=True), b"NOOP\r\n"], mode)
    assert tail(res, 2) == [QUEUED, OK]
    assert [type(e) for e in res.events] == [MessageStart, MessageData, MessageEnd]
    assert res.messages == [message.replace(b"\r\n", b"\n")]
    assert res.of(MessageEnd)[0].size == len(message)
    assert res.message_ids == ["<b1@example.org>"]
    assert res.conn.state is State.GREETED and res.conn.envelope is None


@pytest.mark.parametrize("mode", MODES)
def test_bdat_several_chunks_count_octets(mode):
    res = run([*BDAT_TXN, chunk(b"one\r\n"), chunk(b"two\r\n"), chunk(b"3", last=True)], mode)
    assert tail(res, 3) == [octets(5), octets(10), QUEUED]
    assert res.messages == [b"one\ntwo\n3"]
    assert res.of(MessageEnd)[0].size == 11


@pytest.mark.parametrize("mode", MODES)
def test_bdat_reads_exactly_n_octets(mode):
    res = run([*BDAT_TXN, b"BDAT 5\r\nhelloNOOP\r\n", b"BDAT 0 LAST\r\n"], mode)
    assert tail(res, 3) == [octets(5), OK, QUEUED]
    assert res.messages == [b"hello"]


@pytest.mark.parametrize("mode", MODES)
def test_bdat_has_no_dot_stuffing(mode):
    data = b"a\r\n.\r\n..b\r\n.\r\n"
    res = run([*BDAT_TXN, chunk(data, last=True)], mode)
    assert res.messages == [b"a\n.\n..b\n.\n"]
    assert res.of(MessageEnd)[0].size == len(data)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([b"a\r", b"\nb\r\n"], b"a\nb\n"),  # CRLF split over two chunks
        ([b"a\r", b"", b"\nb"], b"a\nb"),  # ... with an empty chunk between
        ([b"a\r", b"b"], b"a\rb"),  # a bare CR stays
        # A CR before the line end is kept: read back (CRLF stays) it is what was sent.
        ([b"a\r", b"\r\n"], b"a\r\r\n"),
        ([b"a\r\r", b"\n"], b"a\r\r\n"),
        ([b"a\r\r", b"\r\nb\r\n"], b"a\r\r\r\nb\n"),
        ([b"a\r", b"\r", b"\nb"], b"a\r\r\nb"),
        ([b"a", b"\r"], b"a\r"),  # the last octet is a CR
        ([b"\r", b"\r", b"\r"], b"\r\r\r"),
        ([b"a\n\n", b"\rb"], b"a\n\n\rb"),  # bare LF stays as it is
    ],
)
def test_bdat_crlf_across_chunk_boundaries(mode, chunks, message):
    steps = [chunk(c) for c in chunks[:-1]] + [chunk(chunks[-1], last=True)]
    res = run([*BDAT_TXN, *steps], mode)
    assert res.messages == [message]
    assert res.of(MessageEnd)[0].size == sum(map(len, chunks))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "content",
    [b"QUIT\r\n", b"RSET\r\n", b"MAIL FROM:<x@y.org>\r\n", b"BDAT 3 LAST\r\nabc", b"DATA\r\n"],
)
def test_bdat_chunk_bytes_are_never_commands(mode, content):
    res = run([*BDAT_TXN, chunk(content), chunk(content, last=True), b"NOOP\r\n"], mode)
    assert tail(res, 3) == [octets(len(content)), QUEUED, OK]
    assert res.messages == [(content * 2).replace(b"\r\n", b"\n")]
    assert not res.of(CloseConnection) and not res.of(TransactionAborted)


@pytest.mark.parametrize("mode", MODES)
def test_bdat_0_last(mode):
    res = run([*BDAT_TXN, b"BDAT 0 LAST\r\n"], mode)
    assert tail(res, 1) == [QUEUED]
    assert res.messages == [b""]
    res = run([*BDAT_TXN, b"BDAT 0\r\n", chunk(b"x", last=True)], mode)
    assert tail(res, 2) == [octets(0), QUEUED]
    assert res.messages == [b"x"]


@pytest.mark.parametrize("mode", MODES)
def test_bdat_oversize_discards_the_pipelined_chunks_after_it(mode):
    conn = make_conn(Limits(max_message_size=50))
    script = [
        *BDAT_TXN,
        chunk(b"a" * 30),
        chunk(b"b" * 30),  # 60 > 50: the transaction fails here
        chunk(b"QUIT\r\nc" * 3),  # read and refused
        chunk(b"RSET\r\n", last=True),  # read and refused
        MAIL,
        RCPT,
        chunk(b"ok", last=True),
    ]
    res = run(script, mode, conn)
    assert tail(res, 7) == [
        octets(30),
        TOO_BIG,
        NEED_MAIL,
        NEED_MAIL,
        SENDER_OK,
        RCPT_OK,
        QUEUED,
    ]
    (rejected,) = res.of(TransactionRejected)
    assert rejected.stage == "BDAT" and rejected.reply is R.MESSAGE_TOO_BIG
    assert rejected.size == 60
    assert res.messages == [b"ok"]
    assert len(res.of(MessageEnd)) == 1 and res.conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
def test_bdat_oversize_in_one_chunk_keeps_at_most_the_limit(mode):
    conn = make_conn(Limits(max_message_size=10))
    res = run([*BDAT_TXN, chunk(b"z" * 1000, last=True), b"NOOP\r\n"], mode, conn)
    assert tail(res, 2) == [TOO_BIG, OK]
    kept = sum(len(e.data) for e in res.of(MessageData))
    assert kept <= 10  # at most up to the limit reaches the spool
    assert not res.of(MessageEnd)


@pytest.mark.parametrize("mode", MODES)
def test_bdat_of_exactly_the_maximum_size_is_accepted(mode):
    conn = make_conn(Limits(max_message_size=10))
    res = run([*BDAT_TXN, chunk(b"0123"), chunk(b"456789", last=True)], mode, conn)
    assert tail(res, 1) == [QUEUED] and res.messages == [b"0123456789"]


LINE_TOO_LONG = b"500 5.5.2 Error: message has a line longer than the limit\r\n"


@pytest.mark.parametrize("mode", MODES)
def test_bdat_enforces_the_text_line_limit(mode):
    """RFC 5321 §4.5.3.1.6 applies to BDAT too (no BINARYMIME is offered)."""
    res = run([*BDAT_TXN, chunk(b"x" * 1_000_000 + b"\r\n", last=True), b"NOOP\r\n"], mode)
    assert tail(res, 2) == [LINE_TOO_LONG, OK]
    (rejected,) = res.of(TransactionRejected)
    assert rejected.stage == "BDAT" and rejected.reply is R.TEXT_LINE_TOO_LONG
    assert not res.of(MessageEnd)
    assert sum(len(e.data) for e in res.of(MessageData)) <= 1000  # nothing kept beyond a line
    assert res.conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("chunks", "ok"),
    [
        ([b"a" * 998 + b"\r\n"], True),  # exactly 1000 octets with the CRLF
        ([b"a" * 999 + b"\r\n"], False),
        ([b"a" * 500, b"a" * 498 + b"\r\nb"], True),  # a line straddling two chunks
        ([b"a" * 500, b"a" * 499 + b"\r\n"], False),
        ([b"a" * 600, b"b" * 600], False),  # an unfinished last line counts too
        ([b"a\n" + b"b" * 999 + b"\n"], True),  # a bare LF ends a line, as in DATA
        ([b"a\n" + b"b" * 1000 + b"\n"], False),
    ],
)
def test_bdat_text_line_limit_across_chunks(mode, chunks, ok):
    steps = [chunk(c) for c in chunks[:-1]] + [chunk(chunks[-1], last=True)]
    res = run([*BDAT_TXN, *steps], mode)
    assert tail(res, 1) == [QUEUED if ok else LINE_TOO_LONG]
    assert len(res.of(MessageEnd)) == (1 if ok else 0)


@pytest.mark.parametrize("mode", MODES)
def test_bdat_long_line_refuses_the_chunks_pipelined_after_it(mode):
    script = [*BDAT_TXN, chunk(b"y" * 2000), chunk(b"ok\r\n", last=True), MAIL, RCPT]
    res = run([*script, chunk(b"fine\r\n", last=True)], mode)
    assert tail(res, 5) == [LINE_TOO_LONG, NEED_MAIL, SENDER_OK, RCPT_OK, QUEUED]
    assert res.messages == [b"fine\n"]


@pytest.mark.parametrize("mode", MODES)
def test_data_after_bdat_is_503_and_bdat_goes_on(mode):
    res = run([*BDAT_TXN, chunk(b"abc"), DATA, b"BDAT 0 LAST\r\n"], mode)
    assert tail(res, 3) == [
        octets(3),
        b"503 5.5.1 Error: DATA is not allowed after BDAT\r\n",
        QUEUED,
    ]
    assert res.messages == [b"abc"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (MAIL, b"503 5.5.1 Error: nested MAIL command\r\n"),
        (RCPT, b"503 5.5.1 Error: BDAT transaction in progress\r\n"),
        (b"NOOP\r\n", OK),
        (b"VRFY bob\r\n", b"252 2.0.0 Cannot VRFY user, but will accept message and attempt "),
    ],
)
def test_commands_between_chunks(mode, cmd, expected):
    res = run([*BDAT_TXN, chunk(b"abc"), cmd, chunk(b"d", last=True)], mode)
    assert tail(res, 2)[0].startswith(expected)
    assert tail(res, 1) == [QUEUED] and res.messages == [b"abcd"]


@pytest.mark.parametrize("mode", MODES)
def test_starttls_and_auth_between_chunks_are_503(mode):
    security = Security(tls_available=True, auth_available=True, auth_plaintext=True)
    res = run(
        [*BDAT_TXN, chunk(b"abc"), STARTTLS, auth_plain(), chunk(b"d", last=True)],
        mode,
        make_conn(security=security),
    )
    assert tail(res, 3) == [IN_TRANSACTION, IN_TRANSACTION, QUEUED]
    assert not res.of(StartTLS) and not res.of(AuthRequest)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("setup", "expected"),
    [([], NEED_MAIL), ([EHLO], NEED_MAIL), ([EHLO, MAIL], NEED_RCPT)],
)
def test_bdat_out_of_sequence_consumes_its_chunk(mode, setup, expected):
    res = run([*setup, chunk(b"QUIT\r\n", last=True), b"NOOP\r\n"], mode)
    assert tail(res, 2) == [expected, OK]
    assert not res.of(CloseConnection) and not res.of(MessageStart)


@pytest.mark.parametrize("mode", MODES)
def test_bdat_after_a_refused_recipient_consumes_its_chunk(mode):
    script = [EHLO, MAIL, b"RCPT TO:<x@elsewhere.test>\r\n", chunk(b"RSET\r\n"), RCPT]
    res = run(script, mode)
    assert tail(res, 3) == [RELAY_DENIED, NEED_RCPT, RCPT_OK]
    assert res.conn.state is State.RCPT  # RSET in the chunk was not run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("reset", "reply"),
    [(b"RSET\r\n", OK), (EHLO, None), (b"HELO c.example.org\r\n", b"250 mx.example.test\r\n")],
)
def test_rset_or_greeting_between_chunks_aborts(mode, reset, reply):
    res = run([*BDAT_TXN, chunk(b"abc"), reset, MAIL, RCPT, chunk(b"z", last=True)], mode)
    kinds = [type(e) for e in res.events]
    assert kinds == [
        MessageStart,
        MessageData,
        TransactionAborted,
        MessageStart,
        MessageData,
        MessageEnd,
    ]
    aborted = res.of(TransactionAborted)[0]
    assert aborted.size == 3
    assert res.messages == [b"z"]
    if reply is not None:
        assert tail(res, 4)[0] == reply
    assert tail(res, 3) == [SENDER_OK, RCPT_OK, QUEUED]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "line",
    [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 NOTLAST\r\n", b"BDAT 5 LAST x\r\n", b"BDAT -1\r\n",
     b"BDAT +1\r\n", b"BDAT 1234567890123456789\r\n", "BDAT \uff15\r\n".encode()],
)  # fmt: skip
def test_bdat_syntax_errors(mode, line):
    res = run([*BDAT_TXN, line, b"NOOP\r\n"], mode)
    assert tail(res, 2) == [b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n", OK]
    assert res.conn.state is State.RCPT and not res.of(MessageStart)


@pytest.mark.parametrize("mode", MODES)
def test_bdat_last_is_case_insensitive(mode):
    res = run([*BDAT_TXN, b"bdat 2 last\r\nhi"], mode)
    assert tail(res, 1) == [QUEUED] and res.messages == [b"hi"]


@pytest.mark.parametrize("mode", MODES)
def test_bdat_when_chunking_is_off(mode):
    conn = make_conn(extensions=Extensions(chunking=False))
    res = run([*BDAT_TXN, b"BDAT 0 LAST\r\n"], mode, conn)
    assert "CHUNKING" not in ehlo_keywords(res)
    assert tail(res, 1) == [b"500 5.5.2 Error: command not recognized\r\n"]


def test_in_data_while_a_chunk_is_read():
    conn = make_conn()
    run(BDAT_TXN, "whole", conn)
    conn.receive_data(b"BDAT 10\r\n12345")
    drain(conn, [])
    assert conn.in_data and conn.state is State.BDAT
    conn.receive_data(b"67890")
    drain(conn, [])
    assert not conn.in_data
    assert conn.data_to_send().endswith(octets(10))


def test_bdat_chunk_memory_is_bounded():
    conn = make_conn(Limits(max_message_size=100))
    run(BDAT_TXN, "whole", conn)
    conn.receive_data(b"BDAT 1000000000\r\n")
    drain(conn, [])
    for _ in range(50):
        conn.receive_data(b"x" * 10000)
        drain(conn, [])
        assert len(conn._buf) == 0  # nothing piles up: read and dropped
    assert conn.in_data


@pytest.mark.parametrize("mode", MODES)
def test_message_id_sniffed_across_chunks(mode):
    steps = [chunk(b"Subject: s\r\nMessage-"), chunk(b"ID: <c@d>\r"), chunk(b"\n\r\nx", True)]
    res = run([*BDAT_TXN, *steps], mode)
    assert len(res.of(MessageEnd)) == 1 and res.message_ids == ["<c@d>"]


@pytest.mark.parametrize("mode", MODES)
def test_message_id_of_a_refused_bdat_message(mode):
    conn = make_conn(Limits(max_message_size=40))
    message = b"Message-ID: <big@d>\r\nSubject: s\r\n\r\n" + b"z" * 100
    res = run([*BDAT_TXN, chunk(message, last=True)], mode, conn)
    assert len(res.of(TransactionRejected)) == 1
    assert res.message_ids == ["<big@d>"]  # for the log, however it was cut


# ------------------------------------------------------------------------ HELP


@pytest.mark.parametrize(
    ("conn", "script", "present", "absent"),
    [
        (make_conn(), [], ["BDAT", "CHUNKING", "PIPELINING"], ["STARTTLS", "AUTH"]),
        (make_conn(security=TLS), [EHLO], ["STARTTLS", "BDAT"], ["AUTH"]),
        (make_conn(security=TLS), [EHLO, STARTTLS, HANDSHAKE], ["AUTH"], ["STARTTLS"]),
        (make_conn(security=PLAIN_AUTH), [], ["AUTH", "BDAT"], ["STARTTLS"]),
        (
            make_conn(extensions=Extensions(chunking=False, pipelining=False)),
            [],
            ["8BITMIME", "SMTPUTF8"],
            ["BDAT", "CHUNKING", "PIPELINING"],
        ),
    ],
)
def test_help_lists_what_is_supported(conn, script, present, absent):
    res = run([*script, b"HELP\r\n"], "whole", conn)
    (help_,) = [r for r in res.reply_lines if r[0][:3] == b"214"]
    words = b" ".join(help_).replace(b"214-", b" ").replace(b"214 ", b" ").split()
    for word in present:
        assert word.encode() in words, word
    for word in absent:
        assert word.encode() not in words, word


# -------------------------------------------------------------------- STARTTLS


@pytest.mark.parametrize("mode", MODES)
def test_starttls_resets_the_session(mode):
    conn = make_conn(security=TLS)
    res = run([EHLO, STARTTLS, HANDSHAKE, MAIL, RCPT, EHLO, MAIL, RCPT], mode, conn)
    assert READY in res.replies
    assert res.of(StartTLS) == [StartTLS()]
    assert tail(res, 5)[:2] == [NEED_EHLO, NEED_MAIL]  # no EHLO, no transaction after TLS
    assert tail(res, 2) == [SENDER_OK, RCPT_OK]
    assert conn.tls and conn.envelope.tls and conn.helo == "client.example.org"


def test_starttls_waits_for_the_handshake():
    conn = make_conn(security=TLS)
    conn.receive_data(EHLO + STARTTLS + b"MAIL FROM:<evil@example.org>\r\n")
    drain(conn, events := [])
    assert events == [StartTLS()]
    assert len(conn._buf) == 0  # the plaintext behind STARTTLS is not even kept
    assert conn.data_to_send().endswith(READY)
    assert conn.next_event() is PAUSED and not conn.tls
    conn.tls_started()
    assert conn.tls and conn.state is State.CONNECTED and conn.helo is None and not conn.esmtp
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "injected",
    [
        EHLO + b"MAIL FROM:<evil@example.org>\r\n",
        b"QUIT\r\n",
        b"RSET\r\n" + EHLO,
        EHLO + auth_plain(),
        b"EHLO x\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n",
        b"EHLO x\r\nMAI",  # an unfinished line is not joined to what comes after TLS
        b"NOOP\r\n" * 1000,
    ],
    ids=["mail", "quit", "rset", "auth", "transaction", "unfinished", "many"],
)
def test_plaintext_behind_starttls_is_discarded(mode, injected):
    """CVE-2011-0411, CVE-2024-34083: what came with STARTTLS never runs after TLS."""
    conn = make_conn(security=TLS)
    script = [EHLO, STARTTLS + injected, HANDSHAKE, b"L FROM:<x@y.org>\r\n", RCPT, EHLO]
    res = run(script, mode, conn)
    # In the clear: the EHLO reply and 220, nothing for the injected commands.
    clear, ready, after = res.replies.partition(READY)
    assert ready and clear == run(EHLO, "whole", make_conn(security=TLS)).replies
    assert after.startswith(
        b"500 5.5.2 Error: command not recognized\r\n"  # "L FROM", not "MAIL FROM"
        + NEED_MAIL  # no transaction, no greeting survived
        + b"250-mx.example.test\r\n"
    )
    assert res.codes.count(250) == 2  # the two EHLOs, nothing injected
    assert not res.of(AuthRequest) and not res.of(CloseConnection) and not res.of(MessageStart)
    assert conn.auth_user is None and conn.state is State.GREETED and conn.tls
    assert conn.helo == "client.example.org"


def test_input_arriving_before_the_handshake_completes_is_discarded():
    conn = make_conn(security=TLS)
    conn.receive_data(EHLO + STARTTLS)
    drain(conn, events := [])
    conn.receive_data(b"MAIL FROM:<evil@example.org>\r\n")  # a shell reading on regardless
    assert conn.next_event() is PAUSED
    conn.tls_started()
    conn.receive_data(RCPT)
    drain(conn, events)
    assert conn.data_to_send().endswith(READY + NEED_MAIL)
    assert events == [StartTLS()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("security", "setup", "line", "expected"),
    [
        (Security(), [EHLO], STARTTLS, TLS_UNAVAILABLE),
        (TLS, [EHLO], b"STARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS\r\n"),
        (IMPLICIT_TLS, [EHLO], STARTTLS, TLS_ACTIVE),
        (TLS, [EHLO, STARTTLS, HANDSHAKE, EHLO], STARTTLS, TLS_ACTIVE),
        (TLS, [EHLO, MAIL], STARTTLS, IN_TRANSACTION),
        (TLS, [EHLO, MAIL, RCPT], STARTTLS, IN_TRANSACTION),
    ],
)  # fmt: skip
def test_starttls_refusals(mode, security, setup, line, expected):
    before = run(setup, "whole", make_conn(security=security)).conn
    conn = make_conn(security=security)
    res = run([*setup, line, b"NOOP\r\n"], mode, conn)
    assert tail(res, 2) == [expected, OK]
    assert len(res.of(StartTLS)) == setup.count(HANDSHAKE)  # no new handshake
    assert (conn.state, conn.tls, conn.helo) == (before.state, before.tls, before.helo)
    assert (conn.envelope is None) == (before.envelope is None)


@pytest.mark.parametrize("mode", MODES)
def test_starttls_switched_off(mode):
    conn = make_conn(extensions=Extensions(starttls=False), security=TLS)
    res = run([EHLO, STARTTLS], mode, conn)
    assert "STARTTLS" not in ehlo_keywords(res)
    assert tail(res, 1) == [b"500 5.5.2 Error: command not recognized\r\n"]


@pytest.mark.parametrize("mode", MODES)
def test_starttls_before_ehlo(mode):
    conn = make_conn(security=TLS)
    res = run([STARTTLS, HANDSHAKE, EHLO], mode, conn)
    assert res.replies.startswith(READY) and conn.tls


@pytest.mark.parametrize("mode", MODES)
def test_starttls_forgets_a_plaintext_login(mode):
    """RFC 3207 §4.2: knowledge not from the TLS negotiation is discarded."""
    security = Security(tls_available=True, auth_available=True, auth_plaintext=True)
    conn = make_conn(security=security)
    res = run([EHLO, auth_plain(), STARTTLS, HANDSHAKE, EHLO, MAIL], mode, conn)
    assert AUTH_OK in res.replies
    assert conn.auth_user is None and conn.envelope.auth_user is None
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(res)


# ------------------------------------------------------------------------ AUTH


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("security", [PLAIN_AUTH, IMPLICIT_TLS])
def test_auth_plain_with_initial_response(mode, security):
    conn = make_conn(security=security)
    res = run([EHLO, auth_plain(), MAIL], mode, conn)
    assert tail(res, 2) == [AUTH_OK, SENDER_OK]
    (request,) = res.of(AuthRequest)
    assert request.credentials == sasl.Credentials("PLAIN", "alice", "secret")
    assert conn.auth_user == "alice" and conn.envelope.auth_user == "alice"


@pytest.mark.parametrize("mode", MODES)
def test_auth_after_starttls(mode):
    conn = make_conn(security=TLS)
    res = run([EHLO, STARTTLS, HANDSHAKE, EHLO, auth_plain("bob", "hunter2")], mode, conn)
    assert tail(res, 1) == [AUTH_OK] and conn.auth_user == "bob"


@pytest.mark.parametrize("mode", MODES)
def test_auth_plain_without_initial_response(mode):
    res = run(
        [EHLO, b"AUTH PLAIN\r\n", b64("\0alice\0secret") + b"\r\n"],
        mode,
        make_conn(security=PLAIN_AUTH),
    )
    assert tail(res, 2) == [b"334 \r\n", AUTH_OK]


@pytest.mark.parametrize("mode", MODES)
def test_auth_login(mode):
    res = run(
        [EHLO, b"auth login\r\n", b64("alice") + b"\r\n", b64("secret") + b"\r\n"],
        mode,
        make_conn(security=PLAIN_AUTH),
    )
    assert tail(res, 3) == [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", AUTH_OK]
    assert res.of(AuthRequest)[0].credentials == sasl.Credentials("LOGIN", "alice", "secret")


@pytest.mark.parametrize("mode", MODES)
def test_auth_login_with_initial_response(mode):
    res = run(
        [EHLO, b"AUTH LOGIN " + b64("alice") + b"\r\n", b64("secret") + b"\r\n"],
        mode,
        make_conn(security=PLAIN_AUTH),
    )
    assert tail(res, 2) == [b"334 UGFzc3dvcmQ6\r\n", AUTH_OK]


@pytest.mark.parametrize("mode", MODES)
def test_auth_failure_is_535_and_may_be_retried(mode):
    conn = make_conn(security=PLAIN_AUTH)
    res = run([EHLO, auth_plain("alice", "wrong"), MAIL, auth_plain()], mode, conn)
    assert tail(res, 3) == [AUTH_FAILED, SENDER_OK, IN_TRANSACTION]
    assert conn.auth_user is None
    res = run([b"RSET\r\n", auth_plain()], mode, conn)
    assert tail(res, 1) == [AUTH_OK] and conn.auth_user == "alice"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "steps",
    [
        [b"AUTH PLAIN\r\n", b"*\r\n"],
        [b"AUTH LOGIN\r\n", b"*\r\n"],
        [b"AUTH LOGIN\r\n", b64("alice") + b"\r\n", b"*\r\n"],
        [b"AUTH LOGIN " + b64("alice") + b"\r\n", b"*\r\n"],
        [b"AUTH PLAIN *\r\n"],
    ],
)
def test_star_cancels_auth(mode, steps):
    conn = make_conn(security=PLAIN_AUTH)
    res = run([EHLO, *steps, b"NOOP\r\n", auth_plain()], mode, conn)
    assert tail(res, 3) == [CANCELLED, OK, AUTH_OK]
    assert len(res.of(AuthRequest)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_auth_needs_tls_538(mode):
    conn = make_conn(security=TLS)
    res = run([EHLO, auth_plain(), b"AUTH LOGIN\r\n", MAIL], mode, conn)
    assert tail(res, 3) == [NEED_TLS, NEED_TLS, SENDER_OK]
    assert not res.of(AuthRequest)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("security", "setup", "expected"),
    [
        (PLAIN_AUTH, [], NEED_EHLO),  # AUTH needs EHLO (RFC 4954 §4)
        (PLAIN_AUTH, [b"HELO c.example.org\r\n"], NEED_EHLO),
        (PLAIN_AUTH, [EHLO, auth_plain()], b"503 5.5.1 Error: already authenticated\r\n"),
        (PLAIN_AUTH, [EHLO, MAIL], IN_TRANSACTION),
        (Security(), [EHLO], b"503 5.5.1 Error: authentication not enabled\r\n"),
        (Security(tls_active=True), [EHLO], b"503 5.5.1 Error: authentication not enabled\r\n"),
    ],
)
def test_auth_refusals(mode, security, setup, expected):
    conn = make_conn(security=security)
    res = run([*setup, auth_plain("bob", "hunter2"), b"NOOP\r\n"], mode, conn)
    assert tail(res, 2) == [expected, OK]
    assert conn.auth_user in (None, "alice")


@pytest.mark.parametrize("mode", MODES)
def test_auth_switched_off(mode):
    conn = make_conn(extensions=Extensions(auth=False), security=IMPLICIT_TLS)
    res = run([EHLO, auth_plain(), b"MAIL FROM:<a@example.org> AUTH=<>\r\n"], mode, conn)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(res))
    assert tail(res, 2) == [b"503 5.5.1 Error: authentication not enabled\r\n", BAD_PARAMETER]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"AUTH GSSAPI =\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"AUTH PL\xc3\x84IN\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"AUTH PLAIN !!!!\r\n", BAD_BASE64),
        (b"AUTH PLAIN " + b64("\0alice\0secret")[:-1] + b"\r\n", BAD_BASE64),
        (b"AUTH PLAIN " + b64("alice secret") + b"\r\n", b"501 5.5.2 Malformed authentication"),
        (b"AUTH PLAIN =\r\n", b"501 5.5.2 Malformed authentication"),
        (b"AUTH PLAIN " + b64(b"\0\xff\0secret") + b"\r\n", b"501 5.5.2 Malformed"),
        (b"AUTH PLAIN " + b64("bob\0alice\0secret") + b"\r\n", AUTH_FAILED),
        (b"AUTH LOGIN =\r\n", b"501 5.5.2 Malformed authentication"),
        (b"AUTH LOGIN \xff\xfe\r\n", BAD_BASE64),
    ],
)
def test_auth_bad_input_gets_clear_replies(mode, line, expected):
    conn = make_conn(security=PLAIN_AUTH)
    res = run([EHLO, line, b"NOOP\r\n"], mode, conn)
    assert tail(res, 2)[0].startswith(expected)
    assert tail(res, 1) == [OK]
    assert not res.of(AuthRequest) and conn.auth_user is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_auth_bad_response_mid_exchange(mode, mechanism):
    conn = make_conn(security=PLAIN_AUTH)
    res = run([EHLO, b"AUTH " + mechanism + b"\r\n", b"not base64!\r\n", b"NOOP\r\n"], mode, conn)
    assert tail(res, 2) == [BAD_BASE64, OK]


@pytest.mark.parametrize("mode", MODES)
def test_auth_response_at_the_12288_limit(mode):
    conn = make_conn(security=PLAIN_AUTH, limits=Limits(max_errors=100))
    longest = b"A" * (sasl.MAX_AUTH_LINE - 2)  # CRLF makes 12288: accepted, but not base64
    res = run([EHLO, b"AUTH PLAIN\r\n", longest + b"\r\n", b"NOOP\r\n"], mode, conn)
    assert tail(res, 2) == [BAD_BASE64, OK]
    # a real response that long is read and checked
    password = "p" * 9000
    line = b64(f"\0alice\0{password}")
    assert len(line) <= sasl.MAX_AUTH_LINE - 2
    res = run([b"AUTH PLAIN\r\n", line + b"\r\n"], mode, conn)
    assert res.of(AuthRequest)[0].credentials.password == password
    assert tail(res, 1) == [AUTH_FAILED]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [sasl.MAX_AUTH_LINE - 1, 13000, 100_000])
def test_auth_response_over_12288_is_500_5_5_6(mode, size):
    conn = make_conn(security=PLAIN_AUTH)
    res = run([EHLO, b"AUTH LOGIN\r\n", b"A" * size + b"\r\n", b"NOOP\r\n"], mode, conn)
    assert tail(res, 2) == [b"500 5.5.6 Authentication exchange line is too long\r\n", OK]
    assert conn._sasl is None and len(conn._buf) == 0


@pytest.mark.parametrize("mode", MODES)
def test_auth_command_line_may_be_long_but_others_not(mode):
    conn = make_conn(security=PLAIN_AUTH)
    long_noop = b"NOOP " + b"x" * 600 + b"\r\n"
    long_auth = b"AUTH PLAIN " + b"A" * 600 + b"\r\n"
    res = run([EHLO, long_noop, long_auth, b"AUTH PLAIN " + b"A" * 13000 + b"\r\n"], mode, conn)
    assert [r[:9] for r in tail(res, 3)] == [b"500 5.5.2", b"501 5.5.2", b"500 5.5.2"]


@pytest.mark.parametrize("mode", MODES)
def test_auth_lines_stay_at_512_when_auth_is_not_offered(mode):
    res = run([EHLO, b"AUTH PLAIN " + b"A" * 1000 + b"\r\n"], mode, make_conn(security=TLS))
    assert tail(res, 1) == [b"500 5.5.2 Error: command line too long\r\n"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_request_never_shows_the_password(mechanism):
    conn = make_conn(security=PLAIN_AUTH)
    secret = "Sup3r-S3cret!"
    if mechanism == "PLAIN":
        script = [EHLO, auth_plain("alice", secret)]
    else:
        script = [EHLO, b"AUTH LOGIN\r\n", b64("alice") + b"\r\n", b64(secret) + b"\r\n"]
    res = run(script, "whole", conn, on_auth=lambda c, e: c.auth_result(None))
    (request,) = res.of(AuthRequest)
    assert request.credentials.password == secret
    for text in (repr(request), str(request), repr(res.events), repr(conn.__dict__)):
        assert secret not in text
        assert b64(secret).decode() not in text
    assert secret.encode() not in res.replies


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [b"<>", b"alice@example.test", b"alice+2Bx@example.test"])
def test_auth_parameter_on_mail_is_accepted(mode, value):
    conn = make_conn(security=PLAIN_AUTH)
    res = run([EHLO, b"MAIL FROM:<a@example.org> AUTH=" + value + b"\r\n"], mode, conn)
    assert tail(res, 1) == [SENDER_OK]
    assert conn.envelope.auth_user is None  # a claim, not a login


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_auth_then_transaction(mode):
    conn = make_conn(security=dataclasses.replace(PLAIN_AUTH, auth_required=True))
    res = run([EHLO, auth_plain() + MAIL + b"RCPT TO:<x@elsewhere.test>\r\n"], mode, conn)
    assert tail(res, 3) == [AUTH_OK, SENDER_OK, RELAY_LATER]


# ------------------------------------------------------------- listener roles

SUBMISSION = Security(tls_available=True, auth_available=True, auth_required=True)


@pytest.mark.parametrize("mode", MODES)
def test_submission_needs_auth_before_mail(mode):
    conn = make_conn(security=SUBMISSION)
    script = [EHLO, MAIL, RCPT, STARTTLS, HANDSHAKE, EHLO, MAIL, auth_plain(), MAIL, RCPT]
    res = run(script, mode, conn)
    assert tail(res, 9)[1:4] == [AUTH_REQUIRED, NEED_MAIL, READY]
    assert tail(res, 4) == [AUTH_REQUIRED, AUTH_OK, SENDER_OK, RCPT_OK]
    rejected = res.of(TransactionRejected)
    assert [(r.stage, r.reply) for r in rejected] == [("MAIL", R.AUTH_REQUIRED)] * 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("security", "authenticate", "expected"),
    [
        (Security(), False, RELAY_DENIED),
        (PLAIN_AUTH, False, RELAY_DENIED),
        (PLAIN_AUTH, True, RELAY_LATER),
        (Security(trusted=True), False, RELAY_LATER),
        (IMPLICIT_TLS, True, RELAY_LATER),
    ],
)
def test_relay_decision(mode, security, authenticate, expected):
    conn = make_conn(security=security)
    login = [auth_plain()] if authenticate else []
    rcpts = [b"RCPT TO:<x@elsewhere.test>\r\n", RCPT, b"RCPT TO:<postmaster>\r\n"]
    res = run([EHLO, *login, MAIL, *rcpts], mode, conn)
    assert tail(res, 3) == [expected, RCPT_OK, RCPT_OK]
    (rejected,) = res.of(TransactionRejected)
    assert rejected.stage == "RCPT" and rejected.address == "x@elsewhere.test"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("security", [Security(), Security(trusted=True), PLAIN_AUTH])
@pytest.mark.parametrize(
    "rcpt",
    [
        b"<bob%elsewhere.test@example.test>",
        b"<BOB%ELSEWHERE.TEST@EXAMPLE.TEST>",
        b'<"bob%elsewhere.test"@example.test>',
        b"<bob%elsewhere.test%other.test@example.test>",
        b"<bob%example.test@example.test>",
    ],
)
def test_percent_hack_is_refused_and_never_relayed(mode, security, rcpt):
    """`user%other@local` is neither relayed nor delivered to `user`: 550 5.1.3."""
    conn = make_conn(security=security)
    login = [auth_plain()] if security.auth_available else []
    res = run([EHLO, *login, MAIL, b"RCPT TO:" + rcpt + b"\r\n"], mode, conn)
    assert tail(res, 1) == [BAD_NAME]
    assert conn.envelope.recipients == ()


# Recipients that are not in a local domain, in every form an attacker might try.
NON_LOCAL = [
    "<bob@elsewhere.test>",
    "<BOB@ELSEWHERE.TEST>",
    "<bob@Elsewhere.Test>",
    " <bob@elsewhere.test>",
    "<postmaster@elsewhere.test>",
    "<bob@[192.0.2.1]>",
    "<bob@[127.0.0.1]>",
    "<bob@[IPv6:::1]>",
    "<bob@[IPv6:2001:db8::1]>",
    "<bob@[tag:example.test]>",
    '<"bob"@elsewhere.test>',
    '<"bob@elsewhere.test"@example.test>',
    '<"bob@elsewhere.test">',
    '<"<bob@elsewhere.test>"@example.test>',
    "<bob%elsewhere.test@example.test>",
    "<bob%elsewhere.test@EXAMPLE.TEST>",
    '<"bob%elsewhere.test"@example.test>',
    "<elsewhere.test!bob@example.test>",
    "<bob@elsewhere.test@example.test>",
    "<@example.test:bob@elsewhere.test>",
    "<@example.test,@other.example.test:bob@elsewhere.test>",
    "<bob@elsewhere.test.>",
    "<bob@elsewhere.test..>",
    "<bob@.elsewhere.test>",
    "<bob@example.test.elsewhere.test>",
    "<bob@sub.example.test>",
    "<bob@example.testx>",
    "<bob@xexample.test>",
    "<bob@example>",
    "<bob@localhost>",
    "<bob@elsewhere.test> SMTPUTF8",
    "<bob@exämple.test>",  # not a local domain (IDN)
    "<bob@\u0435xample.test>",  # Cyrillic U+0435: a homograph of the local domain
    "<bob@xn--xample-2of.test>",  # ... in its A-label form
    # fullwidth letters of a non-local domain
    "<bob@" + "".join(chr(ord(c) + 0xFEE0) for c in "elsewhere") + ".test>",
    "<bob@elsewhere.test\u3002>",  # ideographic full stop as a trailing dot
    "<bob@elsewhere\u3002test>",
    "<bob@else\u200bwhere.test>",  # zero-width space inside
    "<bob\r@elsewhere.test>",
    "<bob@elsewhere.test\x00>",
    "<bob@elsewhere.test",
    "bob@elsewhere.test",
]
LOCAL = ["<alice@example.test>", "<ALICE@Other.Example.Test>", "<postmaster>"]


def _flag_combinations():
    names = ["tls_available", "tls_active", "auth_available", "auth_plaintext", "auth_required"]
    for values in itertools.product([False, True], repeat=len(names)):
        for sender_must_match in (False, True):
            yield Security(
                **dict(zip(names, values, strict=True)), sender_must_match=sender_must_match
            )


def _policies():
    for accept_unknown, users, domains in itertools.product(
        [False, True],
        [frozenset(), frozenset({"alice", "bob", "postmaster"})],
        [frozenset({"example.test", "other.example.test"}), frozenset({"example.test"})],
    ):
        yield RecipientPolicy(local_domains=domains, users=users, accept_unknown=accept_unknown)


ATTEMPTS = ["anonymous", "failed-login", "claims-auth", "trusted", "authenticated"]


def _relay_sessions(attempt: str, relay: bool):  # type: ignore[no-untyped-def]
    """For every Security flag combination and recipient policy: a session of a
    client of this kind that sends MAIL and every NON_LOCAL recipient.
    Yields (security, policy, conn, result); counts the sessions run."""
    rcpts = b"".join(b"RCPT TO:" + a.encode() + b"\r\n" for a in NON_LOCAL)
    mail = b"MAIL FROM:<> SMTPUTF8"
    if attempt == "claims-auth":
        mail += b" AUTH=alice@example.test"
    for security, policy in itertools.product(_flag_combinations(), _policies()):
        policy = dataclasses.replace(policy, relay=relay)
        if attempt == "trusted":
            security = dataclasses.replace(security, trusted=True)
        conn = SMTPConnection(
            HOST, policy, Limits(max_errors=10_000, max_recipients=10_000), security=security
        )
        script = [EHLO]
        if conn.starttls_offered:
            script += [STARTTLS, HANDSHAKE, EHLO]
        if attempt == "authenticated":
            sec = security
            if not (
                sec.auth_available and (sec.auth_plaintext or sec.tls_available or sec.tls_active)
            ):
                continue
            script.append(auth_plain())
        elif attempt == "failed-login":
            script += [auth_plain("alice", "wrong"), b"AUTH LOGIN\r\n", b"*\r\n"]
        script += [mail + b"\r\n", rcpts, b"RCPT TO:<bob@elsewhere.test>\r\n"]
        yield security, policy, conn, run(script, "whole", conn)


@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_no_open_relay_whatever_the_settings(attempt):
    """Property, over every combination of Security flags and recipient policy:
    a recipient outside the local domains never gets 250 (there is no outbound
    queue yet), and an unauthenticated, untrusted client gets a 5xx for it,
    never the 451 of an allowed relay."""
    may_relay = attempt in ("trusted", "authenticated")
    sessions = 0
    for security, policy, conn, res in _relay_sessions(attempt, relay=False):
        sessions += 1
        assert (conn.auth_user == "alice") == (attempt == "authenticated")
        assert conn.may_relay == may_relay
        allowed = (b"4", b"5") if may_relay else (b"5",)
        replies = res.reply_lines[-len(NON_LOCAL) - 1 :]
        for address, reply in zip([*NON_LOCAL, "again"], replies, strict=True):
            assert reply[0][:1] in allowed, (security, policy, address, reply)
        assert conn.envelope is None or conn.envelope.recipients == ()
        if security.auth_required and attempt != "authenticated":
            assert tail(res, 1) == [NEED_MAIL]  # MAIL got 530
        else:
            assert tail(res, 1) == [RELAY_LATER if may_relay else RELAY_DENIED]
            policy_refusals = {R.RELAY_DENIED, R.BAD_MAILBOX_NAME, R.RELAY_UNAVAILABLE}
            if not may_relay:
                policy_refusals.remove(R.RELAY_UNAVAILABLE)
            assert {e.reply for e in res.of(TransactionRejected)} <= policy_refusals
    assert sessions == 8 * (64 if attempt != "authenticated" else 28)


@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_no_open_relay_with_the_outbound_queue(attempt):
    """The same property once a queue takes remote mail (`RecipientPolicy.relay`):
    a recipient outside the local domains is accepted only from a client that
    may relay, and then only as a remote recipient (no mailbox); everyone else
    gets a 5xx for each of them."""
    may_relay = attempt in ("trusted", "authenticated")
    sessions = accepted_somewhere = 0
    for security, policy, conn, res in _relay_sessions(attempt, relay=True):
        sessions += 1
        assert conn.may_relay == may_relay
        replies = res.reply_lines[-len(NON_LOCAL) - 1 :]
        accepted = conn.envelope.recipients if conn.envelope is not None else ()
        if not may_relay:
            assert all(r[0][:1] == b"5" for r in replies), (security, policy)
            assert accepted == ()
        else:
            # Whatever it took, it took for the queue: never into a local mailbox.
            assert all(r.box is None for r in accepted), (security, policy, accepted)
            assert all(not policy.is_local_domain(r.mailbox.domain) for r in accepted)
            accepted_somewhere += bool(accepted)
    assert sessions == 8 * (64 if attempt != "authenticated" else 28)
    # ... and a client that may relay does get remote mail queued (not refused).
    assert (accepted_somewhere > 0) == may_relay


def test_local_recipients_still_work_under_every_setting():
    """The property above is not met by refusing everything."""
    for security, policy in itertools.product(_flag_combinations(), _policies()):
        conn = SMTPConnection(HOST, policy, security=security)
        login = [auth_plain()] if conn.auth_offered else []
        mail = b"MAIL FROM:<alice@example.test>\r\n"
        rcpts = [b"RCPT TO:" + a.encode() + b"\r\n" for a in LOCAL]
        res = run([EHLO, *login, mail, *rcpts], "whole", conn)
        if security.auth_required and not login:
            assert tail(res, 4)[0] == AUTH_REQUIRED
            continue
        alice = RCPT_OK if "alice" in policy.users or policy.accept_unknown else UNKNOWN_USER
        other = alice
        if "other.example.test" not in policy.local_domains:
            other = RELAY_LATER if login else RELAY_DENIED
        assert tail(res, 3) == [alice, other, RCPT_OK], (security, policy)


# ---------------------------------------------------------- sender_must_match

MATCHING = dataclasses.replace(PLAIN_AUTH, sender_must_match=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        (b"<alice@example.test>", SENDER_OK),
        (b"<ALICE@Example.TEST>", SENDER_OK),
        (b"<alice@other.example.test>", SENDER_OK),
        (b'<"alice"@example.test>', SENDER_OK),
        (b"<>", SENDER_OK),  # bounces and receipts carry no sender
        (b"<bob@example.test>", NOT_OWNED),
        (b"<alice@elsewhere.test>", NOT_OWNED),
        (b"<alice@[127.0.0.1]>", NOT_OWNED),
        (b"<alice%elsewhere.test@example.test>", NOT_OWNED),
        (b"<alice.x@example.test>", NOT_OWNED),
        (b"<@elsewhere.test:bob@example.test>", NOT_OWNED),
    ],
)
def test_sender_must_match_the_login(mode, sender, expected):
    conn = make_conn(security=MATCHING)
    res = run([EHLO, auth_plain(), b"MAIL FROM:" + sender + b"\r\n"], mode, conn)
    assert tail(res, 1) == [expected]
    if expected == NOT_OWNED:
        (rejected,) = res.of(TransactionRejected)
        assert rejected.stage == "MAIL" and rejected.reply is R.SENDER_NOT_OWNED
        assert conn.state is State.GREETED


@pytest.mark.parametrize("mode", MODES)
def test_sender_may_be_anyone_without_sender_must_match(mode):
    res = run(
        [EHLO, auth_plain(), b"MAIL FROM:<bob@elsewhere.test>\r\n"],
        mode,
        make_conn(security=PLAIN_AUTH),
    )
    assert tail(res, 1) == [SENDER_OK]


# ----------------------------------------------------- independence of cutting

_FUZZ_PIECES = [
    EHLO,
    MAIL,
    RCPT,
    DATA,
    b"RSET\r\n",
    b"NOOP\r\n",
    b"BDAT 3\r\n",
    b"BDAT 4 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 10\r\n",
    b"BDAT x\r\n",
    auth_plain(),
    auth_plain("alice", "bad"),
    b"AUTH LOGIN\r\n",
    b64("alice") + b"\r\n",
    b"*\r\n",
    b"\r\n.\r\n",
    b"\r",
    b"\n",
    b"x",
    b"y" * 30,
    b"Message-ID: <m>\r\n",
]


def _cut_run(script: bytes, cuts: list[int]) -> tuple:
    conn = make_conn(Limits(max_message_size=40, max_errors=999), security=PLAIN_AUTH)
    events: list = []
    out = []
    for start, stop in zip([0, *cuts], [*cuts, len(script)], strict=True):
        if not feed(conn, script[start:stop]):
            break
        drain(conn, events)
        out.append(conn.data_to_send())
    result = Result(conn, b"", events)
    ends = [(e.size, e.envelope.auth_user) for e in events if isinstance(e, MessageEnd)]
    others = [e for e in events if not isinstance(e, MessageData | MessageEnd | MessageStart)]
    return b"".join(out), ends, others, result.messages, result.message_ids


def test_bdat_and_auth_replies_do_not_depend_on_how_input_is_cut():
    rng = random.Random(3030)
    for _ in range(150):
        pieces = [rng.choice(_FUZZ_PIECES) for _ in range(rng.randint(1, 25))]
        pieces.insert(rng.randint(0, len(pieces)), EHLO + MAIL + RCPT)  # get into BDAT often
        script = b"".join(pieces) + b"\r\n.\r\nQUIT\r\n"
        expected = _cut_run(script, [])
        cuts = sorted(rng.sample(range(1, len(script)), rng.randint(1, 10)))
        assert _cut_run(script, cuts) == expected, (script, cuts)
        assert _cut_run(script, list(range(1, len(script)))) == expected, script
