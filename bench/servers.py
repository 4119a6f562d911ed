"""The servers under test, each started the same way: a fresh temp dir, a free
loopback port, a subprocess, and "ready" once it answers 220.

- `geosmtp`: `python -m geosmtp -c cfg.yaml` (log level WARNING, fsync on): a
  master and one worker per core; `geosmtp+w1` one worker, `geosmtp+reuseport`
  a SO_REUSEPORT socket per worker.
- `aiosmtpd`: `python bench/peers/aiosmtpd_maildir.py` (same durability).
- `smtp-sink`: Postfix's test sink, stores nothing: the protocol's ceiling.
- `postfix`: a private Postfix instance (its own config and queue dirs under
  the temp dir) delivering to virtual Maildirs; needs root and the postfix
  package. Its 250 means "queued"; delivery to the Maildir follows, and the
  bench waits for the queue to drain before it checks the Maildir.
- `dovecot`: POP3 only (the pop3 scenario): a private Dovecot
  (`bench/peers/dovecot.py`) serving the same Maildirs and users, as
  packaged (a process per connection); `dovecot-perf`: the same in its
  high-performance mode.

The relay scenario's next hop: `bench/sink.py` (`RelaySink`: every message's
X-Bench-Id, a reply delay, connection counts) or Postfix's `smtp-sink -c`
(`SmtpSinkNextHop`: a message count).

A server's CPU and memory are its process tree's: the process the bench
started and all its descendants (geosmtp's master and workers, Postfix's
master and its daemons), summed from /proc.

For the pop3 scenario a server gets `pop3_port` and `pop3_users` (user ->
argon2id hash) before it starts; geosmtp then also listens for POP3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import yaml

from . import probe
from .peers import dovecot as dovecot_peer

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HOST = "127.0.0.1"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Deliveries at once to the relay sink: Postfix's default destination concurrency.
RELAY_CONCURRENCY = 20


def free_port() -> int:
    return probe.free_port(HOST)


def greets(port: int, timeout: float = 2.0) -> bool:
    """Does an SMTP server answer 220 on the port?"""
    return probe.greets(HOST, port, b"220", timeout)


# ---------------------------------------------------------------- /proc


def proc_mem(pid: int) -> dict[str, int]:
    """Rss and Pss in kB from smaps_rollup (falls back to status)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in (
                    "Rss",
                    "Pss",
                    "Pss_Anon",
                    "Anonymous",
                    "Shared_Clean",
                    "Shared_Dirty",
                    "Private_Clean",
                    "Private_Dirty",
                ):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, _, rest = line.partition(":")
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def tree_status(pid: int) -> dict[str, int]:
    """`proc_mem` summed over `pid` and its descendants (kB; VmHWM is the sum of
    each process's peak, so at least the tree's peak), and `procs`: how many."""
    out: dict[str, int] = {"procs": 0}
    for p in probe.process_tree(pid):
        m = proc_mem(p)
        if not m:
            continue  # ended meanwhile
        out["procs"] += 1
        for key, kb in m.items():
            out[key] = out.get(key, 0) + kb
    return out


def tree_rss(pid: int) -> int:
    """VmRSS in kB summed over the tree (from status only: cheap to sample)."""
    total = 0
    for p in probe.process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            pass
    return total


def tree_by_process(pid: int, key: str) -> dict[int, int]:
    """One `proc_mem` figure (kB) of each process of the tree."""
    out = {}
    for p in probe.process_tree(pid):
        kb = proc_mem(p).get(key)
        if kb is not None:
            out[p] = kb
    return out


