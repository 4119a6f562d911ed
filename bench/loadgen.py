"""The load generator: one gevent process driving many SMTP (or POP3) clients over real sockets.

It is started by `bench.driver` (`python -m bench.loadgen`), reads its job as
one JSON line on stdin, and reports JSON lines on stdout: `p` (progress,
twice a second), `ready` (slow and idle clients: all connected), `result`.
Later lines on stdin: `stop` (end trickling / idle clients now).

Kinds of job:

- `load`: C sessions share a list of message numbers; each session sends
  messages (optionally pipelined, RFC 2920) until the list is used up.
- `slow`: C sessions that trickle every command and message a few bytes at a
  time until told to stop, then send the rest at once.
- `idle`: C sessions connect, EHLO and wait until told to stop, then QUIT.
- `flood`: hostile clients until told to stop (issue 19): `clients` tricklers,
  each connects from one of `sources` loopback addresses and sends a byte of
  an unfinished command line every `interval` seconds (times 0.5-1.5),
  never its end, and connects again when the server closes it; and `churn`
  clients that connect and drop in a loop (at once, with a reset, after
  the greeting, in the middle of a command), at most `churn_each` times
  each. What the server did to them is in the result's `flood`.
- `probe`: K fresh clients one after another, each a whole transaction
  (connect to 250), timed end to end.
- `pop3`: C POP3 sessions share a list of full mailboxes (`bench.mailboxes`);
  each takes the next one, logs in (USER/PASS), STAT, LIST, UIDL, RETRs every
  message and checks it byte for byte against what the bench stored, DELEs
  every message and QUITs; then the next mailbox. Each session comes from its
  own loopback address (127.0.0.2-251) as different users' clients would.

Every loop is bounded: by its list of messages, by `deadline` seconds for
the whole job, and by `io_timeout` on every socket operation.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import gevent  # noqa: E402
from gevent import os as gos  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from gevent.pool import Group  # noqa: E402

from bench import mailboxes, messages  # noqa: E402

perf = time.perf_counter

#: The phases of an SMTP session timed one by one (seconds, each time one ends):
#: connect to the 220 greeting, each command to its reply (`envelope`: MAIL,
#: RCPTs and DATA pipelined in one write, to the 354), and the end of DATA
#: (the final dot sent) to its 250.
PHASES = ("greeting", "ehlo", "mail", "rcpt", "data", "envelope", "dot")


class ProtocolError(Exception):
    pass


class ServerClosed(Exception):
    pass


class NotLoggedIn(Exception):
    """pop3: the session ended before PASS had its +OK (refused, dropped, timed out)."""


#: pop3: attempts per mailbox when the server does not log the session in
#: (as a mail program tries again at its next poll), a second apart.
LOGIN_ATTEMPTS = 5


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Stats:
    def __init__(self) -> None:
        self.ok = 0  # messages answered 250
        self.deliveries = 0  # ok x recipients
        self.bytes = 0  # wire octets of acknowledged messages
        self.latencies: list[float] = []
        self.codes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []
        self.acked: list[int] = []
        self.ack_times: list[float] = []  # time.time() of each 250 (the relay scenario)
        self.refused: list[int] = []
        self.connect_retries = 0
        self.sessions = 0  # pop3: sessions that ended with +OK to QUIT
        self.boxes_ok = 0  # pop3: mailboxes whose every message came back once, intact
        self.login_latencies: list[float] = []  # pop3: PASS to its +OK
        self.not_logged_in = 0  # pop3: sessions that ended before login (tried again)
        self.login_examples: list[str] = []
        #: Seconds per phase of a session (`PHASES`), each time it was seen.
        self.phases: dict[str, list[float]] = {}
        #: load: messages acknowledged by each session (client), so starvation shows.
        self.session_msgs: list[int] = []
        self.start = time.time()
        self.end = self.start

    def phase(self, name: str, seconds: float) -> None:
        self.phases.setdefault(name, []).append(seconds)

    def error(self, kind: str, detail: object = "") -> None:
        self.errors[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}"[:300])


class Session:
    """One SMTP client connection; replies are counted by code in `stats.codes`."""

    __slots__ = ("buf", "sock", "stats")

    def __init__(self, sock: socket.socket, stats: Stats) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.stats = stats

    def reply(self) -> int:
        """Read one whole (possibly multi-line) reply; return its code."""
        buf = self.buf
        while True:
            i = 0
            while True:
                e = buf.find(b"\r\n", i)
                if e < 0:
                    break
                if e - i >= 4 and buf[i + 3] == 0x2D:  # "250-..." continues
                    i = e + 2
                    continue
                try:
                    code = int(buf[i : i + 3])
                except ValueError:
                    raise ProtocolError(f"bad reply {bytes(buf[i:e])!r}") from None
                del buf[: e + 2]
                self.stats.codes[code] += 1
                return code
            data = self.sock.recv(65536)
            if not data:
                raise ServerClosed("server closed the connection")
            buf += data

    def expect(self, want: int, what: str) -> None:
        code = self.reply()
        if code != want:
            raise ProtocolError(f"{what}: {code}, expected {want}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Pop3:
    """One POP3 client connection: status lines and multi-line blocks."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ServerClosed("server closed the connection")
        self.buf += data

    def line(self) -> bytes:
        while True:
            e = self.buf.find(b"\r\n")
            if e >= 0:
                line = bytes(self.buf[:e])
                del self.buf[: e + 2]
                return line
            self.fill()

    def ok(self, what: str) -> bytes:
        line = self.line()
        if not line.startswith(b"+OK"):
            raise ProtocolError(f"{what}: {line[:200]!r}")
        return line

    def command(self, text: str, what: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.ok(what)

    def block(self) -> bytes:
        """The lines of a multi-line response up to the `.` line (CRLF, still stuffed)."""
        buf = self.buf
        start = 0
        while True:
            if buf[:3] == b".\r\n":  # an empty block (a lone "." inside is stuffed)
                del buf[:3]
                return b""
            e = buf.find(b"\r\n.\r\n", start)
            if e >= 0:
                body = bytes(buf[: e + 2])
                del buf[: e + 5]
                return body
            start = max(0, len(buf) - 4)
            self.fill()


class Job:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.host = spec["host"]
        self.port = spec["port"]
        self.run_id = spec["run_id"]
        self.io_timeout = float(spec.get("io_timeout", 60))
        self.deadline = time.monotonic() + float(spec.get("deadline", 600))
        self.stats = Stats()
        self.stop = Event()
        self.connected = 0
        self.ready = Event()
        self.connect_gate = Semaphore(int(spec.get("connect_concurrency", 200)))
        self.size = int(spec.get("size", 1024))
        self.nrcpt = int(spec.get("rcpts", 1))
        self.boxes = int(spec.get("mailboxes", messages.MAILBOXES))
        self.pipelining = bool(spec.get("pipelining", True))
        self.domain = str(spec.get("domain", messages.DOMAIN))  # relay: a remote domain
        self.flood: dict | None = None  # flood: what the server did to the hostile clients

    # ------------------------------------------------------------ helpers

    def source(self, k: int) -> str | None:
        """load: session k's own loopback address when the spec spreads them
        (`source_net` "127.0.4."; 2-251), else the kernel's choice."""
        net = self.spec.get("source_net")
        return f"{net}{2 + k % 250}" if net else None

    def connect(self, source: str | None = None) -> Session:
        last: Exception | None = None
        where = (source, 0) if source else None
        with self.connect_gate:
            for attempt in range(5):
                try:
                    sock = socket.create_connection(
                        (self.host, self.port), timeout=self.io_timeout, source_address=where
                    )
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return Session(sock, self.stats)
                except OSError as exc:
                    last = exc
                    self.stats.connect_retries += 1
                    gevent.sleep(0.05 * 2**attempt)
        raise ConnectionError(f"connect failed: {last}")

    def greet(self, s: Session, name: str, t0: float | None = None) -> None:
        """Read the 220 (`t0`: when the connect began, for its phase) and EHLO."""
        s.expect(220, "greeting")
        t1 = perf()
        if t0 is not None:
            self.stats.phase("greeting", t1 - t0)
        s.sock.sendall(f"EHLO {name}\r\n".encode())
        s.expect(250, "EHLO")
        self.stats.phase("ehlo", perf() - t1)

    def quit(self, s: Session) -> None:
        try:
            s.sock.sendall(b"QUIT\r\n")
            s.reply()
        except (OSError, ServerClosed, ProtocolError):
            pass
        s.close()

    def commands(self, rcpts: tuple[str, ...]) -> list[bytes]:
        out = [f"MAIL FROM:<{messages.SENDER}>\r\n".encode()]
        out += [f"RCPT TO:<{r}@{self.domain}>\r\n".encode() for r in rcpts]
        out.append(b"DATA\r\n")
        return out

    def transaction(self, s: Session, n: int) -> bool:
        """Send message n; record 250 as acked, an error reply as refused; whether acked."""
        st = self.stats
        rcpts = tuple(messages.recipients(n, self.nrcpt, self.boxes))
        msg = messages.build(self.run_id, n, self.size, rcpts)
        cmds = self.commands(rcpts)
        t0 = perf()
        if self.pipelining:
            s.sock.sendall(b"".join(cmds))
            codes = [s.reply() for _ in cmds]
            st.phase("envelope", perf() - t0)
        else:
            codes = []
            for c in cmds:
                t1 = perf()
                s.sock.sendall(c)
                codes.append(s.reply())
                st.phase(c[:4].decode().lower(), perf() - t1)  # mail, rcpt, data
                if codes[0] != 250:
                    break
        if codes[0] != 250 or codes[-1] != 354 or any(c != 250 for c in codes[1:-1]):
            st.refused.append(n)
            st.error("refused before DATA", f"{n}: {codes}")
            if codes[-1] == 354:  # should not happen: send an empty message to get out
                s.sock.sendall(b".\r\n")
                s.reply()
            return False
        if self.size <= 256 * 1024:
            s.sock.sendall(b"".join(msg.wire_chunks()) + b".\r\n")
        else:
            for chunk in msg.wire_chunks():
                s.sock.sendall(chunk)
            s.sock.sendall(b".\r\n")
        t_dot = perf()
        code = s.reply()
        if code == 250:
            t_end = perf()
            st.phase("dot", t_end - t_dot)
            st.latencies.append(t_end - t0)
            st.ok += 1
            st.deliveries += len(rcpts)
            st.bytes += msg.wire_len()
            st.acked.append(n)
            st.end = time.time()
            st.ack_times.append(st.end)
            return True
        st.refused.append(n)
        st.error(f"DATA answered {code}", n)
        return False

    # ------------------------------------------------------------ kinds

    def run_load(self) -> None:
        ids = iter(range(*self.spec["ids"]))
        clients = int(self.spec["clients"])

        def client(k: int) -> None:
            reconnects = 0
            sent = 0
            try:
                while reconnects < 3:
                    s = None
                    n = None
                    try:
                        t0 = perf()
                        s = self.connect(self.source(k))
                        s.sock.settimeout(self.io_timeout)
                        self.greet(s, f"c{k}.bench.test", t0)
                        for n in ids:
                            sent += self.transaction(s, n)
                            n = None
                        self.quit(s)
                        return
                    except (OSError, ServerClosed, ProtocolError, ConnectionError) as exc:
                        self.stats.error(type(exc).__name__, exc)
                        if n is not None:
                            self.stats.error("lost in flight", n)
                        reconnects += 1
                        if s is not None:
                            s.close()
                        gevent.sleep(0.1)
            finally:
                self.stats.session_msgs.append(sent)

        self.run_clients(client, clients)

    def run_probe(self) -> None:
        count = int(self.spec["clients"])
        first = int(self.spec["ids"][0])

        def probe(_k: int) -> None:
            for i in range(count):
                n = first + i
                t0 = perf()
                s = self.connect()
                try:
                    s.sock.settimeout(self.io_timeout)
                    self.greet(s, "probe.bench.test")
                    before = len(self.stats.latencies)
                    self.transaction(s, n)
                    if len(self.stats.latencies) > before:
                        self.stats.latencies[-1] = perf() - t0  # connect to 250
                finally:
                    self.quit(s)
                gevent.sleep(0.05)

        self.run_clients(probe, 1)

    def run_idle(self) -> None:
        clients = int(self.spec["clients"])

        def idle(k: int) -> None:
            s = self.connect()
            try:
                s.sock.settimeout(self.io_timeout)
                self.greet(s, f"idle{k}.bench.test")
                self.count_connected(clients)
                self.stop.wait(max(0.0, self.deadline - time.monotonic()))
                self.quit(s)
            finally:
                s.close()

        self.run_clients(idle, clients)

    def count_connected(self, clients: int) -> None:
        self.connected += 1
        if self.connected >= clients:
            self.ready.set()

    def trickle(self, s: Session, data: bytes, chunk: int, interval: float) -> None:
        pos = 0
        while pos < len(data):
            if self.stop.is_set():
                s.sock.sendall(data[pos:])
                return
            s.sock.sendall(data[pos : pos + chunk])
            pos += chunk
            gevent.sleep(interval * random.uniform(0.5, 1.5))

    def run_slow(self) -> None:
        ids = iter(range(*self.spec["ids"]))
        clients = int(self.spec["clients"])
        chunk = int(self.spec.get("chunk", 8))
        interval = float(self.spec.get("interval", 1.0))
        st = self.stats

        def slow(k: int) -> None:
            s = self.connect()
            n = None
            try:
                s.sock.settimeout(self.io_timeout)
                s.expect(220, "greeting")
                self.count_connected(clients)
                self.trickle(s, f"EHLO slow{k}.bench.test\r\n".encode(), chunk, interval)
                s.expect(250, "EHLO")
                for n in ids:
                    rcpts = tuple(messages.recipients(n, self.nrcpt, self.boxes))
                    msg = messages.build(self.run_id, n, self.size, rcpts)
                    t0 = perf()
                    for c in self.commands(rcpts):
                        self.trickle(s, c, chunk, interval)
                        code = s.reply()
                    if code != 354:
                        st.refused.append(n)
                        st.error("slow: refused before DATA", code)
                        n = None
                        continue
                    self.trickle(s, msg.wire() + b".\r\n", chunk, interval)
                    code = s.reply()
                    if code == 250:
                        st.latencies.append(perf() - t0)
                        st.ok += 1
                        st.deliveries += len(rcpts)
                        st.bytes += msg.wire_len()
                        st.acked.append(n)
                    else:
                        st.refused.append(n)
                        st.error(f"slow: DATA answered {code}", n)
                    n = None
                    if self.stop.is_set():
                        break
                self.quit(s)
            except (OSError, ServerClosed, ProtocolError) as exc:
                st.error("slow: " + type(exc).__name__, exc)
                if n is not None:
                    st.error("lost in flight", n)
            finally:
                s.close()

        self.run_clients(slow, clients)

    # ------------------------------------------------------------ flood

    def run_flood(self) -> None:
        sources = [str(a) for a in self.spec["sources"]]
        tricklers = int(self.spec["clients"])
        churners = int(self.spec.get("churn", 0))
        interval = float(self.spec.get("interval", 3.0))
        f = self.flood = {
            "admitted": 0,  # trickler connections greeted with 220
            "refused": Counter(),  # ... answered at once with anything else, by reply
            "cut": Counter(),  # ... closed by the server later, by its last reply
            "held_s": [],  # how long each cut trickler was held
            "first_round": 0,  # tricklers that made their first attempt
            "churned": 0,  # connect-and-drop attempts that connected
            "churn_failed": 0,  # ... that could not connect
        }

        def first_attempt() -> None:
            f["first_round"] += 1
            self.count_connected(tricklers)

        def trickler(k: int) -> None:
            source = sources[k % len(sources)]
            first = True
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    sock = socket.create_connection(
                        (self.host, self.port), timeout=self.io_timeout, source_address=(source, 0)
                    )
                except OSError as exc:
                    f["refused"][f"connect: {type(exc).__name__}"] += 1
                    if first:
                        first = False
                        first_attempt()
                    gevent.sleep(1.0)
                    continue
                with sock:
                    held = self.hold(sock, interval, f, first_attempt if first else None)
                first = False
                # Back soon when cut; later when refused, as the server asked.
                gevent.sleep(random.uniform(0.1, 1.0) if held else random.uniform(1.0, 3.0))

        def churner(k: int) -> None:
            for i in range(int(self.spec.get("churn_each", 1000))):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                source = sources[(k * 7 + i) % len(sources)]
                try:
                    sock = socket.create_connection(
                        (self.host, self.port), timeout=self.io_timeout, source_address=(source, 0)
                    )
                except OSError:
                    f["churn_failed"] += 1
                    gevent.sleep(0.5)
                    continue
                f["churned"] += 1
                with sock:
                    kind = i % 4
                    if kind == 1:  # a reset instead of a FIN
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    try:
                        if kind >= 2:
                            sock.settimeout(5)
                            sock.recv(4096)  # the greeting (or a refusal)
                        if kind == 3:
                            sock.sendall(b"MAIL FROM:<drop@")
                    except OSError:
                        pass
                gevent.sleep(random.uniform(0.2, 0.6))

        group = Group()
        for k in range(churners):
            group.spawn(self.guarded, churner, k)
        self.run_clients(trickler, tricklers)
        group.join(timeout=30)
        group.kill(timeout=5)
        f["refused"] = dict(f["refused"])
        f["cut"] = dict(f["cut"])

    def hold(self, sock: socket.socket, interval: float, f: dict, first) -> bool:  # type: ignore[no-untyped-def]
        """One trickler connection: the greeting, then a byte every `interval`
        (times 0.5-1.5) of a line that never ends, until the server closes it
        or the job stops; whether the server admitted it."""
        sock.settimeout(self.io_timeout)
        buf = b""
        try:
            while b"\r\n" not in buf:
                data = sock.recv(4096)
                if not data:
                    break
                buf += data
        except OSError as exc:
            buf = f"{type(exc).__name__}".encode()
        if first is not None:
            first()
        if not buf.startswith(b"220 "):
            f["refused"][buf[:9].decode(errors="replace") or "closed"] += 1
            return False
        f["admitted"] += 1
        since = time.monotonic()
        line = b"EHLO slowloris.bench.test " * 20  # 520 octets: a byte at a time, never the end
        said = b""
        pos = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            sock.settimeout(interval * random.uniform(0.5, 1.5))
            try:
                data = sock.recv(4096)
            except TimeoutError:
                try:
                    sock.send(line[pos % len(line) : pos % len(line) + 1])
                except OSError:
                    said = b"send failed"
                    break
                pos += 1
                continue
            except OSError as exc:
                said = type(exc).__name__.encode()
                break
            said += data
            if not data or b"\r\n" in said:
                break
        else:
            return True  # still held when the job stopped
        f["cut"][said[:9].decode(errors="replace") or "closed"] += 1
        f["held_s"].append(round(time.monotonic() - since, 3))
        return True

    # ------------------------------------------------------------ pop3

    def run_pop3(self) -> None:
        boxes = iter(range(*self.spec["boxes"]))
        clients = int(self.spec["clients"])

        st = self.stats

        def client(_k: int) -> None:
            for i in boxes:
                t0 = perf()
                for attempt in range(1, LOGIN_ATTEMPTS + 1):
                    try:
                        self.pop3_session(i, t0)
                    except NotLoggedIn as exc:
                        st.not_logged_in += 1
                        if len(st.login_examples) < 5:
                            st.login_examples.append(f"{mailboxes.box(i)}: {exc}"[:300])
                        if attempt == LOGIN_ATTEMPTS:
                            st.error("no login", f"{mailboxes.box(i)}: {attempt} attempts")
                        else:
                            gevent.sleep(1.0)
                            continue
                    except (OSError, ServerClosed, ProtocolError, ConnectionError) as exc:
                        st.error(type(exc).__name__, f"{mailboxes.box(i)}: {exc}")
                    break
                if self.stop.is_set():
                    return

        self.run_clients(client, clients)

    def pop3_session(self, i: int, t0: float) -> None:
        """Empty mailbox i: log in, STAT, LIST, UIDL, RETR and check each, DELE each, QUIT.

        NotLoggedIn when the session ends before PASS had its +OK."""
        st = self.stats
        name = mailboxes.box(i)
        per_box = int(self.spec["per_box"])
        fixed = self.spec.get("fixed_size")
        expected = range(i * per_box, (i + 1) * per_box)
        loopback = self.host.startswith("127.")
        try:
            s = self.connect(f"127.0.0.{2 + i % 250}" if loopback else None)
        except ConnectionError as exc:
            raise NotLoggedIn(exc) from exc
        p = Pop3(s.sock)
        try:
            s.sock.settimeout(self.io_timeout)
            try:
                p.ok("greeting")
                p.command(f"USER {name}", "USER")
                t1 = perf()
                p.command(f"PASS {mailboxes.password(name)}", "PASS")
            except (OSError, ServerClosed, ProtocolError) as exc:
                raise NotLoggedIn(f"{type(exc).__name__}: {exc}") from exc
            st.login_latencies.append(perf() - t1)
            stat = p.command("STAT", "STAT").split()
            count, total = int(stat[1]), int(stat[2])
            p.command("LIST", "LIST")
            sizes = dict(line.split() for line in p.block().split(b"\r\n")[:-1])
            p.command("UIDL", "UIDL")
            uidls = dict(line.split() for line in p.block().split(b"\r\n")[:-1])
            if count != per_box or len(sizes) != count or len(set(uidls.values())) != count:
                st.error("STAT/LIST/UIDL", f"{name}: {count} {len(sizes)} {len(uidls)}")
            if total != sum(int(v) for v in sizes.values()):
                st.error("STAT size is not the sum of LIST", name)
            seen: set[int] = set()
            for m in range(1, count + 1):
                p.command(f"RETR {m}", "RETR")
                stored = mailboxes.decode(p.block())
                eol = stored.find(b"\n")
                if not stored.startswith(b"X-Bench-Id: "):
                    st.error("RETR: not a bench message", f"{name} #{m}")
                    continue
                run, _, num = stored[12:eol].decode("ascii", "replace").rpartition(".")
                n = int(num) if num.isdigit() else -1
                if run != self.run_id or n not in expected or n in seen:
                    st.error("RETR: foreign or repeated message", f"{name} #{m}: {run}.{num}")
                    continue
                if stored != mailboxes.content(self.run_id, n, name, fixed):
                    st.error("RETR: content differs", f"{name} #{m}: message {n}")
                    continue
                if int(sizes.get(b"%d" % m, -1)) != mailboxes.crlf_size(stored):
                    st.error("LIST size differs from the message's", f"{name} #{m}")
                seen.add(n)
                st.ok += 1
                st.bytes += len(stored)
            for m in range(1, count + 1):
                p.command(f"DELE {m}", "DELE")
            p.command("QUIT", "QUIT")
            st.sessions += 1
            st.latencies.append(perf() - t0)
            st.end = time.time()
            if len(seen) == per_box:
                st.boxes_ok += 1
            else:
                st.error("mailbox not retrieved whole", f"{name}: {len(seen)} of {per_box}")
        finally:
            s.close()

    # ------------------------------------------------------------ running

    def run_clients(self, fn, count: int) -> None:  # type: ignore[no-untyped-def]
        group = Group()
        for k in range(count):
            group.spawn(self.guarded, fn, k)
        group.join(timeout=max(0.0, self.deadline - time.monotonic()))
        if len(group):
            self.stats.error("deadline", f"{len(group)} clients still running")
            self.stop.set()
            group.join(timeout=10)
            group.kill(timeout=5)

    def guarded(self, fn, k: int) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(k)
        except (OSError, ServerClosed, ProtocolError, ConnectionError) as exc:
            self.stats.error(type(exc).__name__, exc)

    def watch_stdin(self) -> None:
        fd = sys.stdin.fileno()
        gos.make_nonblocking(fd)
        buf = b""
        while True:
            try:
                data = gos.nb_read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                self.stop.set()  # the driver went away: wind down
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip() == b"stop":
                    self.stop.set()

    def report_progress(self) -> None:
        while True:
            emit(
                {
                    "t": "p",
                    "ok": self.stats.ok,
                    "err": sum(self.stats.errors.values()),
                    "c": self.connected,
                    "s": self.stats.sessions,
                }
            )
            if self.ready.is_set():
                emit({"t": "ready", "connected": self.connected})
                self.ready.clear()
            gevent.sleep(0.5)

    def main(self) -> None:
        kind = self.spec["kind"]
        watcher = gevent.spawn(self.watch_stdin)
        reporter = gevent.spawn(self.report_progress)
        self.stats.start = time.time()
        self.stats.end = self.stats.start
        t0 = os.times()
        try:
            getattr(self, f"run_{kind}")()
        finally:
            reporter.kill()
            watcher.kill()
        if kind not in ("load", "pop3"):  # those end at their last 250 / QUIT
            self.stats.end = time.time()
        t = os.times()
        st = self.stats
        emit(
            {
                "t": "result",
                "kind": kind,
                "start": st.start,
                "end": st.end,
                "ok": st.ok,
                "deliveries": st.deliveries,
                "bytes": st.bytes,
                "latencies": st.latencies,
                "codes": {str(k): v for k, v in st.codes.items()},
                "errors": dict(st.errors),
                "examples": st.examples,
                "acked": st.acked,
                "ack_times": [round(t, 4) for t in st.ack_times],
                "refused": st.refused,
                "connect_retries": st.connect_retries,
                "connected": self.connected,
                "sessions": st.sessions,
                "boxes_ok": st.boxes_ok,
                "login_latencies": st.login_latencies,
                "not_logged_in": st.not_logged_in,
                "login_examples": st.login_examples,
                "phases": {k: [round(x, 6) for x in v] for k, v in st.phases.items()},
                "session_msgs": st.session_msgs,
                "cpu": t.user + t.system - t0.user - t0.system,
                **({"flood": self.flood} if self.flood is not None else {}),
            }
        )


def main() -> None:
    raise_nofile()
    line = sys.stdin.readline()
    spec = json.loads(line)
    messages.pool()  # build the pool before the clock starts
    Job(spec).main()


if __name__ == "__main__":
    main()
