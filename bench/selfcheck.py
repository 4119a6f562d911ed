"""`python -m bench selfcheck`: the bench checks itself, no server needed.

The wire form of each message, un-stuffed and with LF endings the way a
server stores it, must pass the verifier; a flipped byte, a duplicate, a
missing or an extra message must each fail it. The relay sink must record
every message's id once, pipelined or not, and the relay check must report a
lost, a duplicated and an unacknowledged message. The POP3 client must empty
a toy POP3 server's Maildirs cleanly, and catch a flipped byte, a line left
unstuffed, a missing message, and messages left behind, and log in again
after a refused login.
"""

from __future__ import annotations

import shutil
import socketserver
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from . import mailboxes, messages
from .mailboxes import crlf_size
from .verify import verify_bench_mail


def store_like_a_server(root: Path, msg: messages.Message, name: str) -> None:
    """What a Maildir server does with the wire bytes: trace header, unstuff, LF."""
    lines = msg.wire().split(b"\r\n")
    assert lines[-1] == b""
    text = b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    data = b"Return-Path: <x>\nReceived: from test\n\tby selfcheck; date\n" + text
    for box in msg.rcpts:
        new = root / box / "new"
        new.mkdir(parents=True, exist_ok=True)
        (new / name).write_bytes(data)
        (root / box / "tmp").mkdir(exist_ok=True)


def main(usage: Callable[[list[str]], str | None]) -> int:
    """Every check; `usage` is the CLI's own usage check of a `run` command
    line (given by `bench/cli.py`, which this module does not import)."""
    failures = []
    root = Path(tempfile.mkdtemp(prefix="bench-selfcheck-"))
    try:
        run = "selfcheck-1"
        acked = {}
        sizes = [1, 100, 1024, 70_000, 300_000]
        for n in range(60):
            size = sizes[n % len(sizes)]
            rcpts = messages.recipients(n, 1 + n % 5)
            msg = messages.build(run, n, size, rcpts)
            wire = msg.wire()
            assert msg.wire_len() == len(wire), "wire_len"
            assert b"\r\n.\r\n" not in wire, "an unstuffed lone dot"
            store_like_a_server(root, msg, f"m{n}")
            acked[n] = (size, tuple(rcpts))
        v = verify_bench_mail(root, run, acked)
        if not v.ok:
            failures.append(f"clean store fails: {v.summary()} {v.examples}")

        def expect_failure(what: str, kind: str) -> None:
            v = verify_bench_mail(root, run, acked)
            if v.ok or kind not in v.problems:
                failures.append(f"{what}: not caught ({v.summary()})")

        victim = next((root / "u000" / "new").iterdir())
        good = victim.read_bytes()
        victim.write_bytes(good[:-10] + bytes([good[-10] ^ 1]) + good[-9:])
        expect_failure("flipped byte", "body checksum")
        victim.write_bytes(good)
        shutil.copy(victim, victim.with_name("dup"))
        expect_failure("duplicate", "duplicate")
        victim.with_name("dup").unlink()
        victim.unlink()
        expect_failure("missing", "missing")
        victim.write_bytes(good)
        (root / "u000" / "tmp" / "partial").write_bytes(b"x")
        expect_failure("left in tmp", "left in tmp/")
        (root / "u000" / "tmp" / "partial").unlink()
        extra = messages.build(run, 999, 100, ["u000"])
        store_like_a_server(root, extra, "extra")
        expect_failure("not acknowledged", "not acknowledged")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    failures += check_relay_sink()
    failures += check_relay_options(usage)
    failures += check_pop3_client()
    failures += check_soak()
    for f in failures:
        print("selfcheck FAILED:", f)
    if not failures:
        print(
            "selfcheck ok: messages round-trip through un-stuffing; the verifier catches faults; "
            "the relay sink records every id, counts connections, delays its replies and still "
            "serves connections at once; smtp-sink's counters are read; the relay check catches "
            "loss and duplicates, and a count that does not match; "
            "the POP3 client and the Maildir check catch corrupt, missing and left-over mail; "
            "the soak's check catches loss, duplicates and misdelivery, its flatness a leak"
        )
    return 1 if failures else 0


