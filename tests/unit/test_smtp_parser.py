"""Command-line, path and parameter parsing (RFC 5321 §4.1.2), without a session."""

from __future__ import annotations

import pytest

from geosmtp.smtp.parser import (
    MAX_LOCAL_PART,
    MAX_PATH,
    Mailbox,
    SyntaxProblem,
    is_address_literal,
    is_valid_domain,
    parse_helo_name,
    parse_mail_from,
    parse_mailbox,
    parse_params,
    parse_rcpt_to,
    split_command,
)

# ------------------------------------------------------------ split_command


@pytest.mark.parametrize(
    ("line", "verb", "arg"),
    [
        (b"EHLO example.org", "EHLO", b"example.org"),
        (b"ehlo example.org", "EHLO", b"example.org"),
        (b"mAiL FROM:<a@b.example>  ", "MAIL", b"FROM:<a@b.example>"),
        (b"NOOP", "NOOP", b""),
        (b"QUIT \t", "QUIT", b""),
        (b"RCPT  TO:<a@b.example>", "RCPT", b"TO:<a@b.example>"),
        (b"", "", b""),
        (b"\xc3\x89HLO x", "", b"x"),
        (b"EHLO\tx", "EHLO\tX", b""),  # only SP separates the verb (§4.1.1)
    ],
)
def test_split_command(line, verb, arg):
    assert split_command(line) == (verb, arg)


# ----------------------------------------------------------------- domains


@pytest.mark.parametrize(
    "domain",
    [
        "example.org",
        "a",
        "a-b.example",
        "xn--bcher-kva.example",
        "1.2.3.4.example",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "[ipv6:::1]",
        "[x-tag:some-content]",
        "a" * 63 + "." + "b" * 63,
    ],
)
def test_valid_domains(domain):
    assert is_valid_domain(domain)


@pytest.mark.parametrize(
    "domain",
    [
        "",
        "-a.example",
        "a-.example",
        "a..example",
        ".example",
        "example.",
        "exa mple.org",
        "exa_mple.org",
        "bücher.example",
        "[192.0.2.300]",
        "[IPv6:zz::1]",
        "[IPv6:192.0.2.1]",
        "[example]",
        "[1.2.3.4",
        "[]",
        "a." * 127 + "ab",  # 256 octets
    ],
)
def test_invalid_domains(domain):
    assert not is_valid_domain(domain)


def test_utf8_domains_only_with_smtputf8():
    assert is_valid_domain("bücher.example", utf8=True)
    assert not is_valid_domain("bücher.example")


@pytest.mark.parametrize(
    ("text", "ok"),
    [("[127.0.0.1]", True), ("[IPv6:::1]", True), ("[tag:x]", True), ("127.0.0.1", False)],
)
def test_address_literal(text, ok):
    assert is_address_literal(text) is ok


# ----------------------------------------------------------------- mailboxes


@pytest.mark.parametrize(
    ("text", "local", "domain", "address"),
    [
        ("user@Example.ORG", "user", "example.org", "user@example.org"),
        ("First.Last+tag@example.org", "First.Last+tag", "example.org", None),
        ("!#$%&'*+-/=?^_`{|}~@example.org", "!#$%&'*+-/=?^_`{|}~", "example.org", None),
        ('"a b"@example.org', "a b", "example.org", '"a b"@example.org'),
        ('"a\\"b\\\\c"@example.org', 'a"b\\c', "example.org", '"a\\"b\\\\c"@example.org'),
        ('"a@b"@example.org', "a@b", "example.org", '"a@b"@example.org'),
        ('"plain"@example.org', "plain", "example.org", "plain@example.org"),
        ('"a..b"@example.org', "a..b", "example.org", '"a..b"@example.org'),
        ("u@[192.0.2.1]", "u", "[192.0.2.1]", "u@[192.0.2.1]"),
        ("u@[IPv6:2001:DB8::1]", "u", "[IPv6:2001:DB8::1]", "u@[IPv6:2001:DB8::1]"),
    ],
)
def test_parse_mailbox(text, local, domain, address):
    mailbox = parse_mailbox(text)
    assert mailbox == Mailbox(local, domain)
    assert mailbox.address == (address or text.rsplit("@", 1)[0] + "@" + domain)
    assert str(mailbox) == mailbox.address
    assert parse_mailbox(mailbox.address) == mailbox  # the rendering parses back


