"""The registry of protocols (`server.protocols`): every listener role has
one protocol, and a session's core is built for its listener's role."""

from __future__ import annotations

import typing
from types import SimpleNamespace

import pytest

from geosmtp.app import PROTOCOLS, App
from geosmtp.config import Listener, Role
from geosmtp.lmtp import LMTPConnection
from geosmtp.mail.limits import Extensions, Limits
from geosmtp.pop3 import POP3Connection
from geosmtp.pop3 import State as POP3State
from geosmtp.server.lmtp import LMTPSession
from geosmtp.server.pop3 import POP3Session
from geosmtp.server.protocols import Protocols, ServerProtocol
from geosmtp.server.shared import CONNECTION_RATE, CONNECTIONS, ERRORS
from geosmtp.server.smtp import SMTPSession
from geosmtp.smtp import RecipientPolicy, SMTPConnection


def test_every_role_has_exactly_one_protocol():
    protocols = Protocols(*PROTOCOLS)
    assert set(protocols.by_role) == set(typing.get_args(Role))
    assert {name: p.session for name, p in protocols.by_name.items()} == {
        "smtp": SMTPSession,
        "pop3": POP3Session,
        "lmtp": LMTPSession,
    }
    # A session's PROTOCOL (logs, the admin API) is the name it is registered by.
    assert all(p.name == p.session.PROTOCOL for p in PROTOCOLS)


def test_a_name_or_a_role_is_registered_once():
    smtp, pop3 = (p for p in PROTOCOLS if p.name in ("smtp", "pop3"))
    with pytest.raises(ValueError, match="protocol smtp is registered already"):
        Protocols(smtp, ServerProtocol("smtp", ("other",), SMTPSession, smtp.build))
    with pytest.raises(ValueError, match="role pop3 is pop3's already"):
        Protocols(pop3, ServerProtocol("other", ("other", "pop3"), SMTPSession, smtp.build))


def host() -> SimpleNamespace:
    """What the cores' builders read of the app, with the app's own `security`."""
    config = SimpleNamespace(
        hostname="mx.test",
        vrfy=True,
        auth=SimpleNamespace(allow_plaintext=False, sender_must_match=True),
    )
    app = SimpleNamespace(
        config=config,
        tls_context=object(),
        policy=RecipientPolicy(local_domains=frozenset({"example.test"})),
        limits=Limits(),
        extensions=Extensions(),
        logins=SimpleNamespace(users={"alice": "hash"}),
        trusted_networks=[],
    )
    app.security = lambda listener, peer: App.security(app, listener, peer)  # type: ignore[arg-type]
    return app


@pytest.mark.parametrize(
    ("role", "core", "tls", "auth_required"),
    [
        ("mx", SMTPConnection, False, False),
        ("submission", SMTPConnection, False, True),
        ("submissions", SMTPConnection, True, True),
        ("pop3", POP3Connection, False, None),
        ("pop3s", POP3Connection, True, None),
        ("lmtp", LMTPConnection, False, False),
    ],
)
def test_the_core_is_the_one_of_the_listeners_role(role, core, tls, auth_required):
    app = host()
    conn = Protocols(*PROTOCOLS).build(Listener(role=role), "192.0.2.7", app)
    assert type(conn) is core
    assert conn.hostname == "mx.test" and conn.tls is tls
    if core is LMTPConnection:  # the SMTP core's subclass: no AUTH, no TLS
        assert not conn.security.auth_available and not conn.security.tls_available
    elif core is SMTPConnection:
        assert conn.security.auth_required is auth_required
        assert conn.security.auth_available and conn.security.sender_must_match
        assert conn.vrfy and conn.policy is app.policy
    else:
        assert conn.state is POP3State.AUTHORIZATION
        assert conn.security.tls_available and not conn.security.auth_plaintext


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_every_session_closes_and_refuses_with_reply_values(protocol):
    """One path for every protocol: the shell closes the core with a reply
    value (`StreamSession._close_with`) and refuses with one, rendered."""
    session = protocol.session
    assert set(session.CLOSING) == {"timeout", "shutdown", "kicked", "error"}
    assert {"stopping", "busy", CONNECTIONS, CONNECTION_RATE, ERRORS} <= set(session.REFUSALS)
    for reply in [*session.CLOSING.values(), *session.REFUSALS.values()]:
        line = reply.to_bytes()
        assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1
        assert line.startswith(b"-ERR [" if protocol.name == "pop3" else b"421 4.")
    assert session.refusal(True) == session.REFUSALS["stopping"].to_bytes()
    assert session.refusal(False) == session.REFUSALS["busy"].to_bytes()
    assert session.limit_refusal(ERRORS) == session.REFUSALS[ERRORS].to_bytes()


def test_the_wire_of_the_refusals_is_unchanged():
    assert SMTPSession.refusal(True) == b"421 4.3.2 Server shutting down; closing connection\r\n"
    assert SMTPSession.limit_refusal(CONNECTIONS) == (
        b"421 4.7.0 Error: too many connections from your address; try again later\r\n"
    )
    assert POP3Session.refusal(False) == (
        b"-ERR [SYS/TEMP] Too many connections; try again later.\r\n"
    )
    assert POP3Session.limit_refusal(CONNECTION_RATE) == (
        b"-ERR [SYS/TEMP] Too many connections from your address; try again later.\r\n"
    )
