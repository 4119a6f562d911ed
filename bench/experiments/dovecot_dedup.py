"""Does Dovecot's duplicate suppression hold when deliveries run at once?

    python bench/experiments/dovecot_dedup.py [MESSAGES] [CONNECTIONS] [USERS]

Starts a private Dovecot with LMTP and the Sieve `duplicate` script
(`bench.peers.dovecot`, `dedup=True`) twice: once as examples/cluster/ runs it
(one LMTP process serving every connection), once with one LMTP process per
connection (Dovecot's default shape), and so again with
`lmtp_user_concurrency_limit = 1` (a user's second delivery at once is
refused with a 4xx, which this client tries again at once); then, for the
price of it, a Dovecot without the script. Each time, CONNECTIONS (16) LMTP
clients deliver MESSAGES (400) messages, each with its own Message-ID, to
USERS (1) users in turn, then deliver every one of them again, as a front end does with what it
had in flight when it died. Prints, per shape, the copies stored (read back
over Dovecot's POP3: MESSAGES means every second copy was dropped), the
deliveries per second over both rounds, and Dovecot's errors.

With several processes, two deliveries to one user at once each rewrite the
user's duplicate database (`~/.dovecot.lda-dupes`, read whole and written
whole by every delivery: `src/lib-storage/mail-duplicate.c`) without the
other's mark, and the copy whose mark was lost is stored again.
"""

from __future__ import annotations

import poplib
import smtplib
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers.dovecot import Dovecot, dedup_available  # noqa: E402

PASSWORD = "pw"


def user(n: int, users: int) -> str:
    return f"u{n % users:03d}"


def message(n: int, rcpt: str) -> bytes:
    return (
        f"From: bob@example.test\r\nTo: {rcpt}\r\n"
        f"Message-ID: <{n}.dedup@example.test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n"
    ).encode()


class UserLimited(Dovecot):
    """Dovecot with `lmtp_user_concurrency_limit = 1`: a recipient whose user
    has a delivery running already is refused with `451 4.3.0` at RCPT."""

    def write_config(self) -> None:
        super().write_config()
        with open(self.config_path, "a") as config:
            config.write("lmtp_user_concurrency_limit = 1\n")


def deliver(
    dc: Dovecot, numbers: range, users: int, errors: list[str], refusals: list[int]
) -> None:
    """Each message over one LMTP connection; a recipient refused with a 4xx
    is tried again at once (a front end would wait its retry delay)."""
    assert dc.lmtp_port is not None  # lmtp=True
    try:
        client = smtplib.LMTP(dc.host, dc.lmtp_port, timeout=60)
        client.ehlo("dedup.example.test")
        for n in numbers:
            rcpt = f"{user(n, users)}@example.test"
            for _ in range(10_000):
                try:
                    client.sendmail("bob@example.test", [rcpt], message(n, rcpt))
                    break
                except smtplib.SMTPRecipientsRefused as exc:
                    code = exc.recipients[rcpt][0]
                    if code // 100 != 4:
                        raise
                    refusals.append(code)
        client.quit()
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(repr(exc))


def run(
    dedup: bool,
    processes: int,
    messages: int,
    connections: int,
    users: int,
    server: type[Dovecot] = Dovecot,
) -> dict:
    names = [user(n, users) for n in range(users)]
    with server(
        None, dict.fromkeys(names, PASSWORD), lmtp=True, dedup=dedup, lmtp_processes=processes
    ) as dc:
        errors: list[str] = []
        refusals: list[int] = []
        t0 = time.monotonic()
        for _ in range(2):  # every message, then every one again
            threads = [
                threading.Thread(
                    target=deliver,
                    args=(dc, range(k, messages, connections), users, errors, refusals),
                )
                for k in range(connections)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        seconds = time.monotonic() - t0
        stored = 0
        for name in names:
            pop = poplib.POP3(dc.host, dc.port, timeout=30)
            pop.user(name)
            pop.pass_(PASSWORD)
            stored += pop.stat()[0]
            pop.quit()
        return {
            "stored": stored,
            "rate": 2 * messages / seconds,
            "errors": len(errors) + dc.log().count(": Error: "),
            "refusals": len(refusals),
        }


def main() -> int:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    connections = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    users = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if not dedup_available():
        print("needs Dovecot's LMTP and Sieve: apt-get install dovecot-lmtpd dovecot-sieve")
        return 2
    print(f"{messages} messages to {users} user(s) over {connections} LMTP connections, then again")
    print(
        "| duplicate suppression | LMTP processes | copies stored | of | deliveries/s "
        "| 4xx refusals, tried again | errors |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    shapes: tuple[tuple[bool, int, str, type[Dovecot]], ...] = (
        (True, 1, "1 (examples/cluster)", Dovecot),
        (True, connections, f"{connections}, 1 connection each", Dovecot),
        (
            True,
            connections,
            f"{connections}, 1 connection each, lmtp_user_concurrency_limit = 1",
            UserLimited,
        ),
        (False, connections, f"{connections}, 1 connection each", Dovecot),
    )
    for dedup, processes, label, server in shapes:
        sys.stderr.write(f"[dovecot_dedup] {'on' if dedup else 'off'}, {label} ...\n")
        r = run(dedup, processes, messages, connections, users, server)
        print(
            f"| {'on' if dedup else 'off'} | {label} | {r['stored']} | {messages} "
            f"| {r['rate']:.0f} | {r['refusals']} | {r['errors']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
