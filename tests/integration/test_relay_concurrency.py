"""Per-destination concurrency that adapts (issue 20), end to end through the
CLI: a smarthost that answers 421 at the greeting is a failed cohort at a
concurrency of 1, so the destination is suspended and the next message is
deferred without a connection (Postfix's "delivery temporarily suspended")."""

from __future__ import annotations

import smtplib

from tests.conftest import listeners, users, wait_until
from tests.integration.smtp_sink import Script, Sink

PASSWORD = "adaptive-test-pw"


def submit(server, rcpt: str, n: int) -> None:  # type: ignore[no-untyped-def]
    message = f"From: alice@test.example\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@test.example", [rcpt], message) == {}


def deferred_lines(server, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    def enough() -> list[str] | None:
        lines = [ln for ln in server.access_log().splitlines() if "outcome=deferred" in ln]
        return lines if len(lines) >= count else None

    return wait_until(enough, what=f"{count} deferred lines in the access log")


def test_a_smarthost_answering_421_is_suspended_after_a_failed_cohort(make_server):
    with Sink(Script(greeting="421 4.3.2 sink.test too busy")) as sink:
        server = make_server(
            {
                "workers": 1,  # one runner: one set of limits
                "listeners": listeners("submission"),
                "users": users(alice=PASSWORD),
                "auth": {"allow_plaintext": True},
                "relay": {
                    "smarthost": f"127.0.0.1:{sink.port}",
                    "smarthost_tls": "none",
                    "per_domain_concurrency": 1,  # starts at 1: one failure is a cohort
                    "retry_schedule": [60],  # suspended that long; no retry in the test
                },
            }
        )
        submit(server, "bob@remote.test", 1)
        (first,) = deferred_lines(server, 1)
        assert "421 4.3.2 sink.test too busy" in first
        assert sink.connections == 1
        # another domain, the same smarthost: the same destination, suspended
        submit(server, "carol@other.test", 2)
        second = deferred_lines(server, 2)[1]
        assert "to=<carol@other.test>" in second
        assert "relay=none" in second
        assert f"delivery to [127.0.0.1]:{sink.port} temporarily suspended" in second
        assert "421 4.3.2 sink.test too busy" in second  # the reason it was suspended
        assert sink.connections == 1  # no connection for it
        assert len(list((server.mail_dir / ".queue" / "records").glob("*.json"))) == 2