def check_relay_sink() -> list[str]:
    """Messages pipelined several to a write, and one by smtplib, reach the sink's
    record once each; the relay check flags loss, duplicates, unacknowledged."""
    import smtplib
    import socket

    from .driver import Outcome
    from .scenarios import _relay_row
    from .servers import HOST, RelaySink

    failures: list[str] = []
    run = "selfcheck-relay"
    sink = RelaySink()
    try:
        sink.start()
        wire = b""
        for n in range(5):
            msg = messages.build(run, n, [10, 1024, 70_000][n % 3], ["u000"])
            wire += (
                b"MAIL FROM:<a@b>\r\nRCPT TO:<u000@remote.test>\r\nDATA\r\n" + msg.wire() + b".\r\n"
            )
        with socket.create_connection((HOST, sink.port), timeout=10) as s:
            s.sendall(b"EHLO selfcheck\r\n" + wire + b"QUIT\r\n")
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        if got.count(b"\r\n250 2.0.0 Ok: queued") != 5:
            failures.append(f"sink: 5 pipelined messages, replies {got[-300:]!r}")
        with smtplib.SMTP(HOST, sink.port, timeout=10) as c:
            c.sendmail("a@b", ["u001@remote.test"], messages.build(run, 5, 2000, ["u001"]).wire())
        sink.stop()
        ids = [i for i, _t in sink.records()]
        if sorted(ids) != [f"{run}.{n}" for n in range(6)]:
            failures.append(f"sink recorded {ids}")
        records = sink.records()
        conns = sink.connections()
        want_conns = {"connections": 2, "messages": 6, "per_connection": {1: 1, 5: 1}}
        if conns != want_conns:
            failures.append(f"sink connection counts: {conns}, not {want_conns}")
    except Exception as exc:
        failures.append(f"sink: {exc!r}")
        return failures
    finally:
        sink.stop()
        shutil.rmtree(sink.root, ignore_errors=True)

    class _Srv:
        name = "selfcheck"

    def verdict(acked: range, recs: list[tuple[str, float]]) -> dict:
        o = Outcome(start=records[0][1] - 1, end=records[-1][1])
        o.acked = {n: (100, ("u000",)) for n in acked}
        return _relay_row(_Srv(), o, {}, recs, run, 0)  # type: ignore[arg-type]

    # Sessions and messages per worker, from a geosmtp access log.
    from .servers import Geosmtp

    geo = Geosmtp()
    try:
        (geo.root / "logs").mkdir()
        (geo.root / "logs" / "access.log").write_text(
            "2026-01-01T00:00:00.000+0000 session=0004D21 client=127.0.0.1 result=250\n"
            "2026-01-01T00:00:00.000+0000 session=0004D21 client=127.0.0.1 result=250\n"
            "2026-01-01T00:00:00.000+0000 session=0004D22 client=127.0.0.1 result=451\n"
            "2026-01-01T00:00:00.000+0000 session=00162E1 client=127.0.0.1 result=250\n"
            "2026-01-01T00:00:00.000+0000 queue=X to=<a@b> result=sent\n"
        )
        want = {"1234": {"sessions": 2, "messages": 2}, "5678": {"sessions": 1, "messages": 1}}
        if geo.workers() != want:
            failures.append(f"per-worker counts from the access log: {geo.workers()}")
    finally:
        geo.stop()
        shutil.rmtree(geo.root, ignore_errors=True)

    if not verdict(range(6), records)["ok"]:
        failures.append("relay check: a clean run fails")
    r = verdict(range(6), records[1:])
    if r["ok"] or r["missing"] != 1:
        failures.append("relay check: a lost message not caught")
    r = verdict(range(6), records + records[:1])
    if r["ok"] or r["duplicates"] != 1:
        failures.append("relay check: a duplicate not caught")
    r = verdict(range(5), records)
    if r["ok"] or r["unacked_delivered"] != 1:
        failures.append("relay check: an unacknowledged delivery not caught")
    return failures


