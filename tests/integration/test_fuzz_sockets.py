"""Hostile bytes against the real server, at the socket (issue 19).

Many connections, ten at a time, to every kind of listener (`mx` plain and
after STARTTLS, `submissions` with implicit TLS, `pop3` plain and after STLS,
`pop3s`), each doing one hostile thing: random bytes, a valid session cut off
at a random octet, garbage in the middle of DATA, a TLS handshake cut short or
corrupted, random bytes inside TLS; and each ends abruptly, by a close or a
reset (SO_LINGER 0). Between them, legitimate clients (smtplib, poplib) send
mail and log in, and must succeed. The run is seeded and prints its seed;
`GEOSMTP_FUZZ_SEED=n` runs it again with that seed.

Afterwards:
- every legitimate message was stored exactly once, and no message whose
  session was cut before the end of its data was stored at all;
- the server is healthy: a fresh SMTP transaction and POP3 logins work, every
  worker is the one that started (none crashed), and each worker has no
  session open, the descriptors it had after a warm-up round and no more
  greenlets than then (read from `GET /api/v1/runtime`, polled, bounded);
- its log and stderr hold no traceback and no internal error.

A longer run: `GEOSMTP_FUZZ=long` (10x the connections) or
`GEOSMTP_FUZZ_CONNECTIONS=n`, e.g.
`GEOSMTP_FUZZ_CONNECTIONS=5000 .venv/bin/python -m pytest -q -s \
tests/integration/test_fuzz_sockets.py`.
"""

from __future__ import annotations

import base64
import os
import poplib
import random
import re
import smtplib
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from geosmtp.storage.maildir import Maildir
from tests.conftest import listeners, users, wait_until
from tests.integration.adminapi import admin_of, admin_section

PASSWORD = "fuzz secret"
CONNECTIONS = int(
    os.environ.get(
        "GEOSMTP_FUZZ_CONNECTIONS", "2400" if os.environ.get("GEOSMTP_FUZZ") == "long" else "240"
    )
)
WARMUP = 40  # connections before the baseline is taken
THREADS = 10
LEGIT_EVERY = 10  # one job in ten is a legitimate client
#: Seconds a legitimate client waits for a reply: generous, since the fuzz's
#: logins (argon2, on purpose slow) share the machine with it.
LEGIT_TIMEOUT = 30


@dataclass
class Ledger:
    """What the run sent, for the checks at the end (threads append to it)."""

    legit: list[str] = field(default_factory=list)  # tokens of the messages that got 250
    cut: list[str] = field(default_factory=list)  # tokens of messages cut before their end
    maybe: list[str] = field(default_factory=list)  # tokens of fuzz messages that may be stored
    failures: list[str] = field(default_factory=list)  # legitimate clients that failed
    kinds: dict[str, int] = field(default_factory=dict)
    slowest: float = 0.0  # seconds, of a legitimate client (POP3: with its wait for its turn)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, value: str) -> None:
        with self.lock:
            getattr(self, name).append(value)

    def count(self, kind: str) -> None:
        with self.lock:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1


# ------------------------------------------------------------------ sockets


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def end(sock: socket.socket, rng: random.Random) -> None:
    """Close abruptly: half the time with a reset (SO_LINGER 0), else a FIN."""
    try:
        if rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def read_some(sock: socket.socket, rng: random.Random) -> None:
    """Sometimes read what the server said, for at most a moment."""
    if rng.random() < 0.5:
        return
    try:
        sock.settimeout(0.05)
        sock.recv(65536)
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.settimeout(5)


def read_until(sock: socket.socket, marker: bytes, limit: float = 5) -> bytes:
    """Read until `marker` (a reply the next step depends on), bounded in time."""
    data, deadline = b"", time.monotonic() + limit
    while marker not in data:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} in {data!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before {marker!r}: {data!r}")
        data += chunk
    return data


def send_cut(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    """Send `data` in a few random pieces (the server's reads are cut anywhere)."""
    points = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1))) if data else []
    for a, b in zip([0, *points], [*points, len(data)], strict=True):
        sock.sendall(data[a:b])


