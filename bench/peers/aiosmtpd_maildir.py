"""The Python peer: aiosmtpd with a Maildir handler as durable as geosmtp's.

    python bench/peers/aiosmtpd_maildir.py --port P --maildir D [--no-fsync]

Accepts mail for the bench domains into `D/<local part>/new/`, the same way
geosmtp does: the message (with Return-Path and Received headers in front,
LF line endings) is written to `tmp/` of the first recipient, flushed and
fsynced, hard-linked into `new/` of every recipient, the `new/` folders are
fsynced, and only then is 250 sent. The blocking file work runs in the event
loop's thread pool, as geosmtp runs its fsyncs in gevent's, so one slow disk
does not stall every session.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import itertools
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

SAFE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.+_-]{0,62}[a-z0-9])?")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirHandler:
    def __init__(self, root: Path, domains: set[str], hostname: str, fsync: bool) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.domains = domains
        self.hostname = hostname
        self.fsync = fsync
        self.known: set[str] = set()
        self.counter = itertools.count(1)
        self.pid = os.getpid()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options
    ) -> str:
        local, _, domain = address.rpartition("@")
        if domain.lower() not in self.domains:
            return "550 5.7.1 Relay access denied"
        box = local.lower()
        if not SAFE_NAME.fullmatch(box) or ".." in box:
            return "553 5.1.3 Bad mailbox name"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    def _maildir(self, box: str) -> Path:
        path = self.root / box
        if box not in self.known:
            created = not path.exists()
            for sub in ("tmp", "new", "cur"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            if created and self.fsync:
                _fsync_dir(path)
                _fsync_dir(self.root)
            self.known.add(box)
        return path

    def _store(self, boxes: list[str], data: bytes) -> str:
        now = time.time()
        n = next(self.counter)
        name = f"{int(now)}.M{int((now % 1) * 1e6)}P{self.pid}Q{n}.{self.hostname}"
        first = self._maildir(boxes[0])
        tmp = first / "tmp" / name
        made = []
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            new_dirs = []
            for box in dict.fromkeys(boxes):
                maildir = self._maildir(box)
                target = maildir / "new" / name
                os.link(tmp, target)
                made.append(target)
                new_dirs.append(maildir / "new")
            if self.fsync:
                for d in new_dirs:
                    _fsync_dir(d)
        except OSError:
            for p in made:
                p.unlink(missing_ok=True)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return f"{n:X}"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        boxes = [a.rpartition("@")[0].lower() for a in envelope.rcpt_tos]
        helo = session.host_name or ""
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        header = (
            f"Return-Path: <{envelope.mail_from}>\n"
            f"Received: from {helo} ([{peer}])\n"
            f"\tby {self.hostname} (aiosmtpd) with ESMTP;\n"
            f"\t{email.utils.formatdate(localtime=True)}\n"
        ).encode()
        data = header + envelope.content.replace(b"\r\n", b"\n")
        loop = asyncio.get_running_loop()
        try:
            qid = await loop.run_in_executor(None, self._store, boxes, data)
        except OSError:
            return "451 4.3.0 Local error in processing"
        return f"250 2.0.0 Ok: queued as {qid}"


async def serve(args: argparse.Namespace) -> None:
    handler = MaildirHandler(
        Path(args.maildir), set(args.domain), args.hostname, fsync=not args.no_fsync
    )
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname=args.hostname,
            ident="aiosmtpd peer",
            data_size_limit=args.max_size,
            enable_SMTPUTF8=False,
            decode_data=False,
        )

    server = await loop.create_server(
        factory, host=args.host, port=args.port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--domain", action="append", default=["bench.test", "localhost"])
    p.add_argument("--hostname", default=socket.gethostname())
    p.add_argument("--max-size", type=int, default=64 * 1024 * 1024)
    p.add_argument("--no-fsync", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