@pytest.mark.parametrize(
    "text",
    [
        "",
        "user",
        "@example.org",
        "user@",
        "a..b@example.org",
        ".a@example.org",
        "a.@example.org",
        "a b@example.org",
        "a(b)@example.org",
        "a,b@example.org",
        'a"b@example.org',
        '"a\rb"@example.org',
        '"a\nb"@example.org',
        '"a\x00b"@example.org',
        '"unterminated@example.org',
        "é@example.org",
        "x" * (MAX_LOCAL_PART + 1) + "@example.org",
        "user@-example.org",
    ],
)
def test_parse_mailbox_refuses(text):
    with pytest.raises(SyntaxProblem):
        parse_mailbox(text)


def test_local_part_limit_is_64_octets():
    assert parse_mailbox("x" * MAX_LOCAL_PART + "@example.org").local_part == "x" * 64


def test_utf8_mailbox_only_with_smtputf8():
    assert parse_mailbox("jörg@bücher.example", utf8=True) == Mailbox("jörg", "bücher.example")
    with pytest.raises(SyntaxProblem):
        parse_mailbox("jörg@example.org")


def test_postmaster_mailbox_has_no_domain():
    assert Mailbox("postmaster", "").address == "postmaster"


# ----------------------------------------------------------------- MAIL FROM


@pytest.mark.parametrize(
    ("arg", "sender", "params"),
    [
        (b"FROM:<>", None, {}),
        (b"from:<>", None, {}),
        (b"FROM: <>", None, {}),
        (b"FROM:<a@b.example>", Mailbox("a", "b.example"), {}),
        (b"From:<a@B.Example> size=100 BODY=8BITMIME", Mailbox("a", "b.example"), None),
        (b"FROM:<> SIZE=1", None, {"SIZE": "1"}),
        (b"FROM:<a@b.example> FLAG", Mailbox("a", "b.example"), {"FLAG": None}),
        (b"FROM:<@x.example,@y.example:a@b.example>", Mailbox("a", "b.example"), {}),
        (b"FROM:<@x.example:a@b.example>", Mailbox("a", "b.example"), {}),
        (b"FROM:<u@[IPv6:2001:db8::1]>", Mailbox("u", "[IPv6:2001:db8::1]"), {}),
        (b'FROM:<"x@y:z"@b.example>', Mailbox("x@y:z", "b.example"), {}),
        (b'FROM:<"a>b"@b.example> SIZE=5', Mailbox("a>b", "b.example"), {"SIZE": "5"}),
    ],
)
def test_parse_mail_from(arg, sender, params):
    got_sender, got_params = parse_mail_from(arg)
    assert got_sender == sender
    if params is None:
        params = {"SIZE": "100", "BODY": "8BITMIME"}
    assert got_params == params


@pytest.mark.parametrize(
    "arg",
    [
        b"",
        b"FROM:",
        b"FROM: a@b.example",
        b"FROM:a@b.example",
        b"FROM:<a@b.example",
        b"FROM:a@b.example>",
        b"FROM:<a@b.example>SIZE=1",
        b"FROM:<a@b.example> =1",
        b"FROM:<a@b.example> SIZE=a=b",
        b"FROM:<a@b.example> SIZE=",
        b"FROM :<a@b.example>",
        b"TO:<a@b.example>",
        b"FROM:<postmaster>",
        b"FROM:<a@b.example\xff>",
        b'FROM:<"a@b.example>',
        b"FROM:<x@" + b"a" * (MAX_PATH - 3) + b">",
    ],
)
def test_parse_mail_from_refuses(arg):
    with pytest.raises(SyntaxProblem):
        parse_mail_from(arg)


