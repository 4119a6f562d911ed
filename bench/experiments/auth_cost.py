"""What the sender checks and DKIM signing cost per message, in one process.

    python bench/experiments/auth_cost.py [MESSAGES]

No server and no network: the stages of geosmtp/mailauth/stages.py run on
real spool files, their DNS answered from memory, MESSAGES times each (1,000
by default), and the CPU time per message is printed (process time: user +
system, so a busy machine slows it less than wall time). The rows:

- checks, unsigned: SPF + DMARC + the new spool file (what the throughput
  bench's `geosmtp+auth-cached` pays per message beside its DNS cache);
- checks, signed: the same with one DKIM signature (RSA-2048) to verify;
- signing: a DKIM signature made (RSA-2048) and the new spool file;
- body hash: the streamed relaxed canonicalization + SHA-256, MB/s, on 25 MB;
- DNS: one TXT question to a dnsmasq on loopback with dnspython (the cost the
  checks pay per uncached question, two a message for SPF and DMARC).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from loguru import logger  # noqa: E402

from geosmtp.config import AuthChecks  # noqa: E402
from geosmtp.mail import Envelope, Mailbox, Recipient  # noqa: E402
from geosmtp.mailauth.canon import BodyHasher, LineBlocks  # noqa: E402
from geosmtp.mailauth.dkim_sign import Signer, SigningKey, public_key_record  # noqa: E402
from geosmtp.mailauth.stages import DKIMSign, SenderChecks  # noqa: E402
from geosmtp.pipeline import Message  # noqa: E402
from geosmtp.relay.mx import Resolver  # noqa: E402
from geosmtp.storage import Spool  # noqa: E402
from geosmtp.storage.spool import UniqueNames  # noqa: E402

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
HEAD = (
    b"Message-ID: <1@bench.test>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"From: Bench <bench@bench.test>\r\nTo: <u001@bench.test>\r\nSubject: bench\r\n\r\n"
)
BODY = b"A line of the message body, as text goes.\r\n" * 22  # about 1 KB in all
TRACE = b"Return-Path: <bench@bench.test>\nReceived: from c ([127.0.0.1])\n\tby mx; now\n"


class MemoryDNS:
    def __init__(self) -> None:
        record = public_key_record(KEY).encode()
        self.records = {
            ("bench.test", "TXT"): [(b"v=spf1 ip4:127.0.0.1 -all",)],
            ("_dmarc.bench.test", "TXT"): [(b"v=DMARC1; p=reject",)],
            ("sel._domainkey.bench.test", "TXT"): [(record[:255], record[255:])],
        }

    def lookup(self, name: str, rdtype: str) -> list:
        return [SimpleNamespace(strings=s) for s in self.records.get((name, rdtype), [])]


def per_message(n: int, one) -> float:  # type: ignore[no-untyped-def]
    for _ in range(20):
        one()
    start = time.process_time()
    for _ in range(n):
        one()
    return (time.process_time() - start) / n * 1000


def run_stage(spool: Spool, stage, data: bytes, **how) -> None:  # type: ignore[no-untyped-def]
    f = spool.open()
    f.write(TRACE + data.replace(b"\r\n", b"\n"))
    rcpt = Recipient(Mailbox("u001", "remote.test"), None)
    env = Envelope("c.test", True, Mailbox("bench", "bench.test"), recipients=(rcpt,), **how)
    result = stage.process(Message(env, f, "Q", len(data), "127.0.0.1", "mx"))
    spool_file = getattr(result, "spool", None)
    assert spool_file is not None, result
    spool_file.remove()
    f.remove()


def dns_cost(n: int) -> float | None:
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(dnsmasq).exists():
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
         "--pid-file", "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}",
         "--local=/test/", "--txt-record=bench.test,v=spf1 ip4:127.0.0.1 -all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        resolver = Resolver([f"127.0.0.1:{port}"], 2, cache=False)
        for _ in range(100):
            try:
                resolver.lookup("bench.test", "TXT")
                break
            except Exception:
                time.sleep(0.05)
        return per_message(n, lambda: resolver.lookup("bench.test", "TXT"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    logger.remove()
    root = Path(tempfile.mkdtemp(prefix="auth-cost-"))
    try:
        spool = Spool(root / "spool", UniqueNames("bench"))
        checks = SenderChecks(
            AuthChecks(enabled=True), "mx.bench.test", MemoryDNS(), spool, lambda ip: False,
            lambda fn, *a: fn(*a),
        )  # fmt: skip
        signed = dkim.sign(HEAD + BODY, b"sel", b"bench.test", PEM) + HEAD + BODY
        signer = Signer({"bench.test": SigningKey("bench.test", "sel", KEY)})
        signing = DKIMSign(signer, spool, lambda ip: False, lambda fn, *a: fn(*a))
        rows = [
            ("checks, unsigned 1 KB",
             per_message(n, lambda: run_stage(spool, checks, HEAD + BODY))),
            ("checks, DKIM-signed 1 KB", per_message(n, lambda: run_stage(spool, checks, signed))),
            ("signing 1 KB (RSA-2048)",
             per_message(n, lambda: run_stage(spool, signing, HEAD + BODY, auth_user="bench"))),
        ]  # fmt: skip
        for name, ms in rows:
            print(f"{name:28} {ms:7.3f} ms CPU per message")
        body = (b"Some text of a large message, with  spaces\t and tabs.  \n" * 460_000)[
            :25_000_000
        ]
        start = time.process_time()
        lines, hasher = LineBlocks(), BodyHasher(True)
        for i in range(0, len(body), 65536):
            hasher.update(lines.feed(body[i : i + 65536]))
        hasher.update(lines.end())
        hasher.digest()
        seconds = time.process_time() - start
        print(f"{'body hash, relaxed, 25 MB':28} {len(body) / seconds / 1e6:7.0f} MB/s")
        dns = dns_cost(n)
        if dns is not None:
            print(
                f"{'DNS: one TXT question':28} {dns:7.3f} ms CPU (dnspython, dnsmasq on loopback)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
