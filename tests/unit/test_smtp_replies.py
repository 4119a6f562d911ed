"""Reply wording lives in one file (`geosmtp/smtp/replies.py`).

The replies with a variable part are functions there; their wire form is
pinned here, and no other module of the package may build a reply itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import geosmtp
from geosmtp.smtp import replies as R

PACKAGE = Path(geosmtp.__file__).parent
REPLIES = PACKAGE / "smtp" / "replies.py"


def _builds_a_reply(node: ast.AST) -> bool:
    """`reply(...)`, `R.reply(...)`, `Reply(...)` or `R.Reply(...)`."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("reply", "Reply")


def test_no_reply_is_built_outside_replies_py():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == REPLIES:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        offenders += [
            f"{path.relative_to(PACKAGE)}:{node.lineno}"
            for node in ast.walk(tree)
            if _builds_a_reply(node)
        ]
    assert offenders == []


def test_the_check_finds_a_reply_built_in_place():
    """The test above can fail: it sees both spellings."""
    tree = ast.parse('R.reply(250, None, "x")\nReply(250, None, ("x",))\nreplies(1)\n')
    assert [_builds_a_reply(n.value) for n in tree.body if isinstance(n, ast.Expr)] == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (R.greeting("mx.test"), b"220 mx.test ESMTP geosmtp\r\n"),
        (R.helo("mx.test"), b"250 mx.test\r\n"),
        (
            R.ehlo("mx.test", ["PIPELINING", "SIZE 10"]),
            b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n",
        ),
        (R.closing("mx.test"), b"221 2.0.0 mx.test closing connection\r\n"),
        (R.queued("4AB"), b"250 2.0.0 Ok: queued as 4AB\r\n"),
        (R.chunk_received(1234), b"250 2.0.0 Ok: 1234 octets received\r\n"),
        (R.user_known("alice@example.test"), b"250 2.1.5 <alice@example.test>\r\n"),
        (R.VRFY_UNKNOWN_USER, b"550 5.1.1 User unknown\r\n"),
        (
            R.help_list("mx.test", ["EHLO", "QUIT"], ["PIPELINING", "SIZE"]),
            b"214-2.0.0 mx.test geosmtp; supported commands:\r\n"
            b"214-EHLO QUIT\r\n"
            b"214-Extensions: PIPELINING SIZE\r\n"
            b"214 See RFC 5321\r\n",
        ),
        (R.AUTH_ASK_USERNAME, b"334 VXNlcm5hbWU6\r\n"),
        (R.AUTH_ASK_PASSWORD, b"334 UGFzc3dvcmQ6\r\n"),
        (R.AUTH_EMPTY_CHALLENGE, b"334 \r\n"),
        (R.TOO_MANY_AUTH_FAILURES, b"421 4.7.0 Error: too many authentication failures\r\n"),
        (R.KICKED, b"421 4.7.0 Connection closed by the administrator\r\n"),
        (R.refused_by_stage(554, "5.7.1", "Virus found"), b"554 5.7.1 Virus found\r\n"),
        (R.refused_by_stage(550, "5.7.0", None), b"550 5.7.0 Error: message refused\r\n"),
        (
            R.refused_by_stage(451, "4.3.0", None),
            b"451 4.3.0 Error: local error in processing; try again later\r\n",
        ),
    ],
)  # fmt: skip
def test_wire_form(reply, wire):
    assert reply.to_bytes() == wire


def test_without_enhanced_codes():
    assert R.queued("Q").to_bytes(enhanced=False) == b"250 Ok: queued as Q\r\n"