def tree_sockets(pid: int) -> dict[int, int]:
    """Open sockets of each process of the tree (listening ones included)."""
    out = {}
    for p in probe.process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        n = 0
        for fd in fds:
            try:
                n += os.readlink(f"/proc/{p}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
        out[p] = n
    return out


def tree_mem(pid: int) -> dict[str, int]:
    """Rss and Pss in kB summed over `pid` and its descendants, and how many they are."""
    out = {"rss": 0, "pss": 0, "procs": 0}
    for p in probe.process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Pss"):
                        out[key.lower()] += int(rest.split()[0])
            out["procs"] += 1
        except (OSError, ValueError, IndexError):
            pass  # ended meanwhile
    return out


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants, the ended ones too
    (as far as their parents reaped them: cutime and cstime)."""
    total = 0
    for p in probe.process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def reset_peak(pid: int) -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0), of `pid` and
    each of its descendants."""
    done = False
    for p in probe.process_tree(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
            done = True
        except OSError:
            pass
    return done


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), and of the
    children it has reaped (a filter program's, for geosmtp+cat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cores"] = str(os.cpu_count())
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["ram"] = f"{kb / 1024 / 1024:.0f} GB"
    except (OSError, ValueError, IndexError):
        pass
    info["kernel"] = os.uname().release
    info["python"] = sys.version.split()[0]
    return info


_to_clean: list[Path] = []


def cleanup_all() -> None:
    while _to_clean:
        shutil.rmtree(_to_clean.pop(), ignore_errors=True)


def source_version() -> str:
    """The last commit that touched geosmtp/ (`-dirty`: with uncommitted changes there)."""
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", "geosmtp"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "geosmtp"], cwd=REPO, timeout=10
        ).returncode
        return (head or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- servers


class Server:
    name = "?"
    stores = True  # does it keep mail we can verify?
    strict_headers = True
    measurable = True  # a process tree whose memory and CPU we can read

    def __init__(self, fsync: bool = True, max_size: int = 64 * 1024 * 1024) -> None:
        self.fsync = fsync
        self.max_size = max_size
        self.root = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        #: The relay scenario: the sink's port, where mail for other domains goes.
        self.relay_port: int | None = None
        #: The pop3 scenario: the POP3 port, and user -> argon2id password hash.
        self.pop3_port: int | None = None
        self.pop3_users: dict[str, str] = {}
        #: The flood scenario: geosmtp's per-client limits as shipped
        #: (client_limits: max_connections 50 per address), not out of reach.
        self.shipped_limits = False
        #: The soak scenario: geosmtp's admin listener (token in ROOT/admin.token).
        self.admin_port: int | None = None
        self.log = open(self.root / "server.out", "wb")  # noqa: SIM115

    @classmethod
    def available(cls) -> bool:
        return True

    @property
    def mail_dir(self) -> Path:
        return self.root / "mail_dir"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Extra environment for the server process."""
        return {}

    def start(self, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.root,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env()},
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.output()}")
            if greets(self.port) and (
                self.pop3_port is None or probe.greets(HOST, self.pop3_port, b"+OK")
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer on port {self.port}: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        try:
            return (self.root / "server.out").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def mem(self) -> dict[str, int]:
        """Rss, Pss, VmRSS, VmHWM (kB) summed over the server's processes."""
        return tree_status(self.pid) if self.measurable else {}

    def rss(self) -> int:
        return tree_rss(self.pid) if self.measurable else 0

    def cpu(self) -> float:
        """CPU seconds of the server's processes (and of the children they reaped)."""
        return tree_cpu(self.pid) if self.measurable else 0.0

    def workers(self) -> dict[str, dict[str, int]]:
        """Sessions and messages by serving process, when the server can tell
        (geosmtp: from its access log, after it stopped)."""
        return {}

    def tree_mem(self) -> dict[str, int]:
        return tree_mem(self.pid)

    def tree_cpu(self) -> float:
        return tree_cpu(self.pid)

    def drain(self, expected_files: int, timeout: float = 180.0) -> None:
        """Wait until delivery is complete (only Postfix delivers after its 250)."""

    def queued(self) -> int:
        """Messages in the outbound queue (the relay scenario)."""
        return 0

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()

    def cleanup(self) -> None:
        """Removed at the end of the command, not now: deleting tens of thousands of
        files between runs makes the next run's file creation slower (ext4 scans
        recently deleted inodes), which would tax whichever server runs next."""
        _to_clean.append(self.root)


class Geosmtp(Server):
    name = "geosmtp"
    #: The `filters:` section, for a variant with filter stages.
    filters: ClassVar[list[dict] | None] = None
    #: `workers:` (None: not in the config, geosmtp's default: one per CPU);
    #: a scenario may set it on an instance (relay: `--server-workers`).
    worker_count: int | None = None
    #: The per-client limits on, out of reach (their counting measured), or off.
    client_limits: ClassVar[bool] = True
    #: `reuse_port: true` (a listening socket per worker).
    reuse_port: ClassVar[bool] = False
    #: The source tree whose `geosmtp/` runs (another for `geosmtp@REV`).
    source: ClassVar[Path] = REPO

    def knows(self, key: str) -> bool:
        """Does this geosmtp's config (today's, or `@REV`'s) have the top-level key?"""
        return f'"{key}"' in (self.source / "geosmtp" / "config.py").read_text()

    def config(self) -> dict:
        """The bench's geosmtp config (written to cfg.yaml at start)."""
        config = {
            "hostname": "bench.geosmtp.test",
            "domains": ["bench.test", "localhost"],
            "listeners": [{"address": HOST, "port": self.port}],
            "max_clients": 20000,
            "mail_dir": "mail_dir",
            "unknown_recipients": "accept",
            "fsync": self.fsync,
            "limits": {"max_message_size": self.max_size, "max_recipients": 100},
            "log": {"dir": "logs", "level": "WARNING"},
        }
        if self.pop3_port is not None:
            # A POP3 listener beside SMTP; the users log in with USER/PASS over
            # plain TCP on loopback (allow_plaintext), their hashes as `geosmtp passwd`
            # makes them (or cheap ones: --hash cheap).
            config["listeners"].append({"address": HOST, "port": self.pop3_port, "role": "pop3"})
            config["users"] = {u: {"password": h} for u, h in self.pop3_users.items()}
            config["auth"] = {"allow_plaintext": True}
        if self.shipped_limits:
            pass  # the flood scenario: client_limits as shipped
        elif "class ClientLimits" in (self.source / "geosmtp" / "config.py").read_text():
            # Every load comes from 127.0.0.1: each per-client limit on (so its
            # counting is measured) and out of reach (so it refuses nothing).
            # A variant may turn them off (0), to measure what the counting costs.
            value = 1_000_000 if self.client_limits else 0
            config["client_limits"] = {
                key: value
                for key in ("max_connections", "connection_rate", "message_rate", "recipient_rate")
            }
            config["client_limits"]["max_errors"] = value
        if self.filters is not None:
            config["filters"] = self.filters
        if self.worker_count is not None:
            config["workers"] = self.worker_count
        if self.reuse_port:
            config["reuse_port"] = True
        if self.admin_port is not None:
            config["admin"] = {
                "enabled": True,
                "address": HOST,
                "port": self.admin_port,
                "token_file": "admin.token",
            }
        if self.relay_port is not None:
            config["trusted_networks"] = ["127.0.0.0/8"]
            config["relay"] = {
                "smarthost": f"{HOST}:{self.relay_port}",
                "smarthost_tls": "none",
                "concurrency": RELAY_CONCURRENCY,
                "per_domain_concurrency": RELAY_CONCURRENCY,
            }
        return config

    def command(self) -> list[str]:
        path = self.root / "config.yaml"
        path.write_text(yaml.safe_dump(self.config()))
        pool = os.environ.get("BENCH_GEOSMTP_THREADPOOL")
        if pool:
            # What-if experiment only: a bigger gevent threadpool, geosmtp unchanged.
            code = (
                "import sys, gevent.hub; gevent.hub.Hub.threadpool_size = int(sys.argv[1]); "
                "from geosmtp.cli import main; sys.exit(main(sys.argv[2:]))"
            )
            return [sys.executable, "-c", code, pool, "-c", str(path)]
        trace = os.environ.get("BENCH_GEOSMTP_TRACE")
        if trace:
            # Diagnosis only: every threadpool trip timed (bench/experiments/pool_trace.py).
            tracer = BENCH_DIR / "experiments" / "pool_trace.py"
            return [sys.executable, str(tracer), trace, "-c", str(path)]
        return [sys.executable, "-m", "geosmtp", "-c", str(path)]

    def workers(self) -> dict[str, dict[str, int]]:
        """Sessions and accepted messages by serving process, from the access log:
        a session id starts with its process's pid in six hex digits (since
        the process model; before it, one process: the ids are counted under
        `?`). Messages: transactions that ended `250`."""
        sessions: dict[str, set[str]] = {}
        messages: dict[str, int] = {}
        try:
            f = open(self.root / "logs" / "access.log", errors="replace")  # noqa: SIM115
        except OSError:
            return {}
        with f:
            for line in f:
                sid = _field(line, "session")
                if sid is None:
                    continue
                pid = str(int(sid[:6], 16)) if len(sid) > 6 and _hex(sid[:6]) else "?"
                sessions.setdefault(pid, set()).add(sid)
                if _field(line, "result") == "250":
                    messages[pid] = messages.get(pid, 0) + 1
        return {
            pid: {"sessions": len(ids), "messages": messages.get(pid, 0)}
            for pid, ids in sorted(sessions.items())
        }

    def queued(self) -> int:
        """Files in .queue/records: one per queued message."""
        try:
            return sum(1 for e in os.scandir(self.mail_dir / ".queue" / "records") if e.is_file())
        except OSError:
            return 0


def _field(line: str, key: str) -> str | None:
    """The value of ` key=value` in an access-log line (unquoted values only)."""
    at = line.find(f" {key}=")
    if at < 0:
        return None
    start = at + len(key) + 2
    end = line.find(" ", start)
    return line[start : end if end >= 0 else len(line)].strip()


def _hex(text: str) -> bool:
    return all(c in "0123456789ABCDEFabcdef" for c in text)


class GeosmtpOneWorker(Geosmtp):
    """geosmtp with `workers: 1`: the master and one serving process."""

    name = "geosmtp+w1"
    worker_count = 1


class GeosmtpNoClientLimits(Geosmtp):
    """geosmtp with every per-client limit off (`client_limits`: 0), beside
    plain geosmtp where each is on and out of reach: what counting costs."""

    name = "geosmtp+nolimits"
    client_limits = False


class GeosmtpReusePort(Geosmtp):
    """geosmtp with `reuse_port: true`: each worker its own SO_REUSEPORT socket
    (the kernel spreads connections by a hash of the addresses) instead of
    one socket they all accept from."""

    name = "geosmtp+reuseport"
    reuse_port = True


DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


class GeosmtpAuth(Geosmtp):
    """geosmtp with the sender checks on (`auth_checks.enabled`: SPF, DKIM,
    DMARC, one Authentication-Results field per message), its DNS a private
    dnsmasq on loopback where the bench's sender domain publishes
    `v=spf1 ip4:127.0.0.1 -all` and `v=DMARC1; p=reject`. The records have a
    TTL of 0, so every message asks the DNS (SPF and DMARC: two TXT questions),
    as for mail from many different domains. The bench's messages are not
    DKIM-signed: `dkim=none` (what a signature costs on top:
    bench/experiments/auth_cost.py)."""

    name = "geosmtp+auth"
    #: Seconds the records may be cached (dnsmasq's --local-ttl).
    ttl = 0

    @classmethod
    def available(cls) -> bool:
        return Path(DNSMASQ).exists()

    def start(self, timeout: float = 20.0) -> None:
        self.dns_port = probe.free_udp_port(HOST)
        self.dns = subprocess.Popen(
            [
                DNSMASQ,
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--pid-file",
                f"--listen-address={HOST}",
                "--bind-interfaces",
                f"--port={self.dns_port}",
                "--local=/test/",
                f"--local-ttl={self.ttl}",
                "--txt-record=bench.test,v=spf1 ip4:127.0.0.1 -all",
                "--txt-record=_dmarc.bench.test,v=DMARC1; p=reject",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not dns_answers(HOST, self.dns_port):
            if self.dns.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {self.output()}")
            time.sleep(0.05)
        super().start(timeout)

    def config(self) -> dict:
        return {
            **super().config(),
            "auth_checks": {"enabled": True},
            "dns": {"nameservers": [f"{HOST}:{self.dns_port}"], "timeout": 5},
        }

    def stop(self) -> None:
        super().stop()
        dns = getattr(self, "dns", None)  # None when the start failed before it
        if dns is not None and dns.poll() is None:
            dns.terminate()
            dns.wait(timeout=10)


class GeosmtpAuthCached(GeosmtpAuth):
    """`geosmtp+auth` with records that may be kept 5 minutes: after the first
    message, geosmtp's resolver answers from its cache (dnspython's, by TTL), so
    this is the checks' own cost, the DNS round trips left out."""

    name = "geosmtp+auth-cached"
    ttl = 300


def dns_answers(host: str, port: int) -> bool:
    """The nameserver answers (anything, even REFUSED) on UDP."""
    import dns.message
    import dns.query

    try:
        dns.query.udp(dns.message.make_query("bench.test.", "TXT"), host, port=port, timeout=0.2)
        return True
    except Exception:
        return False


class GeosmtpCat(Geosmtp):
    """geosmtp with one filter stage, `cat` (issue 12): every message through a
    program and back. Its CPU counts the cat processes' (reaped children)."""

    name = "geosmtp+cat"
    filters: ClassVar[list[dict] | None] = [{"name": "cat", "command": ["cat"]}]


class RelaySink(Server):
    """The relay scenario's remote domain: `bench/sink.py`, records each accepted
    message's X-Bench-Id (with the time) in `ids.txt`, stores nothing else;
    `delay`: seconds before each of its replies (a next hop that far away);
    at exit, its connection counts in `stats.json`."""

    name = "sink"
    stores = False
    #: Does it know only how many messages came, not which (no X-Bench-Ids)?
    counted = False

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay

    @property
    def ids_file(self) -> Path:
        return self.root / "ids.txt"

    def command(self) -> list[str]:
        sink = str(BENCH_DIR / "sink.py")
        return [
            sys.executable,
            sink,
            "--port",
            str(self.port),
            "--out",
            str(self.ids_file),
            "--delay",
            str(self.delay),
            "--stats",
            str(self.root / "stats.json"),
        ]

    def last_time(self) -> float:
        """When the last message came (time.time()), NaN before the first."""
        return max((t for _i, t in self.records()), default=float("nan"))

    def connections(self) -> dict:
        """After stop: `connections` the servers opened (the bench's readiness
        probe left out), `messages`, `per_connection` {messages: connections};
        {} when the sink did not say."""
        try:
            stats = json.loads((self.root / "stats.json").read_text())
        except (OSError, ValueError):
            return {}
        per = {int(n): k for n, k in stats["per_connection"].items()}
        per[0] = per.get(0, 0) - 1  # the probe: a connection without mail
        if not per[0]:
            del per[0]
        return {
            "connections": stats["connections"] - 1,
            "messages": stats["messages"],
            "per_connection": per,
        }

    def received(self) -> int:
        """Messages accepted so far (lines in ids.txt)."""
        try:
            with open(self.ids_file, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return 0

    def records(self) -> list[tuple[str, float]]:
        out = []
        with open(self.ids_file) as f:
            for line in f:
                ident, _, t = line.rstrip("\n").partition(" ")
                out.append((ident, float(t)))
        return out


class SmtpSinkNextHop(Server):
    """`--sink smtp-sink`: Postfix's smtp-sink as the relay's next hop, its
    running counters on (`-c`: sessions ended and messages, rewritten on its
    stdout after each); it cannot tell which messages came, so the relay check
    counts them."""

    name = "smtp-sink"
    stores = False
    counted = True

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.count_at = float("nan")  # when `count` was first seen

    @classmethod
    def available(cls) -> bool:
        return os.access(SMTP_SINK, os.X_OK)

    def command(self) -> list[str]:
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        return [SMTP_SINK, *user, "-c", f"{HOST}:{self.port}", "1024"]

    def counters(self) -> dict[str, int]:
        """The last `sess=N quit=N mesg=N` line smtp-sink wrote."""
        try:
            text = (self.root / "server.out").read_bytes()
        except OSError:
            return {}
        last = text.rstrip(b"\r\n").rpartition(b"\r")[2].decode(errors="replace")
        out = {}
        for part in last.split():
            key, _, value = part.partition("=")
            if value.isdigit():
                out[key] = int(value)
        return out

    def received(self) -> int:
        """Messages so far; notes when the count last grew (the caller polls)."""
        n = self.counters().get("mesg", 0)
        if n != self.count:
            self.count, self.count_at = n, time.time()
        return n

    def last_time(self) -> float:
        """When the polling first saw the last message (within one poll)."""
        self.received()
        return self.count_at

    def connections(self) -> dict:
        """After stop: sessions smtp-sink saw end (but the bench's probe)."""
        c = self.counters()
        if "sess" not in c:
            return {}
        return {"connections": c["sess"] - 1, "messages": c.get("mesg", 0)}


class Aiosmtpd(Server):
    name = "aiosmtpd"

    @classmethod
    def available(cls) -> bool:
        try:
            import aiosmtpd  # noqa: F401
        except ImportError:
            return False
        return True

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            str(BENCH_DIR / "peers" / "aiosmtpd_maildir.py"),
            "--port",
            str(self.port),
            "--maildir",
            str(self.mail_dir),
            "--hostname",
            "bench.aiosmtpd.test",
            "--max-size",
            str(self.max_size),
        ]
        if not self.fsync:
            cmd.append("--no-fsync")
        return cmd


class SmtpSink(Server):
    name = "smtp-sink"
    stores = False

    @classmethod
    def available(cls) -> bool:
        return os.access(SMTP_SINK, os.X_OK)

    def command(self) -> list[str]:
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        return [SMTP_SINK, *user, f"{HOST}:{self.port}", "1024"]


MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Also the relay tests' receiving MX (tests/integration/test_relay_modes.py).
# mydomain is left to Postfix's default: myhostname less its first label.
MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = {hostname}
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
relayhost = {relayhost}
default_destination_concurrency_limit = {relay_concurrency}
smtputf8_enable = no
biff = no
smtpd_banner = $myhostname ESMTP
message_size_limit = {max_size}
mailbox_size_limit = 0
virtual_mailbox_limit = 0
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = {procs}
in_flow_delay = 0
virtual_mailbox_domains = {mail_domain}
virtual_mailbox_base = {root}/mail_dir
virtual_mailbox_maps = texthash:{root}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
"""


class Postfix(Server):
    """A private Postfix: `postfix -c ROOT/etc start`, virtual Maildir delivery."""

    name = "postfix"
    strict_headers = False  # cleanup(8) may rewrite address headers

    @property
    def pid(self) -> int:
        """Its master's (`postfix start` daemonizes it): the tree is smtpd,
        cleanup, qmgr, virtual and the rest."""
        return int((self.root / "spool" / "pid" / "master.pid").read_text().split()[0])

    @classmethod
    def available(cls) -> bool:
        return (
            os.geteuid() == 0
            and os.access(POSTFIX, os.X_OK)
            and Path("/usr/lib/postfix/sbin/smtpd").exists()
        )

    def start(self, timeout: float = 30.0) -> None:
        etc = self.root / "etc"
        etc.mkdir()
        for sub in ("spool", "data", "mail_dir"):
            (self.root / sub).mkdir()
        import pwd

        owner = pwd.getpwnam("nobody")
        os.chown(self.mail_dir, owner.pw_uid, owner.pw_gid)
        pf = pwd.getpwnam("postfix")
        os.chown(self.root / "data", pf.pw_uid, pf.pw_gid)
        os.chmod(self.root, 0o755)
        (etc / "main.cf").write_text(
            MAIN_CF.format(
                root=self.root,
                hostname="bench.postfix.test",
                mail_domain="bench.test",
                max_size=self.max_size,
                procs=5100,
                uid=owner.pw_uid,
                gid=owner.pw_gid,
                relayhost=f"[{HOST}]:{self.relay_port}" if self.relay_port else "",
                relay_concurrency=RELAY_CONCURRENCY,
            )
        )
        (etc / "master.cf").write_text(MASTER_CF.format(host=HOST, port=self.port))
        # virtual(8) allows no regexp substitution: list every bench mailbox
        # (and the numbered ones smtp-source makes with -r N).
        names = [f"u{i:03d}" for i in range(100)] + [f"{k}u000" for k in range(1, 101)]
        (etc / "vmailbox").write_text("".join(f"{n}@bench.test {n}/\n" for n in names))
        env = {**os.environ}
        subprocess.run(
            [POSTFIX, "-c", str(etc), "start"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            check=True,
            timeout=60,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if greets(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"postfix did not answer on {self.port}: {self.output()}")

    def output(self) -> str:
        text = super().output()
        try:
            text += (self.root / "maillog").read_text(errors="replace")[-2000:]
        except OSError:
            pass
        return text

    def queued(self) -> int:
        spool = self.root / "spool"
        return sum(
            1
            for q in ("incoming", "active", "deferred", "maildrop", "hold")
            for _ in (spool / q).rglob("*")
            if _.is_file()
        )

    def drain(self, expected_files: int, timeout: float = 180.0) -> None:
        from .verify import count_files

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if count_files(self.mail_dir) >= expected_files and self.queued() == 0:
                return
            time.sleep(0.25)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        subprocess.run(
            [POSTFIX, "-c", str(self.root / "etc"), "stop"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
        self.log.close()


class Dovecot(Server):
    """POP3 only: a private Dovecot (`bench/peers/dovecot.py`) on `pop3_port`,
    serving `mail_dir` to `pop3_users` (their argon2id hashes, as `{ARGON2ID}`)."""

    name = "dovecot"
    #: Dovecot's high-performance mode (long-lived login processes, pop3
    #: processes reused) instead of the packaged default (a process each).
    performance = False

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.instance: dovecot_peer.Dovecot | None = None

    @classmethod
    def available(cls) -> bool:
        return dovecot_peer.available()

    @property
    def pid(self) -> int:
        assert self.instance is not None
        return self.instance.pid

    def start(self, timeout: float = 20.0) -> None:
        if self.pop3_port is None:
            raise RuntimeError("dovecot serves POP3 only (the pop3 scenario)")
        os.chmod(self.root, 0o755)  # its mail user (nobody, under root) reaches mail_dir
        self.instance = dovecot_peer.Dovecot(
            self.mail_dir,
            self.pop3_users,
            host=HOST,
            port=self.pop3_port,
            root=self.root / "dovecot",
            performance=self.performance,
        )
        self.instance.start(timeout)

    def output(self) -> str:
        return self.instance.log()[-2000:] if self.instance is not None else ""

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.instance is not None:
            self.instance.stop()
        self.log.close()


class DovecotPerformance(Dovecot):
    """The same, tuned as its documentation advises for a busy server."""

    name = "dovecot-perf"
    performance = True


SERVERS: dict[str, type[Server]] = {
    "geosmtp": Geosmtp,
    "geosmtp+auth": GeosmtpAuth,
    "geosmtp+auth-cached": GeosmtpAuthCached,
    "geosmtp+cat": GeosmtpCat,
    "geosmtp+w1": GeosmtpOneWorker,
    "geosmtp+nolimits": GeosmtpNoClientLimits,
    "geosmtp+reuseport": GeosmtpReusePort,
    "aiosmtpd": Aiosmtpd,
    "postfix": Postfix,
    "smtp-sink": SmtpSink,
    "dovecot": Dovecot,
    "dovecot-perf": DovecotPerformance,
}


def geosmtp_at(rev: str, base: type[Server] = Geosmtp) -> type[Server]:
    """geosmtp as it was at commit `rev`, beside today's in the same run: the
    before/after measurement a hot-path change needs (`--servers
    geosmtp@HEAD~1,geosmtp`; any geosmtp variant: `geosmtp+auth@HEAD~1`).
    Its `geosmtp/` is exported with `git archive`."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{rev}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    if not commit:
        raise SystemExit(f"geosmtp@{rev}: not a commit of this repository")
    src = Path(tempfile.mkdtemp(prefix=f"bench-src-{commit}-"))
    archive = subprocess.run(
        ["git", "archive", commit, "geosmtp"], cwd=REPO, capture_output=True, timeout=60
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=60)
    _to_clean.append(src)

    class GeosmtpAt(base):  # type: ignore[valid-type,misc]
        name = f"{base.name}@{rev}"
        source = src

        def env(self) -> dict[str, str]:
            return {**super().env(), "PYTHONPATH": str(src)}

    return GeosmtpAt


def server_class(name: str) -> type[Server]:
    """A server by name: one of SERVERS, or `<geosmtp variant>@REV` (that
    commit's geosmtp, in the variant's configuration)."""
    base, at, rev = name.partition("@")
    if at and base.startswith("geosmtp") and base in SERVERS:
        return geosmtp_at(rev, SERVERS[base])
    return SERVERS[name]