def test_path_limit_is_256_octets_with_brackets():
    domain = "a" * 61 + "." + "b" * 61 + "." + "c" * 61 + "." + "d" * 61  # 247
    local = "x" * (MAX_PATH - 2 - 1 - len(domain))
    sender, _ = parse_mail_from(f"FROM:<{local}@{domain}>".encode())
    assert len(f"<{sender.address}>") == MAX_PATH
    with pytest.raises(SyntaxProblem):
        parse_mail_from(f"FROM:<{local}x@{domain}>".encode())


def test_smtputf8_sender_needs_the_parameter_and_the_permission():
    arg = "FROM:<jörg@bücher.example> SMTPUTF8".encode()
    sender, params = parse_mail_from(arg, utf8_allowed=True)
    assert sender == Mailbox("jörg", "bücher.example") and params == {"SMTPUTF8": None}
    with pytest.raises(SyntaxProblem):
        parse_mail_from(arg)
    with pytest.raises(SyntaxProblem):
        parse_mail_from("FROM:<jörg@bücher.example>".encode(), utf8_allowed=True)


# ------------------------------------------------------------------- RCPT TO


@pytest.mark.parametrize(
    ("arg", "mailbox"),
    [
        (b"TO:<postmaster>", Mailbox("postmaster", "")),
        (b"to:<PostMaster>", Mailbox("postmaster", "")),
        (b"TO: <postmaster>", Mailbox("postmaster", "")),
        (b"TO:<Postmaster@Example.ORG>", Mailbox("Postmaster", "example.org")),
        (b"TO:<a@b.example>", Mailbox("a", "b.example")),
        (b"TO:<@relay.example:a@b.example>", Mailbox("a", "b.example")),
        (b"TO:<a@[192.0.2.1]>", Mailbox("a", "[192.0.2.1]")),
    ],
)
def test_parse_rcpt_to(arg, mailbox):
    assert parse_rcpt_to(arg) == (mailbox, {})


def test_parse_rcpt_to_params():
    assert parse_rcpt_to(b"TO:<a@b.example> notify=NEVER") == (
        Mailbox("a", "b.example"),
        {"NOTIFY": "NEVER"},
    )


@pytest.mark.parametrize(
    "arg",
    [
        b"",
        b"TO:",
        b"TO:<>",
        b"TO: a@b.example",
        b"TO:<a>",
        b"TO:<postmaster",
        b"TO:<postmaster>x",
        b"TO:<a@b.example",
        b"FROM:<a@b.example>",
        b"TO:<a@b@c.example>",
        b"TO:<a@b.example> NOTIFY=\xc3\xa9",
    ],
)
def test_parse_rcpt_to_refuses(arg):
    with pytest.raises(SyntaxProblem):
        parse_rcpt_to(arg)


# -------------------------------------------------------------- parameters


def test_parse_params():
    assert parse_params("") == {}
    assert parse_params("size=10  Body=7BIT x-Y") == {"SIZE": "10", "BODY": "7BIT", "X-Y": None}


@pytest.mark.parametrize("text", ["-X=1", "X_Y=1", "X=", "X=a b=", "X=a=b", "=1", "X=\x7f"])
def test_parse_params_refuses(text):
    with pytest.raises(SyntaxProblem):
        parse_params(text)


def test_param_values_utf8_only_when_allowed():
    assert parse_params("X=é", utf8=True) == {"X": "é"}
    with pytest.raises(SyntaxProblem):
        parse_params("X=é")


# ---------------------------------------------------------------- HELO name


@pytest.mark.parametrize(
    "arg", [b"example.org", b"[192.0.2.1]", b"localhost", b"my_host", b"h\xc3\xa9"]
)
def test_helo_name_accepted(arg):
    assert parse_helo_name(arg) == arg.decode()


@pytest.mark.parametrize(
    "arg", [b"", b"a b", b"a\tb", b"a\rb", b"a\nb", b"a\x00b", b"a\x1bb", b"\xff", b"a\xc2\x85b"]
)
def test_helo_name_refused(arg):
    # Whatever passes here ends up in a Received: header; no control characters.
    with pytest.raises(SyntaxProblem):
        parse_helo_name(arg)