class _ToyPop3(socketserver.StreamRequestHandler):
    """Just enough POP3 (RFC 1939) over `server.mail_dir`, with one fault on demand."""

    def handle(self) -> None:
        srv = self.server
        fault = srv.fault  # type: ignore[attr-defined]
        self.wfile.write(b"+OK toy\r\n")
        box: Path | None = None
        files: list[Path] = []
        deleted: set[int] = set()
        for raw in self.rfile:
            cmd, _, arg = raw.strip().decode().partition(" ")
            cmd = cmd.upper()
            if cmd == "USER":
                box = srv.mail_dir / arg  # type: ignore[attr-defined]
                out = b"+OK\r\n"
            elif cmd == "PASS" and fault == "busy" and box not in srv.refused:  # type: ignore[attr-defined]
                srv.refused.add(box)  # type: ignore[attr-defined]
                out = b"-ERR [SYS/TEMP] busy, try later\r\n"
            elif cmd == "PASS" and box is not None:
                files = sorted((box / "new").iterdir())
                if fault == "missing":
                    files = files[1:]
                out = b"+OK\r\n"
            elif cmd == "STAT":
                size = sum(crlf_size(f.read_bytes()) for f in files)
                out = b"+OK %d %d\r\n" % (len(files), size)
            elif cmd in ("LIST", "UIDL"):
                out = b"+OK\r\n" + b"".join(
                    b"%d %s\r\n"
                    % (i, (b"%d" % crlf_size(f.read_bytes())) if cmd == "LIST" else f.name.encode())
                    for i, f in enumerate(files, 1)
                )
                out += b".\r\n"
            elif cmd == "RETR":
                data = files[int(arg) - 1].read_bytes()
                if fault == "flip" and arg == "2":
                    data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
                lines = data.split(b"\n")[:-1]
                if fault != "nostuff":
                    lines = [b"." + x if x.startswith(b".") else x for x in lines]
                out = b"+OK\r\n" + b"".join(x + b"\r\n" for x in lines) + b".\r\n"
            elif cmd == "DELE":
                deleted.add(int(arg))
                out = b"+OK\r\n"
            elif cmd == "QUIT":
                if fault != "keep":
                    for i in deleted:
                        files[i - 1].unlink()
                self.wfile.write(b"+OK\r\n")
                return
            else:
                out = b"-ERR\r\n"
            self.wfile.write(out)


def check_pop3_client() -> list[str]:
    """The pop3 scenario's client against a toy server: clean, then each fault."""
    from .driver import run_jobs
    from .servers import HOST

    failures: list[str] = []
    sizes = [mailboxes.size(n) for n in range(2000)]
    if min(sizes) < mailboxes.MIN_SIZE or max(sizes) > mailboxes.MAX_SIZE:
        failures.append(f"pop3 sizes out of range: {min(sizes)}..{max(sizes)}")
    for fault, want in [
        ("none", None),
        ("busy", None),  # each first login refused: tried again, then clean
        ("flip", "RETR: content differs"),
        ("nostuff", None),  # any error: the stream is out of step
        ("missing", "STAT/LIST/UIDL"),
        ("keep", "left"),
    ]:
        root = Path(tempfile.mkdtemp(prefix="bench-selfcheck-pop3-"))
        server = socketserver.ThreadingTCPServer((HOST, 0), _ToyPop3)
        server.daemon_threads = True
        server.mail_dir = root  # type: ignore[attr-defined]
        server.fault = fault  # type: ignore[attr-defined]
        server.refused = set()  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        try:
            thread.start()
            run = f"selfcheck-pop3-{fault}"
            mailboxes.populate(root, run, 3, per_box=4)
            spec = {"kind": "pop3", "host": HOST, "port": server.server_address[1]}
            spec.update(run_id=run, clients=2, boxes=[0, 3, 1], per_box=4, deadline=60)
            outcome, _ = run_jobs([spec], f"selfcheck pop3 {fault}", 90)
            emptied = mailboxes.check_emptied(root, 3)
            errors = " ".join(outcome.errors)
            clean = not outcome.errors and outcome.boxes_ok == 3 and emptied.ok
            if fault in ("none", "busy") and not clean:
                failures.append(f"pop3 client, {fault}: {outcome.examples} {emptied.summary()}")
            elif fault == "busy" and outcome.not_logged_in != 3:
                failures.append(f"pop3 client: {outcome.not_logged_in} refused logins, not 3")
            elif fault == "keep" and emptied.ok:
                failures.append("pop3 check: messages left behind not caught")
            elif fault not in ("none", "busy", "keep") and (clean or (want and want not in errors)):
                failures.append(f"pop3 client, fault {fault}: not caught ({errors or 'clean'})")
        finally:
            server.shutdown()
            server.server_close()
            shutil.rmtree(root, ignore_errors=True)
    return failures


SINK_DELAY = 0.3  # seconds: far above loopback's round trip, far below the 2 s probe


