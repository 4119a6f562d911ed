"""A real DNS server for tests: a private dnsmasq on a loopback port, serving a
`Zone` of MX, A/AAAA, TXT and CNAME records; and two broken nameservers (one
that never answers, one that answers SERVFAIL) for the temporary failures.

    zone = Zone(mx={"example.test": [(10, "mx1.example.test")]},
                hosts={"mx1.example.test": ["127.0.0.2", "::1"]})
    with dns_server(zone, tmp_path) as dns:
        Resolver([dns.nameserver]).resolve_mx("example.test")

Every name under `Zone.local` (default: "test") that has no record is
NXDOMAIN; any other name is REFUSED (dnsmasq has no upstream). Records have a
TTL of 0, so no resolver caches them between tests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def txt_record(text: str) -> str:
    """A TXT record's text as `Zone.txt` takes it: over 255 octets, cut into the
    strings of one record (RFC 1035 §3.3.14), as a DKIM key must be."""
    if "," in text:
        raise ValueError("dnsmasq would split the text at its commas")
    return ",".join(text[i : i + 255] for i in range(0, len(text), 255))


@dataclass
class Zone:
    """The records a test's dnsmasq serves."""

    #: domain -> [(preference, exchange)]; exchange "." (preference 0) is a null MX.
    mx: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    #: name -> addresses; each is an A or AAAA record by its form.
    hosts: dict[str, list[str]] = field(default_factory=dict)
    #: name -> TXT records, one per item; a comma in an item starts another
    #: string of the same record (`txt_record` cuts long texts so).
    txt: dict[str, list[str]] = field(default_factory=dict)
    #: alias -> target (dnsmasq serves a CNAME only to a name it knows).
    cname: dict[str, str] = field(default_factory=dict)
    #: domains answered only from these records: other names in them are NXDOMAIN.
    local: tuple[str, ...] = ("test",)

    def dnsmasq_args(self) -> list[str]:
        args = [f"--local=/{domain}/" for domain in self.local]
        for domain, records in self.mx.items():
            for preference, exchange in records:
                args.append(f"--mx-host={domain},{exchange},{preference}")
        for name, addresses in self.hosts.items():
            for address in addresses:
                ipaddress.ip_address(address)  # a typo in a test fails here, not in dnsmasq
                args.append(f"--host-record={name},{address}")
        for name, strings in self.txt.items():
            for text in strings:
                # no shell: dnsmasq takes the text as it is (a comma starts a new string)
                args.append(f"--txt-record={name},{text}")
        for alias, target in self.cname.items():
            args.append(f"--cname={alias},{target}")
        return args


def remote_mx(address: str) -> Zone:
    """remote.test's one MX, mx.remote.test, at `address`: the relay tests' destination."""
    return Zone(mx={"remote.test": [(10, "mx.remote.test")]}, hosts={"mx.remote.test": [address]})


@dataclass
class DNSServer:
    process: subprocess.Popen
    address: str
    port: int
    log_path: Path

    @property
    def nameserver(self) -> str:
        """The server as `Resolver(nameservers=[...])` and `dns.nameservers` take it."""
        return f"{self.address}:{self.port}"

    def config(self) -> dict:
        """The `dns:` config section that sends a geosmtp's lookups here."""
        return {"nameservers": [self.nameserver], "timeout": 5}

    def log(self) -> str:
        """dnsmasq's output: the queries it got and what it answered (--log-queries)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _free_udp_and_tcp_port(address: str) -> int:
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for dnsmasq")


def _answers(address: str, port: int) -> bool:
    """True once the server answers anything (even REFUSED) on UDP."""
    import dns.message
    import dns.query

    query = dns.message.make_query("probe.invalid.", "A")
    try:
        dns.query.udp(query, address, port=port, timeout=0.2)
        return True
    except Exception:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def dns_server(zone: Zone, workdir: Path, address: str = "127.0.0.1") -> Iterator[DNSServer]:
    """Run dnsmasq serving `zone` on `address` and a free port; stopped on exit.

    Skips the test when dnsmasq is not installed (Debian: dnsmasq-base).
    """
    if not Path(DNSMASQ).exists():
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base)")
    pytest.importorskip("dns", reason="dnspython is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "dnsmasq.log"
    server: DNSServer | None = None
    for _ in range(5):  # a port taken between the probe and dnsmasq's bind: try another
        port = _free_udp_and_tcp_port(address)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [
                    DNSMASQ,
                    "--no-daemon",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--pid-file",  # without a value: no PID file
                    f"--listen-address={address}",
                    "--bind-interfaces",
                    f"--port={port}",
                    "--log-queries",
                    "--log-facility=-",
                    *zone.dnsmasq_args(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(address, port):
                server = DNSServer(process, address, port, log_path)
                break
            time.sleep(0.02)
        if server is not None:
            break
        _stop(process)
    if server is None:
        raise AssertionError(f"dnsmasq did not start: {log_path.read_text(errors='replace')}")
    try:
        yield server
    finally:
        _stop(server.process)


# ------------------------------------------------- nameservers that fail on purpose


@contextlib.contextmanager
def silent_nameserver(address: str = "127.0.0.1") -> Iterator[str]:
    """A UDP port that takes questions and never answers: every lookup times out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        yield f"{address}:{sock.getsockname()[1]}"


@contextlib.contextmanager
def _udp_nameserver(answer: Callable[[Any], Any], address: str, name: str) -> Iterator[str]:
    """A thread answering each UDP question with `answer(query)` (a dnspython
    message; None: no answer); yields its "ip:port"."""
    import dns.message

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                wire, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = answer(dns.message.from_wire(wire))
            except Exception:
                continue
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=serve, name=name, daemon=True)
    thread.start()
    try:
        yield f"{address}:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


def _servfail(query: Any) -> Any:
    import dns.message
    import dns.rcode

    reply = dns.message.make_response(query)
    reply.set_rcode(dns.rcode.SERVFAIL)
    return reply


@contextlib.contextmanager
def servfail_nameserver(address: str = "127.0.0.1") -> Iterator[str]:
    """A nameserver that answers every question with SERVFAIL (built with dnspython)."""
    with _udp_nameserver(_servfail, address, "servfail-dns") as nameserver:
        yield nameserver


@dataclass
class FlakyNameserver:
    """`flaky_nameserver`'s handle: its "ip:port", and the switch that heals it."""

    nameserver: str
    #: Set: every question is passed on to the real nameserver, its answer back.
    healthy: threading.Event


@contextlib.contextmanager
def flaky_nameserver(
    upstream: DNSServer, failure: str, address: str = "127.0.0.1"
) -> Iterator[FlakyNameserver]:
    """A nameserver that fails until `healthy` is set, then answers as `upstream`
    does: `failure` is "servfail" (every question answered SERVFAIL) or
    "timeout" (none answered). Loopback only: it asks nobody but `upstream`."""
    import dns.query

    if failure not in ("servfail", "timeout"):
        raise ValueError(f"unknown failure {failure!r}")
    healthy = threading.Event()

    def answer(query: Any) -> Any:
        if healthy.is_set():
            return dns.query.udp(query, upstream.address, port=upstream.port, timeout=2)
        return None if failure == "timeout" else _servfail(query)

    with _udp_nameserver(answer, address, "flaky-dns") as nameserver:
        yield FlakyNameserver(nameserver, healthy)
