"""The soak scenario's traffic: one gevent process running mixed clients for a while.

Started by `bench.soak` (`python -m bench.soak_traffic`), it reads its job as
one JSON line on stdin, reports a JSON line `w` every `window` seconds (the
SMTP transaction and POP3 session latencies of that window, counts) and a
`result` at the end. A later line `stop` on stdin (or stdin closing) ends it
early. Every loop ends by itself at `duration` seconds, and every socket
operation has `io_timeout`:

- **senders**: `senders` SMTP sessions send message k at start + k / `rate`
  (a fixed rate, not flat out, so latency means something), each session
  `per_session` messages and then QUIT and a new connection. Even k go to a
  local POP3 user (`p0000`..), odd k to `uNNN@remote.test`, relayed by the
  server to the sink. Sizes 2-50 KB (`bench.mailboxes.size`).
- **pop3**: `pop3_clients` clients, each owning every `pop3_clients`-th user,
  log in, STAT, RETR every message (checked byte for byte), DELE it, QUIT;
  then the next of their users after a pause. A message counts as retrieved
  once QUIT had its `+OK` (then the deletion is done).
- **idle**: `idle` sessions connect, EHLO and wait, sending NOOP now and then;
  one the server closes connects again (counted).
- **hostile**: `hostile` clients, each over and over: garbage bytes, an
  over-long command line, a message cut off in the middle of DATA (ids of
  their own: none may ever be delivered), a trickle of a byte at a time then
  a hang-up, a connect and an immediate reset, and POP3 garbage.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import gevent  # noqa: E402
from gevent import os as gos  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pool import Group  # noqa: E402

from bench import mailboxes, messages  # noqa: E402
from bench.loadgen import (  # noqa: E402
    Pop3,
    ProtocolError,
    ServerClosed,
    Session,
    emit,
    raise_nofile,
)

perf = time.perf_counter
RELAY_DOMAIN = "remote.test"
#: Message numbers of the hostile clients' cut-off messages: never to be delivered.
HOSTILE_BASE = 100_000_000
NET_ERRORS = (OSError, ServerClosed, ProtocolError, ConnectionError)


def rcpt_of(n: int, users: int) -> tuple[str, str]:
    """(mailbox, domain) of message n: even n a local POP3 user, odd n the remote sink."""
    if n % 2 == 0:
        return mailboxes.box((n // 2) % users), messages.DOMAIN
    return messages.mailbox(n), RELAY_DOMAIN


def size_of(n: int) -> int:
    return mailboxes.size(n)


class Soak:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.host = spec["host"]
        self.port = int(spec["port"])
        self.pop3_port = int(spec["pop3_port"])
        self.run_id = spec["run_id"]
        self.users = int(spec["users"])
        self.rate = float(spec["rate"])
        self.io_timeout = float(spec.get("io_timeout", 60))
        self.start = time.monotonic()
        self.end = self.start + float(spec["duration"])
        self.stop = Event()
        self.next_id = 0
        # Per window (reset at each `w` line): latencies in seconds.
        self.w_smtp: list[float] = []
        self.w_pop3: list[float] = []
        # The whole run.
        self.acked: list[int] = []
        self.refused: list[int] = []
        self.unknown: list[int] = []  # fate unknown: the connection failed after the dot
        self.retrieved: list[list] = []  # [box, n]: retrieved, deleted, QUIT +OK
        self.uncommitted: list[list] = []  # retrieved in a session whose QUIT failed
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []
        self.hostile_counts: Counter[str] = Counter()
        self.idle_connected = 0
        self.idle_reconnects = 0
        self.pop3_sessions = 0
        self.smtp_sessions = 0

    # ------------------------------------------------------------ helpers

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.end

    def pause(self, seconds: float) -> None:
        """Sleep, but not past the end of the run."""
        self.stop.wait(max(0.0, min(seconds, self.end - time.monotonic())))

    def error(self, kind: str, detail: object = "") -> None:
        self.errors[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {detail}"[:300])

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection((self.host, port), timeout=self.io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    # ------------------------------------------------------------ senders

    def take(self) -> int | None:
        """The next message number, once it is due; None at the end of the run."""
        n = self.next_id
        self.next_id += 1
        due = self.start + n / self.rate
        if due >= self.end:
            return None
        self.pause(due - time.monotonic())
        return n if self.running() else None

    def sender(self, k: int) -> None:
        per_session = int(self.spec.get("per_session", 20))
        while self.running():
            try:
                s = Session(self.connect(self.port), ReplyCounts())
            except OSError as exc:
                self.error("connect", exc)
                self.pause(1.0)
                continue
            self.smtp_sessions += 1
            try:
                s.expect(220, "greeting")
                s.sock.sendall(f"EHLO sender{k}.bench.test\r\n".encode())
                s.expect(250, "EHLO")
                for _ in range(per_session):
                    n = self.take()
                    if n is None:
                        break
                    self.transaction(s, n)
                s.sock.sendall(b"QUIT\r\n")
                s.expect(221, "QUIT")
            except NET_ERRORS as exc:
                self.error(f"smtp {type(exc).__name__}", exc)
            finally:
                s.close()

    def transaction(self, s: Session, n: int) -> None:
        """Send message n: acked (250), refused (an error reply, or the session
        failed before the final dot), or unknown (it failed after the dot)."""
        box, domain = rcpt_of(n, self.users)
        msg = messages.build(self.run_id, n, size_of(n), (box,))
        t0 = perf()
        try:
            s.sock.sendall(
                f"MAIL FROM:<{messages.SENDER}>\r\nRCPT TO:<{box}@{domain}>\r\nDATA\r\n".encode()
            )
            codes = [s.reply() for _ in range(3)]
            if codes != [250, 250, 354]:
                self.refused.append(n)
                self.error("refused before DATA", f"{n}: {codes}")
                if codes[-1] == 354:
                    s.sock.sendall(b".\r\n")
                    s.reply()
                return
            s.sock.sendall(b"".join(msg.wire_chunks()) + b".\r\n")
        except NET_ERRORS:
            self.refused.append(n)  # no final dot went out: it cannot be stored
            raise
        try:
            code = s.reply()
        except NET_ERRORS:
            self.unknown.append(n)  # the dot was sent: stored or not, we cannot tell
            raise
        if code == 250:
            self.w_smtp.append(perf() - t0)
            self.acked.append(n)
        else:
            self.refused.append(n)
            self.error(f"DATA answered {code}", n)

    # ------------------------------------------------------------ pop3

    def pop3_client(self, k: int) -> None:
        clients = int(self.spec["pop3_clients"])
        mine = list(range(k, self.users, clients))
        pause = float(self.spec.get("pop3_pause", 3.0))
        self.pause(random.uniform(0, pause))
        i = 0
        while self.running() and mine:
            name = mailboxes.box(mine[i % len(mine)])
            i += 1
            try:
                self.pop3_session(name)
            except NET_ERRORS as exc:
                self.error(f"pop3 {type(exc).__name__}", f"{name}: {exc}")
            self.pause(random.uniform(0.5, 1.5) * pause)

    def pop3_session(self, name: str) -> None:
        t0 = perf()
        p = Pop3(self.connect(self.pop3_port))
        got: list[list] = []
        try:
            p.ok("greeting")
            p.command(f"USER {name}", "USER")
            p.command(f"PASS {mailboxes.password(name)}", "PASS")
            count = int(p.command("STAT", "STAT").split()[1])
            for m in range(1, min(count, 200) + 1):
                p.command(f"RETR {m}", "RETR")
                n = self.check_retrieved(name, m, mailboxes.decode(p.block()))
                if n is not None:
                    got.append([name, n])
                p.command(f"DELE {m}", "DELE")
            p.command("QUIT", "QUIT")
        except BaseException:
            self.uncommitted.extend(got)
            raise
        finally:
            p.sock.close()
        self.retrieved.extend(got)
        self.pop3_sessions += 1
        self.w_pop3.append(perf() - t0)

    def check_retrieved(self, name: str, m: int, stored: bytes) -> int | None:
        """The message number of a retrieved message, if it is this run's and intact."""
        at = stored.find(b"X-Bench-Id: ")
        if at < 0:
            self.error("RETR: not a bench message", f"{name} #{m}")
            return None
        eol = stored.find(b"\n", at)
        run, _, num = stored[at + 12 : eol].decode("ascii", "replace").rpartition(".")
        if run != self.run_id or not num.isdigit():
            self.error("RETR: foreign message", f"{name} #{m}: {run}.{num}")
            return None
        n = int(num)
        msg = messages.build(self.run_id, n, size_of(n), (name,))
        if stored[at:] != msg.header_lf + b"".join(msg.canonical_body_chunks()):
            self.error("RETR: content differs", f"{name} #{m}: message {n}")
        return n

    # ------------------------------------------------------------ idle

    def idle(self, k: int) -> None:
        self.pause(k * 0.02)  # spread the connects
        while self.running():
            try:
                s = Session(self.connect(self.port), ReplyCounts())
            except OSError as exc:
                self.error("idle connect", exc)
                self.pause(2.0)
                continue
            try:
                s.expect(220, "greeting")
                s.sock.sendall(f"EHLO idle{k}.bench.test\r\n".encode())
                s.expect(250, "EHLO")
                self.idle_connected += 1
                try:
                    while self.running():
                        self.pause(random.uniform(60, 240))
                        if not self.running():
                            break
                        s.sock.sendall(b"NOOP\r\n")
                        s.expect(250, "NOOP")
                    s.sock.sendall(b"QUIT\r\n")
                    s.reply()
                finally:
                    self.idle_connected -= 1
            except NET_ERRORS as exc:
                if self.running():
                    self.idle_reconnects += 1
                    if self.idle_reconnects <= 5:
                        self.error(f"idle {type(exc).__name__}", exc)
            finally:
                s.close()

    # ------------------------------------------------------------ hostile

    def hostile(self, k: int) -> None:
        kinds = [
            self.h_garbage,
            self.h_long_line,
            self.h_cut_data,
            self.h_trickle,
            self.h_reset,
            self.h_pop3_garbage,
        ]
        j = k
        while self.running():
            fn = kinds[j % len(kinds)]
            j += 1
            try:
                fn(k, j)
                self.hostile_counts[fn.__name__[2:]] += 1
            except NET_ERRORS:
                # The server may well hang up on them; what matters is it stays up.
                self.hostile_counts[fn.__name__[2:] + " (closed by server)"] += 1
            self.pause(random.uniform(0.5, 2.0))

    def _drain(self, sock: socket.socket, seconds: float) -> bytes:
        """What the server says within `seconds` (until it closes)."""
        sock.settimeout(seconds)
        out = b""
        try:
            while len(out) < 65536:
                data = sock.recv(4096)
                if not data:
                    break
                out += data
        except TimeoutError:
            pass
        return out

    def expect_reply(self, said: bytes, want: bytes, what: str) -> None:
        """The server greeted the hostile client and answered it `want`: it is still serving."""
        if not said.startswith(b"220 ") or want not in said:
            self.error(f"hostile {what}: unexpected answer", said[:200])

    def h_garbage(self, k: int, j: int) -> None:
        with self.connect(self.port) as sock:
            rnd = random.Random(j * 7919 + k)
            for _ in range(5):
                sock.sendall(bytes(rnd.getrandbits(8) for _ in range(300)) + b"\r\n")
            self.expect_reply(self._drain(sock, 1.0), b"500 ", "garbage")

    def h_long_line(self, k: int, j: int) -> None:
        with self.connect(self.port) as sock:
            sock.sendall(b"EHLO " + b"x" * 100_000 + b"\r\nNOOP\r\n")
            self.expect_reply(self._drain(sock, 1.0), b"500 5.5.2", "over-long line")

    def h_cut_data(self, k: int, j: int) -> None:
        n = HOSTILE_BASE + k * 1_000_000 + j
        box, domain = rcpt_of(2 * j, self.users)  # a local user: a Maildir it must not reach
        msg = messages.build(self.run_id, n, 8192, (box,))
        with self.connect(self.port) as sock:
            sock.sendall(
                f"EHLO cut{k}\r\nMAIL FROM:<{messages.SENDER}>\r\nRCPT TO:<{box}@{domain}>\r\n"
                "DATA\r\n".encode()
            )
            gevent.sleep(0.2)
            wire = msg.wire()
            sock.sendall(wire[: len(wire) // 2])
            # An abrupt close: a TCP reset (SO_LINGER 0) rather than a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def h_trickle(self, k: int, j: int) -> None:
        with self.connect(self.port) as sock:
            for b in b"EHLO trickle.bench.test\r\nMAIL FROM:<x@y.test>\r\n":
                if not self.running():
                    return
                sock.sendall(bytes([b]))
                self.pause(0.3)

    def h_reset(self, k: int, j: int) -> None:
        sock = self.connect(self.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def h_pop3_garbage(self, k: int, j: int) -> None:
        with self.connect(self.pop3_port) as sock:
            sock.sendall(b"\x00\xff garbage\r\nRETR 1\r\n" + b"A" * 5000 + b"\r\nUSER\r\n")
            self._drain(sock, 1.0)

    # ------------------------------------------------------------ running

    def windows(self) -> None:
        every = float(self.spec.get("window", 5.0))
        while True:
            gevent.sleep(every)
            self.flush_window()

    def flush_window(self) -> None:
        emit(
            {
                "t": "w",
                "time": time.time(),
                "smtp": [round(x, 5) for x in self.w_smtp],
                "pop3": [round(x, 5) for x in self.w_pop3],
                "acked": len(self.acked),
                "idle": self.idle_connected,
                "errors": sum(self.errors.values()),
                "pop3_sessions": self.pop3_sessions,
            }
        )
        self.w_smtp = []
        self.w_pop3 = []

    def watch_stdin(self) -> None:
        fd = sys.stdin.fileno()
        gos.make_nonblocking(fd)
        while True:
            try:
                data = gos.nb_read(fd, 4096)
            except OSError:
                data = b""
            if not data or b"stop" in data:
                self.stop.set()
                return

    def main(self) -> None:
        s = self.spec
        watcher = gevent.spawn(self.watch_stdin)
        reporter = gevent.spawn(self.windows)
        group = Group()
        for k in range(int(s["idle"])):
            group.spawn(self.guarded, self.idle, k)
        for k in range(int(s["senders"])):
            group.spawn(self.guarded, self.sender, k)
        for k in range(int(s["pop3_clients"])):
            group.spawn(self.guarded, self.pop3_client, k)
        for k in range(int(s["hostile"])):
            group.spawn(self.guarded, self.hostile, k)
        group.join(timeout=max(0.0, self.end - time.monotonic()) + self.io_timeout + 30)
        if len(group):
            self.error("deadline", f"{len(group)} clients still running")
            group.kill(timeout=5)
        reporter.kill()
        watcher.kill()
        self.flush_window()
        emit(
            {
                "t": "result",
                "acked": self.acked,
                "refused": self.refused,
                "unknown": self.unknown,
                "retrieved": self.retrieved,
                "uncommitted": self.uncommitted,
                "errors": dict(self.errors),
                "examples": self.examples,
                "hostile": dict(self.hostile_counts),
                "idle_reconnects": self.idle_reconnects,
                "pop3_sessions": self.pop3_sessions,
                "smtp_sessions": self.smtp_sessions,
                "cpu": sum(os.times()[:2]),
            }
        )

    def guarded(self, fn, k: int) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(k)
        except Exception as exc:  # a bug in the bench: counted, the run fails
            self.error(f"client crashed {type(exc).__name__}", exc)


class ReplyCounts:
    """The bit of `loadgen.Stats` a `loadgen.Session` counts replies in."""

    def __init__(self) -> None:
        self.codes: Counter[int] = Counter()


def main() -> None:
    raise_nofile()
    spec = json.loads(sys.stdin.readline())
    messages.pool()
    Soak(spec).main()


if __name__ == "__main__":
    main()
