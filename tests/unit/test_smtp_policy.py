"""Recipient policy: local domains, mailbox names that are safe as directory names."""

from __future__ import annotations

import random
import unicodedata

import pytest

from geosmtp.mail import Mailbox, Recipient, safe_mailbox_name
from geosmtp.mail.address import MAX_MAILBOX_NAME
from geosmtp.smtp import replies as R
from geosmtp.smtp.policy import RecipientPolicy

# ------------------------------------------------------------ safe_mailbox_name


@pytest.mark.parametrize(
    ("local", "name"),
    [
        ("alice", "alice"),
        ("Alice", "alice"),
        ("ALICE.Smith", "alice.smith"),
        ("a+tag", "a+tag"),
        ("a-b", "a-b"),
        ("a_b", "a_b"),
        ("a.b.c", "a.b.c"),
        ("0", "0"),
        ("Straße", "strasse"),  # case-folded, not just lower-cased
        ("ÅSA", "åsa"),
        ("\ufb01le", "file"),  # NFKC: the ligature becomes two letters
        ("\uff21\uff4c\uff49\uff43\uff45", "alice"),  # NFKC: fullwidth letters
        ("x" * MAX_MAILBOX_NAME, "x" * MAX_MAILBOX_NAME),
    ],
)
def test_safe_names(local, name):
    assert safe_mailbox_name(local) == name


@pytest.mark.parametrize(
    "local",
    [
        "",
        "/",
        "a/b",
        "/etc/passwd",
        "..",
        "../alice",
        "a/../b",
        "a..b",
        ".",
        ".alice",
        "alice.",
        "\\",
        "a\\b",
        "..\\alice",
        "\x00",
        "a\x00b",
        "alice\x00",
        "a\nb",
        "a\rb",
        "a\tb",
        "a\x1bb",
        "a\x7fb",
        "a\x85b",
        "a b",
        " alice",
        "alice ",
        "-alice",
        "+alice",
        "_alice",
        "alice-",
        "alice_",
        "a:b",
        "a*b",
        "a?b",
        "a%2fb",
        "a'b",
        'a"b',
        "a|b",
        "a~b",
        "a$b",
        "a@b",
        "~alice",
        "a\u202eb",  # right-to-left override (Cf)
        "a\u200bb",  # zero width space (Cf)
        "a\u00a0b",  # no-break space (Zs)
        "a\u2028b",  # line separator (Zl)
        "a\ufe0fb",  # variation selector (Mn)
        "a\uff0fb",  # fullwidth solidus: "/" after NFKC
        "\u2025",  # two dot leader: ".." after NFKC
        "a\u2024\u2024b",  # one dot leaders: "a..b" after NFKC
        "a\u2215b",  # division slash
        "x" * (MAX_MAILBOX_NAME + 1),
        "é" * 33,  # 66 octets in UTF-8
        "\udcff",  # a lone surrogate (from surrogateescape)
    ],
    ids=repr,
)
def test_unsafe_names(local):
    assert safe_mailbox_name(local) is None


_TRICKY = "aZ09._+-/\\\x00\n\r\t \x7f:~%é\u2024\u2025\uff0f\u202e\u200b\u0130ßΣﬁ."


def test_safe_names_fuzz():
    """Whatever comes out is a plain, stable directory name."""
    rng = random.Random(5321)
    accepted = 0
    for _ in range(3000):
        local = "".join(rng.choice(_TRICKY) for _ in range(rng.randint(1, 8)))
        name = safe_mailbox_name(local)
        if name is None:
            continue
        accepted += 1
        assert name == safe_mailbox_name(name)  # idempotent: the name is its own key
        assert name == unicodedata.normalize("NFKC", name).casefold()
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert ".." not in name and not name.startswith(".") and not name.endswith(".")
        assert all(c.isprintable() and not c.isspace() for c in name)
        assert 0 < len(name.encode()) <= MAX_MAILBOX_NAME
    assert accepted > 50  # the alphabet does produce valid names


# ---------------------------------------------------------------- the policy


POLICY = RecipientPolicy(
    local_domains=frozenset({"example.test", "other.example.test"}),
    users=frozenset({"alice", "bob"}),
    accept_unknown=True,
    postmaster="admin",
)
STRICT = RecipientPolicy(
    local_domains=frozenset({"example.test"}),
    users=frozenset({"alice"}),
    accept_unknown=False,
)