def tls(sock: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS handshake, to cut or corrupt."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


TOKENS = [
    *(b"\r\n", b"\n", b"\r", b".", b"..\r\n", b"\0", b"\xff\xfe\xfd", b" ", b"\t", b"x" * 600),
    *(b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<bob@test.example>\r\n"),
    *(b"DATA\r\n", b"BDAT 7\r\n", b"BDAT 99999 LAST\r\n", b"RSET\r\n", b"STARTTLS\r\n"),
    *(b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"*\r\n", b"USER bob\r\n", b"PASS x\r\n"),
    *(b"STLS\r\n", b"RETR 1\r\n", b"TOP 1 0\r\n", b"LIST\r\n", b"CAPA\r\n", b"\x16\x03\x01"),
]


def garbage(rng: random.Random, data: bool = False) -> bytes:
    """Random bytes, or a run of hostile tokens; in DATA never the end marker."""
    if rng.random() < 0.4:
        out = rng.randbytes(rng.randint(1, 3000))
    else:
        out = b"".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 40)))
    if data:
        while b"\r\n.\r\n" in out or out.startswith(b".\r\n"):
            out = out.replace(b"\r\n.\r\n", b"\r\n..\r\n").replace(b".\r\n", b"x\r\n", 1)
    return out


def plain_auth(user: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{PASSWORD}".encode())


def smtp_script(
    token: str, auth: bool, rng: random.Random, bdat: bool | None = None
) -> tuple[bytes, int]:
    """A whole SMTP session to bob (its message over DATA, or BDAT, or either at
    random), and the length of its prefix that ends the message data."""
    head = b"EHLO fuzz.example\r\n"
    if auth:
        head += b"AUTH PLAIN " + plain_auth("bob") + b"\r\n"
    head += b"MAIL FROM:<fuzz@example.org>\r\nRCPT TO:<bob@test.example>\r\n"
    message = f"Subject: {token}\r\n\r\n.dot line\r\nbody\r\n".encode()
    if not (rng.random() < 0.5 if bdat is None else bdat):
        body = b"DATA\r\n" + message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    else:
        body = f"BDAT {len(message)} LAST\r\n".encode() + message
    return head + body + b"QUIT\r\n", len(head + body)


POP3_SCRIPT = (
    b"CAPA\r\nUSER bob\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nLIST\r\nUIDL\r\n"
    b"RETR 1\r\nTOP 1 0\r\nDELE 1\r\nRSET\r\nNOOP\r\nDELE 1\r\n"
)  # never QUIT: a cut session deletes nothing


# --------------------------------------------------------------------- jobs


class Fuzzer:
    def __init__(self, server, ctx: ssl.SSLContext, seed: int, ledger: Ledger) -> None:  # type: ignore[no-untyped-def]
        self.ports = server.ports
        self.ctx = ctx
        self.seed = seed
        self.ledger = ledger
        self.hello = client_hello(ctx)
        self.pop3_turn = threading.Lock()

    def job(self, n: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + n)
        if n % LEGIT_EVERY == 0:  # each legitimate kind in turn
            legit = [self.legit_mx, self.legit_starttls, self.legit_submissions]
            legit += [self.legit_pop3s, self.legit_stls]
            kind = legit[n // LEGIT_EVERY % len(legit)]
        else:
            kinds = [self.smtp_bytes, self.smtp_prefix, self.smtp_mid_data, self.smtp_starttls]
            kinds += [self.smtps_bytes, self.smtps_hello, self.smtps_inside, self.pop3_bytes]
            kinds += [self.pop3_prefix, self.pop3s_inside]
            kind = rng.choice(kinds)
        self.ledger.count(kind.__name__)
        began = time.monotonic()
        try:
            kind(rng, f"fuzz-{self.seed}-{n}")
            if kind.__name__.startswith("legit"):
                took = time.monotonic() - began
                with self.ledger.lock:
                    self.ledger.slowest = max(self.ledger.slowest, took)
        except (OSError, ssl.SSLError, EOFError, smtplib.SMTPException, poplib.error_proto) as exc:
            if kind.__name__.startswith("legit"):
                self.ledger.add("failures", f"{kind.__name__} {n}: {exc!r}")

    # ------------------------------------------------------------ hostile

    def smtp_bytes(self, rng: random.Random, token: str) -> None:
        sock = connect(self.ports["mx"])
        read_some(sock, rng)
        send_cut(sock, garbage(rng), rng)
        read_some(sock, rng)
        end(sock, rng)

    def _prefix(self, sock: socket.socket, rng: random.Random, token: str, auth: bool) -> None:
        script, complete = smtp_script(token, auth, rng)
        cut = rng.randint(0, len(script))
        self.ledger.add("maybe" if cut >= complete else "cut", token)
        send_cut(sock, script[:cut], rng)
        read_some(sock, rng)
        end(sock, rng)

    def smtp_prefix(self, rng: random.Random, token: str) -> None:
        self._prefix(connect(self.ports["mx"]), rng, token, auth=False)

    def smtp_mid_data(self, rng: random.Random, token: str) -> None:
        sock = connect(self.ports["mx"])
        script, _ = smtp_script(token, False, rng, bdat=False)
        start = script.index(b"Subject:")
        self.ledger.add("cut", token)
        send_cut(sock, script[:start] + b"Subject: " + token.encode() + b"\r\n", rng)
        read_some(sock, rng)
        send_cut(sock, garbage(rng, data=True), rng)
        end(sock, rng)

    def smtp_starttls(self, rng: random.Random, token: str) -> None:
        sock = connect(self.ports["mx"])
        sock.sendall(b"EHLO fuzz.example\r\nSTARTTLS\r\n")
        read_until(sock, b"220 2.0.0")
        if rng.random() < 0.3:  # no handshake: bytes in the clear instead
            send_cut(sock, garbage(rng), rng)
            end(sock, rng)
            return
        self._prefix(tls(sock, self.ctx), rng, token, auth=False)

    def smtps_bytes(self, rng: random.Random, token: str) -> None:
        sock = connect(self.ports["submissions"])
        send_cut(sock, garbage(rng), rng)
        read_some(sock, rng)
        end(sock, rng)

    def smtps_hello(self, rng: random.Random, token: str) -> None:
        """A ClientHello cut short, or with some octets changed."""
        hello = bytearray(self.hello)
        if rng.random() < 0.5:
            hello = hello[: rng.randint(1, len(hello))]
        else:
            for _ in range(rng.randint(1, 8)):
                hello[rng.randrange(len(hello))] = rng.randrange(256)
        port = rng.choice([self.ports["submissions"], self.ports["pop3s"]])
        sock = connect(port)
        send_cut(sock, bytes(hello), rng)
        read_some(sock, rng)
        end(sock, rng)

    def smtps_inside(self, rng: random.Random, token: str) -> None:
        sock = tls(connect(self.ports["submissions"]), self.ctx)
        if rng.random() < 0.5:
            self._prefix(sock, rng, token, auth=True)
        else:
            send_cut(sock, garbage(rng), rng)
            read_some(sock, rng)
            end(sock, rng)

    def pop3_bytes(self, rng: random.Random, token: str) -> None:
        sock = connect(self.ports["pop3"])
        read_some(sock, rng)
        send_cut(sock, garbage(rng), rng)
        read_some(sock, rng)
        end(sock, rng)

    def pop3_prefix(self, rng: random.Random, token: str) -> None:
        sock = connect(self.ports["pop3"])
        sock.sendall(b"STLS\r\n")
        read_until(sock, b"+OK Begin TLS")
        sock = tls(sock, self.ctx)
        send_cut(sock, POP3_SCRIPT[: rng.randint(0, len(POP3_SCRIPT))], rng)
        read_some(sock, rng)
        end(sock, rng)

    def pop3s_inside(self, rng: random.Random, token: str) -> None:
        sock = tls(connect(self.ports["pop3s"]), self.ctx)
        script = POP3_SCRIPT[: rng.randint(0, len(POP3_SCRIPT))]
        send_cut(sock, script + (garbage(rng) if rng.random() < 0.5 else b""), rng)
        read_some(sock, rng)
        end(sock, rng)

    # ---------------------------------------------------------- legitimate

    def _mail(self, client: smtplib.SMTP, token: str) -> None:
        message = f"Subject: {token}\r\nMessage-ID: <{token}@fuzz.example>\r\n\r\n.{token}\r\n"
        refused = client.sendmail("legit@example.org", ["alice@test.example"], message)
        assert refused == {}, refused
        self.ledger.add("legit", token)

    def legit_mx(self, rng: random.Random, token: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.ports["mx"], timeout=LEGIT_TIMEOUT) as client:
            self._mail(client, token)

    def legit_starttls(self, rng: random.Random, token: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.ports["mx"], timeout=LEGIT_TIMEOUT) as client:
            client.starttls(context=self.ctx)
            self._mail(client, token)

    def legit_submissions(self, rng: random.Random, token: str) -> None:
        port = self.ports["submissions"]
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=LEGIT_TIMEOUT, context=self.ctx) as client:
            client.login("alice", PASSWORD)
            self._mail(client, token)

    # One legitimate POP3 client at a time: two would find alice's maildrop
    # locked by the other ("-ERR [IN-USE]"), as they should.
    def legit_pop3s(self, rng: random.Random, token: str) -> None:
        with self.pop3_turn:
            client = poplib.POP3_SSL(
                "127.0.0.1", self.ports["pop3s"], timeout=LEGIT_TIMEOUT, context=self.ctx
            )
            pop3_check(client, "alice")

    def legit_stls(self, rng: random.Random, token: str) -> None:
        with self.pop3_turn:
            client = poplib.POP3("127.0.0.1", self.ports["pop3"], timeout=LEGIT_TIMEOUT)
            client.stls(context=self.ctx)
            pop3_check(client, "alice")


def pop3_check(client: poplib.POP3, user: str) -> int:
    """Log in, list the maildrop, QUIT without deleting; the message count."""
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, _size = client.stat()
        _resp, listing, _octets = client.list()
        assert len(listing) == count
        client.quit()
        return count
    finally:
        client.close()


# -------------------------------------------------------------------- checks


def tokens_stored(server, box: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """How many stored files of `box` (new/ and cur/) carry each Subject token."""
    maildir = Maildir(server.mail_dir / box)
    counts: dict[str, int] = {}
    for m in maildir.list():
        found = re.search(rb"^Subject: (\S+)", (maildir.path / m.relpath).read_bytes(), re.M)
        if found:
            token = found[1].decode()
            counts[token] = counts.get(token, 0) + 1
    return counts


def runtime(api) -> dict[int, dict]:  # type: ignore[no-untyped-def]
    return {w["pid"]: w for w in api.get("/api/v1/runtime")["workers"]}


def counts(api) -> dict[int, tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """Each worker's (sessions, greenlets, descriptors), by pid."""
    return {
        pid: (w["sessions"], w["greenlets"], w["descriptors"]) for pid, w in runtime(api).items()
    }


def settled(api, what: str) -> dict[int, tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """The counts once no session is open and two reads in a row agree."""
    last: list = [None]

    def quiet() -> dict | None:
        now = counts(api)
        same = now == last[0] and all(sessions == 0 for sessions, _, _ in now.values())
        last[0] = now
        return now if same else None

    return wait_until(quiet, timeout=20, interval=0.1, what=what)


def run_jobs(fuzzer: Fuzzer, jobs: range) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(fuzzer.job, n) for n in jobs]:
            future.result(timeout=60)


def test_socket_fuzz_leaves_the_server_healthy(make_server, certs):
    seed = int(os.environ.get("GEOSMTP_FUZZ_SEED", random.randrange(2**31)))
    print(f"socket fuzz seed: {seed} (GEOSMTP_FUZZ_SEED={seed} runs it again)")
    server = make_server(
        {
            "listeners": listeners("mx", "submissions", "pop3", "pop3s"),
            "tls": certs.tls_config,
            "users": users(alice=PASSWORD, bob=PASSWORD),
            # This test is about hostile bytes, not per-client limits: all of it
            # comes from 127.0.0.1, which those would soon shut out.
            "client_limits": {"max_connections": 0, "max_errors": 0},
            "auth": {"max_failures": 1000, "failure_delay": 0},
            **admin_section(),
        }
    )
    api = admin_of(server)
    ctx = certs.client_context()
    ledger = Ledger()
    fuzzer = Fuzzer(server, ctx, seed, ledger)
    workers = sorted(server.workers())
    run_jobs(fuzzer, range(WARMUP))
    before = settled(api, "the warm-up's sessions to end")
    assert sorted(before) == workers, (before, workers)
    started = time.monotonic()
    run_jobs(fuzzer, range(WARMUP, WARMUP + CONNECTIONS))
    took = time.monotonic() - started
    print(f"{CONNECTIONS} connections in {took:.1f}s: {sorted(ledger.kinds.items())}")
    print(f"slowest legitimate client: {ledger.slowest:.2f}s")

    # Legitimate clients all succeeded, in the middle of all that.
    assert ledger.failures == [], ledger.failures
    smtp_turns = [
        n for n in range(0, WARMUP + CONNECTIONS, LEGIT_EVERY) if n // LEGIT_EVERY % 5 < 3
    ]
    assert len(ledger.legit) == len(smtp_turns), "a legitimate message was not sent"

    # Healthy: the same workers, every session over, a fresh transaction and
    # logins work (bob's maildrop, fuzzed, is not left locked)...
    assert server.process.poll() is None, server.stderr()[-3000:]
    assert sorted(server.workers()) == workers, "a worker died"
    settled(api, "the fuzz sessions to end")
    fuzzer.legit_mx(random.Random(0), f"final-{seed}")
    pop3_check(poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=ctx), "bob")
    alice = pop3_check(poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=ctx), "alice")

    # ... and every worker holds again what it held before the fuzz: the same
    # descriptors, and no more greenlets (counted as the collector sees them,
    # so dead ones it has not freed yet may make the count before higher).
    def back() -> bool:
        now = counts(api)
        return now.keys() == before.keys() and all(
            now[pid][0] == 0 and now[pid][1] <= before[pid][1] and now[pid][2] == before[pid][2]
            for pid in now
        )

    try:
        wait_until(back, timeout=20, interval=0.1, what="the counts to return")
    except AssertionError:
        raise AssertionError(f"before {before}, now {counts(api)}") from None

    # Each legitimate message stored once; no cut one stored at all; the fuzz
    # messages that were sent whole at most once (only bob gets those).
    stored = tokens_stored(server, "alice")
    assert stored == dict.fromkeys(ledger.legit, 1), "legitimate mail lost or doubled"
    assert alice == len(ledger.legit)
    fuzzed = tokens_stored(server, "bob")
    assert not set(fuzzed) & set(ledger.cut), "a message cut before its end was stored"
    assert all(n == 1 for n in fuzzed.values()), fuzzed
    assert set(fuzzed) <= set(ledger.maybe), set(fuzzed) - set(ledger.maybe)

    # Nothing went wrong inside.
    for name, text in (("log", server.server_log()), ("stderr", server.stderr())):
        assert "Traceback" not in text, f"a traceback in the server's {name}"
        assert "internal error" not in text, f"an internal error in the server's {name}"
