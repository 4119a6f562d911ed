"""SASL decoding (`geosmtp.protocol.sasl`) as SMTP AUTH words it: PLAIN
(RFC 4616) and LOGIN, RFC 4954 framing."""

from __future__ import annotations

import base64

import pytest

from geosmtp.protocol import sasl
from geosmtp.protocol.sasl import Credentials, SASLError, SASLExchange
from geosmtp.smtp import replies as R


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def refusal(call) -> R.Reply:  # type: ignore[no-untyped-def]
    """The SMTP reply for the exchange's refusal."""
    with pytest.raises(SASLError) as info:
        call()
    return R.SASL_ERRORS[info.value.problem]


def smtp(challenge: sasl.Challenge | Credentials) -> bytes:
    """A challenge as SMTP sends it."""
    assert isinstance(challenge, sasl.Challenge)
    return R.challenge(challenge.text).to_bytes()


# ------------------------------------------------------------------ decode


@pytest.mark.parametrize(
    ("response", "decoded"),
    [
        (b"dGVzdA==", b"test"),
        (b"  dGVzdA==  ", b"test"),  # surrounding blanks are not part of it
        (b"=", b""),  # RFC 4954 §4: "=" is an empty response
        (b"", b""),
        (b"AGFsaWNlAHNlY3JldA==", b"\0alice\0secret"),
    ],
)
def test_decode(response, decoded):
    assert sasl.decode(response) == decoded


@pytest.mark.parametrize("response", [b"*", b" * "])
def test_decode_star_cancels_with_501(response):
    reply = refusal(lambda: sasl.decode(response))
    assert reply is R.AUTH_CANCELLED
    assert (reply.code, reply.status) == (501, "5.7.0")


@pytest.mark.parametrize(
    "response",
    [
        b"dGVzdA",  # missing padding
        b"dGVzdA===",  # excess padding
        b"dGVz dA==",  # a blank inside
        b"!!!!",
        b"\xc3\xa9AAA",  # not even ASCII
        b"AA==AA==",  # data after the padding
        b"**",
        b"==",
    ],
)
def test_decode_refuses_what_is_not_strict_base64(response):
    reply = refusal(lambda: sasl.decode(response))
    assert reply is R.AUTH_BAD_BASE64
    assert (reply.code, reply.status) == (501, "5.5.2")


# ------------------------------------------------------------------- PLAIN


@pytest.mark.parametrize(
    ("message", "login", "password"),
    [
        (b"\0alice\0secret", "alice", "secret"),
        (b"alice\0alice\0secret", "alice", "secret"),  # authzid = authcid is fine
        (b"\0alice@example.test\0pa ss", "alice@example.test", "pa ss"),
        ("\0jösé\0pässwörd".encode(), "jösé", "pässwörd"),
    ],
)
def test_parse_plain(message, login, password):
    creds = sasl.parse_plain(message)
    assert creds == Credentials("PLAIN", login, password)
    assert creds.password == password


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"alice",
        b"\0alice",
        b"\0\0secret",  # no authcid
        b"\0alice\0",  # no password
        b"\0alice\0sec\0ret",  # one NUL too many
        b"\0\xffalice\0secret",  # not UTF-8
        b"\0alice\0\xff",
    ],
)
def test_parse_plain_refuses_malformed_messages(message):
    reply = refusal(lambda: sasl.parse_plain(message))
    assert reply is R.AUTH_BAD_RESPONSE
    assert (reply.code, reply.status) == (501, "5.5.2")


def test_parse_plain_refuses_acting_for_another_user():
    reply = refusal(lambda: sasl.parse_plain(b"bob\0alice\0secret"))
    assert (reply.code, reply.status) == (535, "5.7.8")


# --------------------------------------------------------------- exchanges


def test_plain_with_initial_response():
    creds = SASLExchange("PLAIN").start(b64(b"\0alice\0secret"))
    assert creds == Credentials("PLAIN", "alice", "secret")


def test_plain_without_initial_response_sends_an_empty_challenge():
    exchange = SASLExchange("PLAIN")
    challenge = exchange.start(None)
    assert challenge is sasl.EMPTY
    assert smtp(challenge) == b"334 \r\n"  # RFC 4954 §4: no enhanced code on 3xx
    assert exchange.respond(b64(b"\0alice\0secret")) == Credentials("PLAIN", "alice", "secret")