def check_relay_options(usage: Callable[[list[str]], str | None]) -> list[str]:
    """The relay's next hops and options (issue 20): the sink's `--delay`
    (every reply late, in order, connections served at once), smtp-sink's
    counters, the check by count, and the usage errors."""
    failures = check_sink_delay()
    failures += check_smtp_sink_counters()
    failures += check_counted_row()

    cases = {
        "relay --sink-delay 0.05": None,
        "relay --client smtp-source --sink smtp-sink --server-workers 2": None,
        "throughput --sink-delay 0.05": "relay scenario only",
        "throughput --server-workers 1": "relay scenario only",
        "relay --sink smtp-sink --sink-delay 0.05": "bench/sink.py only",
        "relay --sink-delay -1": "0 or more",
        "relay --server-workers 0": "1 or more",
    }
    for argv, want in cases.items():
        got = usage(["run", *argv.split()])
        if (got is None) != (want is None) or (want and want not in (got or "")):
            failures.append(f"usage: `{argv}` gives {got!r}, not {want!r}")
    return failures


def check_sink_delay() -> list[str]:
    """Three connections at once to a sink with a delay: each greeting comes
    after the delay but all three together (not one after another); a
    pipelined transaction's replies come late, whole and in order."""
    import socket
    import time

    from .servers import HOST, RelaySink
    from .sink import EHLO

    failures: list[str] = []
    sink = RelaySink(delay=SINK_DELAY)
    run = "selfcheck-delay"
    want = EHLO + b"250 2.0.0 Ok\r\n" * 2 + b"354 End data with <CR><LF>.<CR><LF>\r\n"
    want += b"250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"
    try:
        sink.start()
        t0 = time.monotonic()
        socks = [socket.create_connection((HOST, sink.port), timeout=5) for _ in range(3)]
        greeted = []
        for s in socks:
            if not s.recv(1024).startswith(b"220"):
                failures.append("sink with a delay: no greeting")
            greeted.append(time.monotonic() - t0)
        if min(greeted) < SINK_DELAY or max(greeted) > 2 * SINK_DELAY:
            failures.append(f"sink with a delay {SINK_DELAY}: greetings after {greeted} s")
        for n, s in enumerate(socks):
            msg = messages.build(run, n, 500, ["u000"])
            t1 = time.monotonic()
            s.sendall(
                b"EHLO selfcheck\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u000@remote.test>\r\nDATA\r\n"
                + msg.wire()
                + b".\r\nQUIT\r\n"
            )
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            took = time.monotonic() - t1
            if got != want:
                failures.append(f"sink with a delay: replies {got!r}")
            if took < SINK_DELAY:
                failures.append(f"sink with a delay: replies after {took:.3f} s")
            s.close()
        sink.stop()
        ids = sorted(i for i, _t in sink.records())
        if ids != [f"{run}.{n}" for n in range(3)]:
            failures.append(f"sink with a delay recorded {ids}")
        if sink.connections().get("per_connection") != {1: 3}:
            failures.append(f"sink with a delay: connections {sink.connections()}")
    except Exception as exc:
        failures.append(f"sink with a delay: {exc!r}")
    finally:
        sink.stop()
        shutil.rmtree(sink.root, ignore_errors=True)
    return failures


def check_smtp_sink_counters() -> list[str]:
    """smtp-sink's `-c` output as it writes it (a line per update, CR between),
    and a real smtp-sink when it is installed: 3 messages over 2 sessions."""
    import smtplib

    from .servers import HOST, SmtpSinkNextHop

    failures: list[str] = []
    hop = SmtpSinkNextHop()
    try:
        (hop.root / "server.out").write_bytes(
            b"sess=0 quit=0 mesg=1\rsess=1 quit=1 mesg=1\rsess=1 quit=1 mesg=12\r"
        )
        if hop.counters() != {"sess": 1, "quit": 1, "mesg": 12} or hop.received() != 12:
            failures.append(f"smtp-sink counters read as {hop.counters()}")
        if hop.connections() != {"connections": 0, "messages": 12}:
            failures.append(f"smtp-sink connections read as {hop.connections()}")
    finally:
        hop.stop()
        shutil.rmtree(hop.root, ignore_errors=True)
    if not SmtpSinkNextHop.available():
        return failures
    hop = SmtpSinkNextHop()
    try:
        hop.start()
        with smtplib.SMTP(HOST, hop.port, timeout=10) as c:
            for n in range(2):
                c.sendmail(
                    "a@b", ["u000@remote.test"], messages.build("sc", n, 100, ["u000"]).wire()
                )
        with smtplib.SMTP(HOST, hop.port, timeout=10) as c:
            c.sendmail("a@b", ["u000@remote.test"], messages.build("sc", 2, 100, ["u000"]).wire())
        received = hop.received()
        hop.stop()
        if received != 3 or hop.connections() != {"connections": 2, "messages": 3}:
            failures.append(f"smtp-sink: {received} messages, {hop.connections()}")
    except Exception as exc:
        failures.append(f"smtp-sink: {exc!r}")
    finally:
        hop.stop()
        shutil.rmtree(hop.root, ignore_errors=True)
    return failures