@pytest.mark.parametrize(
    ("policy", "mailbox", "box"),
    [
        (POLICY, Mailbox("alice", "example.test"), "alice"),
        (POLICY, Mailbox("Alice", "other.example.test"), "alice"),
        (POLICY, Mailbox("carol", "example.test"), "carol"),  # created on delivery
        (POLICY, Mailbox("postmaster", ""), "admin"),  # RCPT TO:<postmaster> (§4.5.1)
        (POLICY, Mailbox("PostMaster", "example.test"), "admin"),
        (STRICT, Mailbox("alice", "example.test"), "alice"),
        (STRICT, Mailbox("postmaster", ""), "postmaster"),
        (STRICT, Mailbox("POSTMASTER", "example.test"), "postmaster"),
    ],
)
def test_resolve_accepts(policy, mailbox, box):
    assert policy.resolve(mailbox) == Recipient(mailbox, box)


@pytest.mark.parametrize(
    ("policy", "mailbox", "reply"),
    [
        (POLICY, Mailbox("alice", "elsewhere.test"), R.RELAY_DENIED),
        (POLICY, Mailbox("alice", "example.test.elsewhere.test"), R.RELAY_DENIED),
        (POLICY, Mailbox("alice", "sub.example.test"), R.RELAY_DENIED),
        (POLICY, Mailbox("postmaster", "elsewhere.test"), R.RELAY_DENIED),
        (POLICY, Mailbox("alice", "[192.0.2.1]"), R.RELAY_DENIED),
        (POLICY, Mailbox("../alice", "example.test"), R.BAD_MAILBOX_NAME),
        (POLICY, Mailbox("a/b", "example.test"), R.BAD_MAILBOX_NAME),
        (POLICY, Mailbox("a\x00b", "example.test"), R.BAD_MAILBOX_NAME),
        (STRICT, Mailbox("carol", "example.test"), R.UNKNOWN_USER),
        (STRICT, Mailbox("../carol", "example.test"), R.BAD_MAILBOX_NAME),
    ],
)
def test_resolve_refuses(policy, mailbox, reply):
    assert policy.resolve(mailbox) is reply


# The server's own name, not one of its domains (as in the bundled config).
NAMED = RecipientPolicy(
    local_domains=frozenset({"example.test"}),
    users=frozenset({"alice"}),
    accept_unknown=False,
    postmaster="admin",
    hostname="mx.example.test",
)


@pytest.mark.parametrize(
    "mailbox",
    [
        Mailbox("postmaster", "mx.example.test"),  # what every delivery report names
        Mailbox("PostMaster", "MX.Example.Test"),
        Mailbox("postmaster", "example.test"),
        Mailbox("postmaster", ""),
    ],
)
def test_postmaster_at_the_hostname_is_the_postmaster(mailbox):
    # RFC 5321 §4.5.1; refused with 550 5.7.1 before, from anyone.
    assert NAMED.resolve(mailbox) == Recipient(mailbox, "admin")
    assert NAMED.resolve(mailbox, may_relay=True) == Recipient(mailbox, "admin")


@pytest.mark.parametrize(
    "mailbox",
    [
        Mailbox("alice", "mx.example.test"),  # only postmaster: the name is not a domain
        Mailbox("postmaster", "sub.mx.example.test"),
        Mailbox("postmaster", "elsewhere.test"),
    ],
)
def test_only_postmaster_at_the_hostname(mailbox):
    assert NAMED.resolve(mailbox) is R.RELAY_DENIED
    assert NAMED.resolve(mailbox, may_relay=True) == R.RELAY_UNAVAILABLE


def test_refusal_replies():
    assert R.RELAY_DENIED.to_bytes() == b"550 5.7.1 Relay access denied\r\n"
    assert R.UNKNOWN_USER.to_bytes().startswith(b"550 5.1.1 ")
    assert R.BAD_MAILBOX_NAME.to_bytes().startswith(b"550 5.1.3 ")


def test_local_domain_is_case_insensitive():
    assert POLICY.is_local_domain("EXAMPLE.TEST")
    assert POLICY.is_local_domain("Other.Example.Test")
    assert not POLICY.is_local_domain("example.test.")
    assert not POLICY.is_local_domain("")


def test_known_users():
    assert STRICT.is_known_user("alice")
    assert STRICT.is_known_user("postmaster")
    assert not STRICT.is_known_user("carol")