def test_login_without_initial_response():
    exchange = SASLExchange("LOGIN")
    assert smtp(exchange.start(None)) == b"334 VXNlcm5hbWU6\r\n"
    assert base64.b64decode("VXNlcm5hbWU6") == b"Username:"
    assert smtp(exchange.respond(b64(b"alice"))) == b"334 UGFzc3dvcmQ6\r\n"
    assert base64.b64decode("UGFzc3dvcmQ6") == b"Password:"
    assert exchange.respond(b64(b"secret")) == Credentials("LOGIN", "alice", "secret")


def test_login_with_initial_response_is_the_user_name():
    exchange = SASLExchange("LOGIN")
    assert smtp(exchange.start(b64(b"alice"))) == b"334 UGFzc3dvcmQ6\r\n"
    assert exchange.respond(b64(b"secret")) == Credentials("LOGIN", "alice", "secret")


def test_login_empty_password_is_passed_on_to_be_refused():
    exchange = SASLExchange("LOGIN")
    exchange.start(b64(b"alice"))
    assert exchange.respond(b"=") == Credentials("LOGIN", "alice", "")


@pytest.mark.parametrize("user", [b"=", b""])
def test_login_empty_user_name_is_refused(user):
    exchange = SASLExchange("LOGIN")
    exchange.start(None)
    assert refusal(lambda: exchange.respond(user)) is R.AUTH_BAD_RESPONSE


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_star_cancels_at_any_step(mechanism):
    exchange = SASLExchange(mechanism)
    exchange.start(None)
    assert refusal(lambda: exchange.respond(b"*")) is R.AUTH_CANCELLED
    assert refusal(lambda: SASLExchange(mechanism).start(b"*")) is R.AUTH_CANCELLED
    if mechanism == "LOGIN":
        exchange = SASLExchange(mechanism)
        exchange.start(b64(b"alice"))
        assert refusal(lambda: exchange.respond(b"*")) is R.AUTH_CANCELLED


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "plain", "", "GSSAPI", "XOAUTH2"])
def test_unknown_mechanism_is_504(mechanism):
    # The session upper-cases the name; the exchange itself takes it exactly.
    reply = refusal(lambda: SASLExchange(mechanism))
    assert reply is R.AUTH_BAD_MECHANISM
    assert (reply.code, reply.status) == (504, "5.5.4")


def test_every_problem_has_a_reply_in_each_core():
    from geosmtp.pop3 import replies as POP3

    assert set(R.SASL_ERRORS) == set(POP3.SASL_ERRORS) == set(sasl.Problem)
    assert R.challenge(sasl.EMPTY.text) == R.AUTH_EMPTY_CHALLENGE


def test_mechanisms_and_line_limit():
    assert sasl.MECHANISMS == ("PLAIN", "LOGIN")
    assert sasl.MAX_AUTH_LINE == 12288  # RFC 4954 §4
    assert (R.AUTH_LINE_TOO_LONG.code, R.AUTH_LINE_TOO_LONG.status) == (500, "5.5.6")


# ----------------------------------------------------------------- secrecy


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_credentials_never_show_the_password(mechanism):
    creds = Credentials(mechanism, "alice", "s3cr3t-Pa55")
    for text in (repr(creds), str(creds), f"{creds}", f"{creds!r}"):
        assert "s3cr3t-Pa55" not in text
        assert "alice" in text


def test_errors_never_carry_the_response():
    # A refused response (it may hold a password) is not echoed in the error text.
    secret = b"\0alice\0s3cr3t-Pa55"
    for call in (
        lambda: sasl.parse_plain(secret + b"\0"),
        lambda: sasl.decode(b64(secret)[:-1]),
        lambda: sasl.parse_plain(b"mallory" + secret),
    ):
        with pytest.raises(SASLError) as info:
            call()
        assert b"s3cr3t" not in str(info.value).encode()
        assert "s3cr3t" not in R.SASL_ERRORS[info.value.problem].text