def check_counted_row() -> list[str]:
    """The check by count passes when the sink has as many as were
    acknowledged, and fails with fewer or more."""
    from .driver import Outcome
    from .scenarios import _relay_counted_row

    class _Srv:
        name = "selfcheck"

    class _Hop:
        def __init__(self, n: int) -> None:
            self.n = n

        def received(self) -> int:
            return self.n

        def last_time(self) -> float:
            return 12.0

    failures = []
    o = Outcome(start=10.0, end=11.0, ok=5)
    o.acked = {n: (100, ("u000@remote.test",)) for n in range(5)}
    for n, ok in ((5, True), (4, False), (6, False)):
        row = _relay_counted_row(_Srv(), o, {}, _Hop(n), 0)  # type: ignore[arg-type]
        if row["ok"] != ok or row["missing"] is not None:
            failures.append(f"counted check: {n} at the sink for 5: {row['verify']}")
        if abs(row["delivery_per_s"] - n / 2) > 1e-9:
            failures.append(f"counted check: delivered {row['delivery_per_s']}/s, not {n / 2}")
    return failures


def check_soak() -> list[str]:
    """The soak's delivery check and its flatness verdict, on made-up runs."""
    from . import soak
    from .soak_traffic import HOSTILE_BASE, rcpt_of

    failures: list[str] = []
    run, users = "selfcheck-soak", 4
    root = Path(tempfile.mkdtemp(prefix="bench-selfcheck-soak-"))
    try:
        # 0..7 acknowledged: even ones local (2 retrieved, 2 left in the Maildir), odd to the sink.
        for n in (4, 6):
            box, _domain = rcpt_of(n, users)
            msg = messages.build(run, n, mailboxes.size(n), (box,))
            store_like_a_server(root, msg, f"m{n}")
        sink = [(f"{run}.{n}", 0.0) for n in (1, 3, 5, 7)]
        result = {"acked": list(range(8)), "refused": [8], "unknown": [9]}
        result["retrieved"] = [[rcpt_of(n, users)[0], n] for n in (0, 2)]

        def verdict(**change: object) -> dict:
            return soak._check(root, run, users, {**result, **change}, change_sink or sink, 0)

        change_sink: list = []
        if verdict()["problems"]:
            failures.append(f"soak check, clean run: {verdict()['problems']}")
        for what, change, want in [
            ("lost", {"acked": [*range(8), 10]}, "lost"),
            ("retrieved and still there", {"retrieved": [["p0000", 0], ["p0002", 4]]}, "dup"),
            (
                "refused but delivered",
                {"acked": [0, 2, 3, 4, 5, 6, 7], "refused": [1]},
                "delivered although refused",
            ),
            ("never sent", {"acked": list(range(7))}, "delivered, never sent"),
            ("wrong mailbox", {"retrieved": [["p0003", 0], [rcpt_of(2, users)[0], 2]]}, "wrong"),
        ]:
            problems = " ".join(verdict(**change)["problems"])
            if want not in problems:
                failures.append(f"soak check, {what}: not caught ({problems or 'clean'})")
        change_sink = [*sink, (f"{run}.{HOSTILE_BASE + 3}", 0.0)]
        if "cut-off" not in " ".join(verdict()["problems"]):
            failures.append("soak check: a delivered cut-off message not caught")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # Flatness: 30 minutes sampled every 5 s; a leak of 10 MB over the run is caught,
    # noise and a warm-up rise are not.
    times = [5.0 * i for i in range(361)]
    flat = [
        [t, 40 + (10 * t / 600 if t < 600 else 10) + (3 if i % 7 == 0 else 0)]
        for i, t in enumerate(times)
    ]
    leak = [[t, 50 + 10 * t / 1800] for t in times]
    got = soak._flatness({"w rss_mb": flat, "v rss_mb": leak}, 1800)
    if not got["w rss_mb"]["flat"]:
        failures.append(f"soak flatness: warm-up and noise called growth: {got['w rss_mb']}")
    if got["v rss_mb"]["flat"]:
        failures.append(f"soak flatness: a 10 MB leak not caught: {got['v rss_mb']}")
    return failures
