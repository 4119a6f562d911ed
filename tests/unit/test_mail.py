"""The mail domain: one domain comparison, immutable envelopes, the Message-ID sniffer."""

from __future__ import annotations

import dataclasses

import pytest

from geosmtp.auth import UserDB
from geosmtp.mail import Domains, Envelope, Mailbox, Recipient
from geosmtp.mail.headers import HEADER_LIMIT, MessageIdSniffer
from geosmtp.smtp.policy import RecipientPolicy


@pytest.mark.parametrize(
    ("configured", "asked", "local"),
    [
        ("exämple.org", "xn--exmple-cua.org", True),
        ("xn--exmple-cua.org", "EXÄMPLE.org", True),
        ("Example.ORG", "example.org", True),
        ("example.org", "example.org.", False),
        ("example.org", "sub.example.org", False),
    ],
)
def test_every_part_compares_domains_the_same_way(configured, asked, local):
    domains = Domains([configured])
    assert (asked in domains) is local
    # The recipient policy and the login check agree with it.
    assert RecipientPolicy(domains).is_local_domain(asked) is local
    users = UserDB({"alice": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"}, domains)
    assert (users.user_for_login(f"alice@{asked}") == "alice") is local


def test_envelopes_are_immutable():
    env = Envelope("c", True, Mailbox("s", "example.org"), {"SIZE": "10"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.recipients = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        env.mail_params["SIZE"] = "20"  # type: ignore[index]
    later = dataclasses.replace(env, recipients=(Recipient(Mailbox("a", "x.org"), None),))
    assert env.recipients == () and later.remote and not later.local


MESSAGE = b"Subject: s\nMessage-ID:\n  <folded@example.org>\nTo: t\n\nMessage-ID: <body@x>\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 7, len(MESSAGE)])
def test_the_sniffer_finds_the_header_message_id_however_it_is_fed(cut):
    sniffer = MessageIdSniffer()
    for i in range(0, len(MESSAGE), cut):
        sniffer.feed(MESSAGE[i : i + cut])
    sniffer.close()
    assert sniffer.message_id == "<folded@example.org>"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\nMessage-ID: <body@x>\n", None),  # no header section
        (b"X-Message-ID: <no@x>\n\n", None),
        (b"message-id:<lower@x>", "<lower@x>"),  # a header with no body, ended by close()
        (b"X: " + b"p" * HEADER_LIMIT + b"\nMessage-ID: <late@x>\n\n", None),
    ],
)
def test_the_sniffer_reads_only_the_header_section(message, expected):
    sniffer = MessageIdSniffer()
    sniffer.feed(message)
    sniffer.close()
    assert sniffer.message_id == expected


def test_with_recipient_is_replace_with_one_more():
    env = Envelope("c", True, Mailbox("s", "example.org"), {"SIZE": "10"}, tls=True)
    one = Recipient(Mailbox("a", "example.test"), "a")
    two = Recipient(Mailbox("b", "example.test"), "b")
    grown = env.with_recipient(one).with_recipient(two)
    assert grown == dataclasses.replace(env, recipients=(one, two))
    assert env.recipients == () and grown.recipients == (one, two)
    with pytest.raises(dataclasses.FrozenInstanceError):
        grown.tls = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("asked", "kept"),
    [
        (None, None),  # no NOTIFY: the server's default (failures, delays) stands
        ({"NEVER"}, {"NEVER"}),
        ({"FAILURE"}, {"FAILURE"}),
        ({"SUCCESS"}, {"NEVER"}),  # asked for no failure report: none at all
        ({"DELAY"}, {"NEVER"}),
        ({"SUCCESS", "DELAY"}, {"NEVER"}),
        ({"SUCCESS", "FAILURE"}, {"FAILURE"}),
        ({"SUCCESS", "FAILURE", "DELAY"}, {"FAILURE"}),
    ],
)
def test_an_untrusted_client_asks_for_no_success_or_delay_report(asked, kept):
    notify = frozenset(asked) if asked is not None else None
    rcpt = Recipient(Mailbox("a", "example.test"), "a", notify=notify, orcpt="rfc822;a@x")
    other = Recipient(Mailbox("b", "example.test"), "b", notify=frozenset({"FAILURE"}))
    env = Envelope("c", True, Mailbox("s", "example.org"), {"RET": "HDRS"}, (rcpt, other))
    allowed = env.without_trusted_notify()
    assert allowed.recipients[0].notify == (frozenset(kept) if kept is not None else None)
    assert allowed.recipients[0].orcpt == "rfc822;a@x"
    assert allowed.recipients[1] is other
    assert allowed.mail_params == {"RET": "HDRS"} and allowed.sender == env.sender
    assert (allowed is env) == (asked == kept)


@pytest.mark.parametrize(
    ("pieces", "found"),
    [
        ([b"Subject: s\n\nReturn-Path: <body@x>\n"], False),  # the body's is text
        ([b"Subject: s\nReturn-Path: <evil@x>\n\nbody\n"], True),
        ([b"Subject: s\nreturn-pa", b"th :\n <folded@x>\n\nbody\n"], True),  # cut anywhere
        ([b"X-Return-Path: <x>\n\n"], False),
    ],
)
def test_the_sniffer_sees_a_clients_return_path_in_the_header_section(pieces, found):
    sniffer = MessageIdSniffer()
    for piece in pieces:
        sniffer.feed(piece)
    sniffer.close()
    assert sniffer.return_path is found


def test_a_header_section_too_long_to_look_through_may_hide_a_return_path():
    sniffer = MessageIdSniffer()
    sniffer.feed(b"X-Long: " + b"a" * HEADER_LIMIT + b"\n")
    sniffer.close()
    assert sniffer.return_path is True  # the session then looks at the whole file
