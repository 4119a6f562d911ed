"""The YAML configuration, loaded into frozen dataclasses.

The dataclasses are the schema: every field has a type and a default (so an
empty file runs), and `metadata` carries the extra checks (every number's
range, choices, path). Errors are one line that names the key path:
`limits.max_message_size: expected a positive integer, got 'ten'`; a value
quoted in one has its control characters escaped.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import math
import os
import re
import shutil
import socket
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# The `extensions:` and `limits:` sections are the SMTP core's own settings: defined once.
from .mail.limits import Extensions, Limits

# Defaults and checks of the subsystems' sections live here, so that this module
# imports none of them (the subsystems import these from here).

#: Seconds to wait after attempt 1, 2, ...; the last one repeats (every 4 hours).
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
#: Give up (bounce) after 5 days in the queue (RFC 5321 §4.5.4.1: "at least 4-5 days").
DEFAULT_MAX_LIFETIME: float = 5 * 24 * 3600
#: Warn the sender of a delay after 4 hours (0 turns the warning off).
DEFAULT_DELAY_WARNING: float = 4 * 3600

#: The fields DKIM signs by default (`dkim.headers`): RFC 6376 §5.4.1's list,
#: and the MIME fields whose change alters what a reader sees.
DKIM_SIGNED_HEADERS = (
    "from",
    "reply-to",
    "subject",
    "date",
    "to",
    "cc",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "resent-date",
    "resent-from",
    "resent-to",
    "resent-cc",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
)

#: Never signed (RFC 6376 §5.4): changed or added on the way.
DKIM_UNSIGNED_HEADERS = (
    "return-path",
    "received",
    "dkim-signature",
    "authentication-results",
    "comments",
    "keywords",
    "bcc",
    "resent-bcc",
)

#: The queue's folders, in `queue_dir`.
QUEUE_FOLDERS = ("messages", "records", "quarantine")


def load_key(path: Path) -> rsa.RSAPrivateKey:
    """An RSA private key in PEM (PKCS#1 or PKCS#8, unencrypted); at least 1024
    bits (RFC 8301 §3.2). OSError when unreadable, ValueError when unusable."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA key (DKIM signs with rsa-sha256 here)")
    if key.key_size < 1024:
        raise ValueError(f"an RSA key of {key.key_size} bits; DKIM needs at least 1024")
    return key


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
#: "package.module:function" (or "module:Class.method").
_SPEC_RE = re.compile(rf"({_NAME}(?:\.{_NAME})*):({_NAME}(?:\.{_NAME})*)")


def load_callable(spec: str) -> Callable[..., Any]:
    """The callable `spec` ("package.module:function") names; ValueError says
    why there is none (the module does not import, no such name, not callable)."""
    match = _SPEC_RE.fullmatch(spec)
    if match is None:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    module_name, attr_path = match.groups()
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a broken module is the config's problem: say what broke
        raise ValueError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no {attr_path!r}") from None
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key path.

    It is printed and logged as one line: control characters in it (from a
    value or a key it quotes) are escaped, so a NUL, an ESC or a CR/LF in the
    config cannot reach a terminal or start a log line of its own.
    """

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


def printable(text: str) -> str:
    """`text` with each non-printing character (controls, line breaks) as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


#: Seconds in a day: the longest any timeout may be.
DAY = 86400


def _positive(default: float, *, max: float) -> Any:
    """A number above zero (an int field: at least 1), at most `max`."""
    return field(default=default, metadata={"positive": True, "max": max})


def _ranged(default: float, *, min: float, max: float) -> Any:
    """A number from `min` to `max`, both included."""
    return field(default=default, metadata={"min": min, "max": max})


#: What a listener is for: `mx` takes mail for the local domains from anyone;
#: `submission` (port 587) wants AUTH before MAIL; `submissions` (port 465) is
#: the same inside implicit TLS (RFC 8314); `pop3` (port 110) lets users read
#: their mailboxes, with STLS (RFC 2595); `pop3s` (port 995) is POP3 inside
#: implicit TLS; `lmtp` takes mail for the local mailboxes from another MTA
#: (RFC 2033), on TCP from loopback or `trusted_networks` only, or on a UNIX
#: socket (`path`).
Role = Literal["mx", "submission", "submissions", "pop3", "pop3s", "lmtp"]

#: Roles whose listeners speak TLS from the first byte (RFC 8314).
IMPLICIT_TLS_ROLES = frozenset({"submissions", "pop3s"})


@dataclass(frozen=True)
class Listener:
    #: IPv4 or IPv6 address to bind ("0.0.0.0" or "::" for all).
    address: str = "127.0.0.1"
    #: 0 to 65535; 0 takes any free port.
    port: int = _ranged(2525, min=0, max=65535)
    #: What the listener is for (`Role`); the protocol it speaks is the one
    #: registered for the role (`server.protocols`, `app.PROTOCOLS`).
    role: Role = "mx"
    #: A UNIX socket to listen on instead of `address` and `port` (`lmtp` only),
    #: made by the master before it drops privileges and removed at the stop.
    path: Path | None = field(default=None, metadata={"path": True})
    #: The socket file's permissions (`0660` in YAML is octal): who may connect.
    mode: int = _ranged(0o660, min=0, max=0o777)
    # issue 22: behind a load balancer
    #: Each connection begins with a PROXY protocol header (HAProxy's, v1 or
    #: v2) that names the client; the session's client is the header's.
    proxy_protocol: bool = False
    #: The balancers allowed to send that header (networks or single
    #: addresses); needed with proxy_protocol. Any other is closed at once.
    proxy_trusted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Timeouts:
    """Seconds, at most a day. RFC 5321 §4.5.3.2 suggests 5 minutes for a command."""

    command: float = _positive(300, max=DAY)
    data_block: float = _positive(180, max=DAY)  # §4.5.3.2.5: between two reads of data
    data_total: float = _positive(600, max=DAY)  # the whole of DATA, however it trickles
    shutdown_grace: float = _ranged(10, min=0, max=DAY)
    #: A logged-in POP3 client silent this long is logged out (RFC 1939 §3 asks
    #: for at least 10 minutes); before login, `command` applies.
    pop3_autologout: float = _positive(600, max=DAY)
    #: On a `proxy_protocol` listener, the wait for the balancer's header
    #: (it sends it as it connects); then the connection is closed.
    proxy_header: float = _positive(5, max=DAY)


@dataclass(frozen=True)
class ClientLimits:
    """Limits per client address (an IPv4 address, an IPv6 /64), counted across
    all workers, in the spirit of Postfix's anvil. 0 switches a limit off.
    Clients in `trusted_networks` are exempt from all of them; a logged-in
    client from the message and recipient rates and the error budget."""

    #: Connections open at once (Postfix's smtpd_client_connection_count_limit;
    #: POP3 too): the next gets 421 4.7.0 (POP3: -ERR [SYS/TEMP]).
    max_connections: int = _ranged(50, min=0, max=1_000_000)
    #: Connections begun per minute (smtpd_client_connection_rate_limit), 421 4.7.0.
    connection_rate: int = _ranged(0, min=0, max=1_000_000)
    #: Messages (MAIL FROM) per minute (smtpd_client_message_rate_limit), 450 4.7.1.
    message_rate: int = _ranged(0, min=0, max=1_000_000)
    #: Recipients (RCPT TO) per minute (smtpd_client_recipient_rate_limit), 450 4.7.1.
    recipient_rate: int = _ranged(0, min=0, max=1_000_000)
    #: Error replies per `error_window` (limits.max_errors is one session's):
    #: then 421 4.7.0 at connect and after the reply that used the budget up.
    max_errors: int = _ranged(500, min=0, max=1_000_000)
    error_window: float = _positive(600, max=DAY)


@dataclass(frozen=True)
class Stress:
    """The connection cap nearly full: idle clients get a shorter command
    timeout, as Postfix's smtpd_timeout does under stress (`${stress?10}`)."""

    #: Percent of max_clients open at which stress begins (it ends below it); 0: never.
    threshold: int = _ranged(80, min=0, max=100)
    #: Seconds a client may take for a command under stress (the smaller of
    #: this and timeouts.command).
    command_timeout: float = _positive(10, max=DAY)


@dataclass(frozen=True)
class User:
    #: A password hash from `geosmtp passwd` (used by AUTH); none means no login.
    password: str | None = field(default=None, metadata={"pattern": "password_hash"})


@dataclass(frozen=True)
class TLS:
    cert: Path | None = field(default=None, metadata={"path": True})
    key: Path | None = field(default=None, metadata={"path": True})
    #: Without cert and key: make a throwaway self-signed certificate at start.
    self_signed: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"
    handshake_timeout: float = _positive(10, max=DAY)


@dataclass(frozen=True)
class Auth:
    #: Offer AUTH without TLS (passwords in the clear): for local testing only.
    allow_plaintext: bool = False
    #: A YAML file with a `users:` mapping like the one here, merged into it.
    users_file: Path | None = field(default=None, metadata={"path": True})
    #: An authenticated user may send only as <user@local domain> (else 553 5.7.1).
    sender_must_match: bool = False
    #: Failed logins from one client (IPv4 address, IPv6 /64) before 421 and disconnect.
    max_failures: int = _positive(5, max=1000)
    #: Seconds the reply to the first failure is held; doubles each time (at most 8 s).
    failure_delay: float = _ranged(1.0, min=0, max=8)


@dataclass(frozen=True)
class SmarthostAuth:
    """AUTH on the smarthost: a user and a password, or a file holding it."""

    user: str | None = None
    password: str | None = field(default=None, metadata={"secret": True})
    password_file: Path | None = field(default=None, metadata={"path": True})


@dataclass(frozen=True)
class RelayTimeouts:
    """Seconds the outbound queue's SMTP client waits for the next hop, at most a
    day (RFC 5321 §4.5.3.2's minimums are the defaults). A hop that stalls past
    one ends the attempt: deferred, retried on `retry_schedule`."""

    connect: float = _positive(30, max=DAY)  # Postfix's smtp_connect_timeout
    #: The greeting, EHLO, STARTTLS, AUTH, MAIL and RCPT, each (§4.5.3.2.1-3).
    command: float = _positive(300, max=DAY)
    data_init: float = _positive(120, max=DAY)  # §4.5.3.2.4: the reply to DATA
    data_block: float = _positive(180, max=DAY)  # §4.5.3.2.5: each send of message data
    data_end: float = _positive(600, max=DAY)  # §4.5.3.2.6: the reply to the end of data


@dataclass(frozen=True)
class Relay:
    """Mail for other domains, from clients that may relay: the outbound queue."""

    #: "host:port": send all such mail there (Postfix's relayhost); unset: each
    #: domain's MX (RFC 5321 §5).
    smarthost: str | None = None
    smarthost_tls: Literal["none", "starttls", "tls"] = "starttls"
    smarthost_auth: SmarthostAuth | None = None
    #: CA certificates (PEM) that the smarthost's certificate is checked
    #: against; unset: the system's.
    smarthost_ca_file: Path | None = field(default=None, metadata={"path": True})
    #: The port MX hosts are reached on (25; another only for tests on loopback).
    mx_port: int = _ranged(25, min=1, max=65535)
    #: Seconds between delivery attempts (the last repeats): minutes first, then
    #: hours, as Postfix and chasquid do (see geosmtp/queue/schedule.py).
    retry_schedule: list[float] = field(default_factory=lambda: list(DEFAULT_RETRY_DELAYS))
    #: Seconds in the queue (5 days): the last attempt is made when they are
    #: over, and the message bounced if it fails too.
    max_lifetime: float = _positive(DEFAULT_MAX_LIFETIME, max=60 * DAY)
    #: Seconds before a delay warning (RFC 3464 "delayed") goes to the sender; 0: never.
    delay_warning: float = _ranged(DEFAULT_DELAY_WARNING, min=0, max=60 * DAY)
    #: Deliveries at once, in all; and to one destination domain.
    concurrency: int = _positive(20, max=10_000)
    per_domain_concurrency: int = _positive(20, max=10_000)
    #: More Received: headers than this is a mail loop (RFC 5321 §6.3): bounced.
    max_received: int = _positive(50, max=1000)
    #: Connection reuse (Postfix's scache): messages one connection to a next
    #: hop may carry (1: a new connection for each), and seconds it may stay
    #: open idle, waiting for the next (0: never kept).
    connection_reuse_limit: int = _positive(100, max=10_000)
    connection_cache_time: float = _ranged(2, min=0, max=300)
    #: The queue's folder; unset: `.queue` inside mail_dir (same filesystem: links).
    queue_dir: Path | None = field(default=None, metadata={"path": True})
    timeouts: RelayTimeouts = field(default_factory=RelayTimeouts)


@dataclass(frozen=True)
class Delivery:
    """Where mail for local mailboxes goes."""

    #: An LMTP server (RFC 2033) that takes it instead of the Maildirs in
    #: mail_dir: "host:port" ("127.0.0.1:24", "[::1]:24") or a UNIX socket's
    #: absolute path ("/run/dovecot/lmtp"). Unset: the Maildirs.
    lmtp: str | None = None


@dataclass(frozen=True)
class DNS:
    #: "ip" or "ip:port" ("[::1]:5353"); unset: the system's (/etc/resolv.conf).
    nameservers: list[str] | None = None
    #: Seconds one lookup may take.
    timeout: float = _positive(5, max=300)


@dataclass(frozen=True)
class CheckPolicy:
    """What one sender check (SPF, DKIM, DMARC) does besides recording its result."""

    enabled: bool = True
    #: On `fail`: `record` (the Authentication-Results field only), `tempfail`
    #: (451: the sender keeps the message and retries) or `reject` (550).
    #: DMARC's applies only to a domain whose policy is p=reject.
    on_fail: Literal["record", "tempfail", "reject"] = "record"
    #: On `temperror` (the DNS failed for now): `record` or `tempfail`.
    on_temperror: Literal["record", "tempfail"] = "record"


@dataclass(frozen=True)
class AuthChecks:
    """SPF, DKIM and DMARC on incoming mail, recorded in one Authentication-Results
    field (RFC 8601); see docs/authentication.md."""

    enabled: bool = False
    #: The listener roles whose mail is checked. Mail from an authenticated
    #: client or a trusted network never is.
    roles: list[Role] = field(default_factory=lambda: ["mx"])
    spf: CheckPolicy = field(default_factory=CheckPolicy)
    dkim: CheckPolicy = field(default_factory=CheckPolicy)
    dmarc: CheckPolicy = field(default_factory=CheckPolicy)
    #: DKIM signatures verified per message (each costs a DNS question); the rest are not.
    max_signatures: int = _ranged(5, min=1, max=50)
    #: The Public Suffix List for DMARC's Organizational Domain; unset: the one
    #: bundled with the publicsuffixlist package.
    public_suffix_list: Path | None = field(default=None, metadata={"path": True})


@dataclass(frozen=True)
class DKIMDomain:
    """The signing key of one sender domain."""

    #: The selector: the key is published at <selector>._domainkey.<domain>.
    selector: str | None = None
    #: The RSA private key, PEM (`geosmtp dkim keygen` makes one).
    key_file: Path | None = field(default=None, metadata={"path": True})


@dataclass(frozen=True)
class DKIMSigning:
    """DKIM signatures on mail from authenticated clients and trusted networks
    for remote recipients, by the domain of its From: address."""

    domains: dict[str, DKIMDomain] = field(default_factory=dict)
    #: The header fields signed (each instance present; From once more).
    headers: list[str] = field(default_factory=lambda: list(DKIM_SIGNED_HEADERS))
    #: c=: header/body canonicalization (RFC 6376 §3.4).
    canonicalization: Literal[
        "relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"
    ] = "relaxed/relaxed"


@dataclass(frozen=True)
class Admin:
    """The management API and /metrics (HTTP/JSON); see docs/management.md."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = _ranged(8025, min=0, max=65535)
    #: The bearer token every request must carry. A secret: never shown by the API.
    token: str | None = field(default=None, metadata={"secret": True})
    #: A file holding the token; made with a random one (mode 0600) if missing.
    token_file: Path | None = field(default=None, metadata={"path": True})
    #: The read-only credential (for Prometheus): GET /metrics and the GET
    #: endpoints, nothing else. Unset (and no read_token_file): none.
    read_token: str | None = field(default=None, metadata={"secret": True})
    #: A file holding it; made with a random one (mode 0600) if missing.
    read_token_file: Path | None = field(default=None, metadata={"path": True})
    #: Seconds a connection may wait for a request's first byte (a new
    #: connection, or a kept-alive one between requests); then it is closed.
    idle_timeout: float = _positive(30, max=3600)
    #: Seconds from a request's first byte until its headers and body are in;
    #: then 400 (a short body) or the connection is closed.
    request_timeout: float = _positive(10, max=3600)
    #: Connections served at once, in all (shared out among the workers);
    #: more wait in the kernel's backlog until one ends.
    max_connections: int = _positive(64, max=10_000)


@dataclass(frozen=True)
class Log:
    dir: Path = field(default=Path("logs"), metadata={"path": True})
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: When a log file is rotated: a size ("10 MB") or an interval ("1 day").
    rotation: str = field(default="10 MB", metadata={"pattern": "rotation"})
    #: How many rotated files to keep.
    retention: int = _positive(10, max=10_000)


@dataclass(frozen=True)
class Filter:
    """One filter stage: an external program (`command`) or a Python callable
    (`call`) that sees each message after DATA; see docs/filters.md."""

    #: Names the stage in the access log, the metrics and the management API.
    name: str = ""
    #: argv (never a shell string): the message on stdin, the new one on stdout.
    #: A first word with a "/" is a path (relative: to the config's folder),
    #: else a program found on the server's PATH; made absolute at load.
    command: list[str] | None = None
    #: "package.module:function", imported at load.
    call: str | None = None
    #: Seconds one run may take; then the program is killed: `on_failure`.
    timeout: float = _positive(120, max=DAY)
    #: Octets the program may write; more: killed, `on_failure`. Unset: twice
    #: limits.max_message_size.
    max_output: int | None = field(default=None, metadata={"positive": True, "max": 2**40})
    #: When the stage fails (crash, timeout, too much output, cannot run):
    #: tempfail (451 4.3.0), reject (554 5.7.1) or pass (the message unchanged).
    on_failure: Literal["tempfail", "reject", "pass"] = "tempfail"
    #: The listener roles whose messages it sees; unset: every role.
    roles: list[Role] | None = None
    #: local: messages whose recipients are all local; outbound: messages with
    #: at least one remote recipient; all.
    mail: Literal["local", "outbound", "all"] = "all"
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=socket.getfqdn)
    domains: list[str] = field(default_factory=lambda: ["localhost"])
    listeners: list[Listener] = field(
        default_factory=lambda: [Listener("127.0.0.1", 2525), Listener("::1", 2525)]
    )
    max_clients: int = _positive(1000, max=1_000_000)
    mail_dir: Path = field(default=Path("mail_dir"), metadata={"path": True})
    #: Where messages are written while they arrive; unset: `<mail_dir>/.spool`.
    #: Keep it on the filesystem of mail_dir (delivery is then a hard link).
    spool_dir: Path | None = field(default=None, metadata={"path": True})
    #: Connections the kernel may queue on each listener before accept (listen(2)).
    listen_backlog: int = _ranged(1024, min=1, max=65535)
    unknown_recipients: Literal["accept", "reject"] = "accept"
    users: dict[str, User] = field(default_factory=dict)
    #: Client networks that may relay without AUTH: ranges inside loopback, RFC 1918
    #: and RFC 4193, and single hosts (`_check_trusted_networks`).
    trusted_networks: list[str] = field(default_factory=list)
    #: Also trust ranges outside those (public, CGNAT, link-local...).
    trusted_networks_allow_public: bool = False
    postmaster: str = "postmaster"
    fsync: bool = True
    vrfy: bool = False
    tls: TLS = field(default_factory=TLS)
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    client_limits: ClientLimits = field(default_factory=ClientLimits)
    stress: Stress = field(default_factory=Stress)
    extensions: Extensions = field(default_factory=Extensions)
    log: Log = field(default_factory=Log)
    admin: Admin = field(default_factory=Admin)
    relay: Relay = field(default_factory=Relay)
    delivery: Delivery = field(default_factory=Delivery)
    dns: DNS = field(default_factory=DNS)
    auth_checks: AuthChecks = field(default_factory=AuthChecks)
    dkim: DKIMSigning = field(default_factory=DKIMSigning)
    #: Filter stages, in the order they run (docs/filters.md).
    filters: list[Filter] = field(default_factory=list)
    #: Filter programs (and Python stages in threads) running at once, in all;
    #: a message waits for a slot until its reply is due (timeouts.data_total).
    filter_concurrency: int = _positive(16, max=10_000)
    #: The account the serving processes run as, when geosmtp is started as
    #: root: it binds, reads its keys and token as root, then drops to it.
    user: str | None = None
    #: That account's group (unset: the user's primary group).
    group: str | None = None
    #: Serving processes (each a gevent loop); unset: one per CPU.
    workers: int | None = field(default=None, metadata={"positive": True, "max": 1024})
    #: A listening socket per worker (SO_REUSEPORT: the kernel spreads new
    #: connections among them by a hash) instead of one socket all workers share.
    reuse_port: bool = False

    @property
    def worker_count(self) -> int:
        """`workers`, or the CPUs this process may run on."""
        if self.workers is not None:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1

    @property
    def queue_path(self) -> Path:
        """The outbound queue's folder: `relay.queue_dir`, or `.queue` in `mail_dir`."""
        if self.relay.queue_dir is not None:
            return self.relay.queue_dir
        return self.mail_dir / ".queue"

    @property
    def spool_path(self) -> Path:
        """The spool folder: `spool_dir`, or `.spool` inside `mail_dir` (no mailbox
        name starts with a dot, so none can be it)."""
        return self.spool_dir if self.spool_dir is not None else self.mail_dir / ".spool"


_PATTERNS = {
    "rotation": re.compile(
        r"\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)|\d+\s*(hours?|days?|weeks?|months?)", re.I
    ),
}
_PATTERNS["password_hash"] = re.compile(r"\$argon2(id|i|d)\$.+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def _is_argon2_hash(text: str) -> bool:
    from argon2 import extract_parameters
    from argon2.exceptions import InvalidHashError

    try:
        extract_parameters(text)
    except InvalidHashError:
        return False
    return True


def _describe(value: Any) -> str:
    """A value as an error quotes it: repr, so control characters show as escapes."""
    return repr(value)


def _convert(tp: Any, value: Any, path: str, meta: typing.Mapping, base: Path) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path, base)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, meta, base)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, int | float) and not isinstance(value, bool) and str(value) in choices:
            value = str(value)  # `tls.min_version: 1.2` unquoted is a YAML float
        if value not in choices:
            raise ConfigError(
                f"{path}: expected one of {', '.join(map(str, choices))}, got {_describe(value)}"
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return [_convert(item_tp, v, f"{path}[{i}]", {}, base) for i, v in enumerate(value)]
    if origin is dict:
        _, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return {str(k): _convert(item_tp, v, f"{path}.{k}", {}, base) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp in (int, float):
        kind = "an integer" if tp is int else "a number"
        if meta.get("positive"):
            kind = "a positive integer" if tp is int else "a positive number"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (tp is int and not isinstance(value, int))
        ):
            raise ConfigError(f"{path}: expected {kind}, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every bound
            raise ConfigError(f"{path}: expected a finite number, got {_describe(value)}")
        if meta.get("positive") and value <= 0:
            raise ConfigError(f"{path}: expected {kind}, got {_describe(value)}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ConfigError(f"{path}: expected at least {lo}, got {_describe(value)}")
        if hi is not None and value > hi:
            raise ConfigError(f"{path}: expected at most {hi}, got {_describe(value)}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: expected a non-empty string, got {_describe(value)}")
        pattern = meta.get("pattern")
        if pattern == "password_hash" and not _PATTERNS[pattern].fullmatch(value):
            raise ConfigError(
                f"{path}: expected a password hash from 'geosmtp passwd', not a password"
            )
        if pattern == "password_hash" and not _is_argon2_hash(value):
            # Cut short in a copy and paste: no login could ever succeed.
            raise ConfigError(f"{path}: not a complete argon2 hash; make one with 'geosmtp passwd'")
        if pattern and not _PATTERNS[pattern].fullmatch(value.strip()):
            raise ConfigError(f"{path}: not a valid {pattern}: {_describe(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{path}: expected a path, got {_describe(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in the schema


def _build(cls: type, data: Any, path: str, base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key_path, f.metadata, base)
        elif f.metadata.get("path"):  # a default path is relative to the config too
            kwargs[name] = _convert(hints[name], f.default, key_path, f.metadata, base)
        elif dataclasses.is_dataclass(hints[name]):  # so do the paths in a default section
            kwargs[name] = _build(hints[name], {}, key_path, base)
    return cls(**kwargs)


#: The ranges `trusted_networks` holds without `trusted_networks_allow_public`:
#: loopback, RFC 1918 and RFC 4193 (unique local), which no one on the
#: internet can send from. Not `is_private`: it holds public space (2001::/23,
#: documentation and benchmark ranges), and link-local and CGNAT are left out
#: (any host on the link takes a link-local address; CGNAT is the provider's).
_TRUSTABLE = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7")
)


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _inside(net: ipaddress.IPv4Network | ipaddress.IPv6Network, known: object) -> bool:
    """`net` lies within `known`, a network of the same version (else False)."""
    if isinstance(net, ipaddress.IPv4Network) and isinstance(known, ipaddress.IPv4Network):
        return net.subnet_of(known)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(known, ipaddress.IPv6Network):
        return net.subnet_of(known)
    return False


def _check_trusted_networks(config: Config) -> None:
    """Each entry a network that can only mean the operator's own hosts: inside
    `_TRUSTABLE`, or a single host (a /32 or /128: an explicit choice). Wider
    ranges only with `trusted_networks_allow_public`; wider than a /8 never."""
    for i, text in enumerate(config.trusted_networks):
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_networks[{i}]: not a network: {_describe(text)}") from None
        if _inside(net, _IPV4_MAPPED):
            # A client on IPv4 is matched by its IPv4 address (and an IPv6
            # listener takes no IPv4): such an entry would match no one.
            raise ConfigError(
                f"trusted_networks[{i}]: {_describe(text)} is an IPv4-mapped IPv6 network; "
                "write its IPv4 form"
            )
        if net.is_link_local:
            raise ConfigError(
                f"trusted_networks[{i}]: {_describe(text)} is link-local; any host on the "
                "link can take such an address"
            )
        if net.prefixlen == net.max_prefixlen or any(_inside(net, known) for known in _TRUSTABLE):
            continue
        if not config.trusted_networks_allow_public:
            raise ConfigError(
                f"trusted_networks[{i}]: {_describe(text)} is not a loopback or private network "
                "(inside 127.0.0.0/8, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, ::1 or "
                "fc00::/7) nor a single host; trusting it would make an open relay "
                "(set trusted_networks_allow_public: true if every address in it is yours)"
            )
        if net.prefixlen < 8:
            # Whatever else is set: this is most of the internet.
            raise ConfigError(
                f"trusted_networks[{i}]: {_describe(text)} is wider than a /8; "
                "trusting it would make an open relay"
            )


def _check_proxy_protocol(config: Config) -> None:
    """`proxy_trusted` given exactly with `proxy_protocol`, on TCP listeners,
    each entry a network or a single address (issue 22)."""
    for i, listener in enumerate(config.listeners):
        key = f"listeners[{i}]"
        if not listener.proxy_protocol:
            if listener.proxy_trusted:
                raise ConfigError(
                    f"{key}.proxy_trusted: set without proxy_protocol: true (it names who "
                    "may send a PROXY header)"
                )
            continue
        if listener.path is not None:
            raise ConfigError(f"{key}.proxy_protocol: not on a UNIX socket (path) listener")
        if not listener.proxy_trusted:
            raise ConfigError(
                f"{key}.proxy_trusted: needed with proxy_protocol: true (the load "
                "balancers' networks or addresses)"
            )
        for j, text in enumerate(listener.proxy_trusted):
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{key}.proxy_trusted[{j}]: not a network or address: {_describe(text)}"
                ) from None
            if _inside(net, _IPV4_MAPPED):
                raise ConfigError(
                    f"{key}.proxy_trusted[{j}]: {_describe(text)} is an IPv4-mapped IPv6 "
                    "network; write its IPv4 form"
                )


def _check(config: Config) -> None:
    """Checks that span keys or need more than a type: the whole config, as it would run."""
    if not _HOSTNAME_RE.fullmatch(config.hostname):
        raise ConfigError(f"hostname: not a valid host name: {_describe(config.hostname)}")
    if not config.domains:
        raise ConfigError("domains: at least one local domain is needed")
    for i, name in enumerate(config.domains):
        problem = _domain_problem(name)
        if problem:
            raise ConfigError(
                f"domains[{i}]: not a valid domain name: {_describe(name)} ({problem})"
            )
    for i, listener in enumerate(config.listeners):
        try:
            ipaddress.ip_address(listener.address)
        except ValueError:
            raise ConfigError(
                f"listeners[{i}].address: not an IP address: {_describe(listener.address)}"
            ) from None
    if not config.listeners:
        raise ConfigError("listeners: at least one listener is needed")
    _check_socket_paths(config)
    _check_trusted_networks(config)
    _check_proxy_protocol(config)
    admin = config.admin
    try:
        ipaddress.ip_address(admin.address)
    except ValueError:
        raise ConfigError(f"admin.address: not an IP address: {_describe(admin.address)}") from None
    _check_sockets(config)
    if admin.enabled and admin.token is None and admin.token_file is None:
        raise ConfigError("admin.token: the admin listener needs a token or a token_file")
    if admin.token is not None and len(admin.token) < 16:
        raise ConfigError("admin.token: use at least 16 characters")
    if admin.read_token is not None and len(admin.read_token) < 16:
        raise ConfigError("admin.read_token: use at least 16 characters")
    if admin.read_token is not None and admin.read_token == admin.token:
        raise ConfigError("admin.read_token: must differ from admin.token (the write token)")
    if admin.read_token_file is not None and admin.read_token_file == admin.token_file:
        raise ConfigError("admin.read_token_file: must be another file than admin.token_file")
    has_tls = config.tls.cert is not None or config.tls.self_signed
    for i, listener in enumerate(config.listeners):
        if listener.role in IMPLICIT_TLS_ROLES and not has_tls:
            raise ConfigError(
                f"listeners[{i}].role: {listener.role} needs tls.cert and tls.key "
                "(or tls.self_signed)"
            )
    from .mail import safe_mailbox_name

    for name in [*config.users, config.postmaster]:
        if safe_mailbox_name(name) != name:
            key = "postmaster" if name == config.postmaster else f"users.{name}"
            raise ConfigError(f"{key}: not a valid mailbox name (lower-case, no '/' or '..')")
    _check_relay(config)
    _check_delivery(config)
    _check_mailauth(config)
    folders = [("mail_dir", config.mail_dir), ("log.dir", config.log.dir)]
    if config.spool_dir is not None:
        folders.append(("spool_dir", config.spool_dir))
    if config.relay.queue_dir is not None:
        folders.append(("relay.queue_dir", config.relay.queue_dir))
    for key, folder in folders:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{key}: {_describe(str(folder))} is not a directory")
    _check_private_folders(config)


def _check_private_folders(config: Config) -> None:
    """The spool, the queue and the queue's own folders are real folders, never
    symbolic links (`.queue/messages` -> elsewhere would write relayed mail
    outside `mail_dir`): the spool and the store refuse one too when they make
    them (`storage.modes.make_real_folder`); said here first, naming the key."""
    queue = config.queue_path
    folders = [("spool_dir", config.spool_path), ("relay.queue_dir", queue)]
    folders += [("relay.queue_dir", queue / name) for name in QUEUE_FOLDERS]
    for key, folder in folders:
        if folder.is_symlink():
            raise ConfigError(
                f"{key}: {_describe(str(folder))} is a symbolic link: the spool and "
                "the queue are never reached through one (give the real folder)"
            )


def host_port(text: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); ValueError when it is neither."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or any(c.isspace() for c in host):
        raise ValueError("expected host:port")
    return host, int(port)


#: The longest UNIX socket path connect(2) takes (sun_path less its NUL).
MAX_SOCKET_PATH = 107


def lmtp_target(text: str) -> tuple[str, int]:
    """`delivery.lmtp` as (host, port), or (path, 0) for a UNIX socket;
    ValueError (its reason) when it is neither."""
    if text.startswith("/"):
        if len(os.fsencode(text)) > MAX_SOCKET_PATH:
            raise ValueError(f"a UNIX socket path is at most {MAX_SOCKET_PATH} octets")
        if "\0" in text or text.endswith("/"):
            raise ValueError("expected a UNIX socket's path")
        return text, 0
    try:
        return host_port(text)
    except ValueError:
        raise ValueError("expected host:port or a UNIX socket's absolute path") from None


def _check_delivery(config: Config) -> None:
    lmtp = config.delivery.lmtp
    if lmtp is None:
        return
    try:
        lmtp_target(lmtp)
    except ValueError as exc:
        raise ConfigError(f"delivery.lmtp: {exc}, got {_describe(lmtp)}") from None


def _check_relay(config: Config) -> None:
    relay = config.relay
    if relay.smarthost is not None:
        try:
            host_port(relay.smarthost)
        except ValueError:
            raise ConfigError(
                f"relay.smarthost: expected host:port, got {_describe(relay.smarthost)}"
            ) from None
    auth = relay.smarthost_auth
    if auth is not None:
        if not auth.user:
            raise ConfigError("relay.smarthost_auth.user: a user name is needed")
        if (auth.password is None) == (auth.password_file is None):
            raise ConfigError("relay.smarthost_auth: give password or password_file (one)")
    if not relay.retry_schedule:
        raise ConfigError("relay.retry_schedule: at least one delay is needed")
    for i, delay in enumerate(relay.retry_schedule):
        if not 0 < delay <= 60 * DAY:
            raise ConfigError(
                f"relay.retry_schedule[{i}]: expected more than 0 and at most {60 * DAY} "
                f"seconds, got {_describe(delay)}"
            )
    for i, spec in enumerate(config.dns.nameservers or []):
        host, _, port = (
            spec.rpartition(":") if spec.count(":") == 1 or "]" in spec else ("", "", "")
        )
        address = (host or spec).strip("[]")
        try:
            ipaddress.ip_address(address)
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"dns.nameservers[{i}]: expected an IP address or ip:port, got {_describe(spec)}"
            ) from None


_SELECTOR_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def _check_mailauth(config: Config) -> None:
    """`auth_checks:` and `dkim:`; each signing key is read, so a bad one fails here."""
    psl = config.auth_checks.public_suffix_list
    if config.auth_checks.enabled and psl is not None and not psl.is_file():
        raise ConfigError(f"auth_checks.public_suffix_list: no such file: {_describe(str(psl))}")
    dkim = config.dkim
    names = [h.lower() for h in dkim.headers]
    for i, name in enumerate(names):
        if not _FIELD_NAME_RE.fullmatch(name):
            raise ConfigError(f"dkim.headers[{i}]: not a header field name: {_describe(name)}")
        if name in DKIM_UNSIGNED_HEADERS:
            raise ConfigError(f"dkim.headers[{i}]: {name} is changed in transit; never sign it")
    if dkim.domains and "from" not in names:
        raise ConfigError("dkim.headers: From must be signed (RFC 6376 §5.4)")
    for domain, entry in dkim.domains.items():
        key = f"dkim.domains.{domain}"
        problem = _domain_problem(domain)
        if problem:
            raise ConfigError(f"{key}: not a valid domain name ({problem})")
        if entry.selector is None or not _SELECTOR_RE.fullmatch(entry.selector):
            raise ConfigError(
                f"{key}.selector: expected a selector (letters, digits, '-', '.'), "
                f"got {_describe(entry.selector)}"
            )
        if entry.key_file is None:
            raise ConfigError(f"{key}.key_file: the domain's private key is needed")
        try:
            load_key(entry.key_file)
        except OSError as exc:
            raise ConfigError(
                f"{key}.key_file: cannot read '{entry.key_file}': {exc.strerror}"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"{key}.key_file: '{entry.key_file}': {exc}") from None


def _check_sockets(config: Config) -> None:
    """Two listeners that cannot both bind fail here, naming both, not at the start.

    The same address and port, or the same port on an address and the wildcard
    of its family (binding 127.0.0.1:25 beside a listening 0.0.0.0:25 fails
    even with SO_REUSEADDR). IPv6 sockets are IPv6-only, so the families never
    collide; port 0 is a fresh port each time.
    """
    sockets = [
        (f"listeners[{i}]", li.address, li.port)
        for i, li in enumerate(config.listeners)
        if li.path is None
    ]
    if config.admin.enabled:
        sockets.append(("admin", config.admin.address, config.admin.port))
    seen: list[tuple[str, str, Any, int]] = []
    for name, address, port in sockets:
        ip = ipaddress.ip_address(address)
        for other, other_address, other_ip, other_port in seen:
            if port == 0 or port != other_port or ip.version != other_ip.version:
                continue
            if ip == other_ip:
                raise ConfigError(
                    f"{name}: same address and port as {other} ([{other_address}]:{port})"
                )
            if ip.is_unspecified or other_ip.is_unspecified:
                every = f"every IPv{ip.version} address"
                detail = (
                    f"[{other_address}]:{port}, {every}"
                    if other_ip.is_unspecified
                    else f"[{other_address}]:{port}; [{address}] is {every}"
                )
                raise ConfigError(
                    f"{name}: [{address}]:{port} cannot be bound beside {other} ({detail})"
                )
        seen.append((name, address, ip, port))


def _check_socket_paths(config: Config) -> None:
    """A UNIX socket `path` only for an `lmtp` listener, short enough, and one
    listener per path."""
    seen: dict[str, int] = {}
    for i, listener in enumerate(config.listeners):
        if listener.path is None:
            continue
        if listener.role != "lmtp":
            raise ConfigError(
                f"listeners[{i}].path: only an lmtp listener listens on a UNIX socket, "
                f"not {listener.role}"
            )
        text = str(listener.path)
        if len(os.fsencode(text)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"listeners[{i}].path: {_describe(text)} is longer than a UNIX socket's "
                f"{MAX_SOCKET_PATH} bytes"
            )
        if text in seen:
            raise ConfigError(f"listeners[{i}].path: same path as listeners[{seen[text]}]")
        seen[text] = i


_LDH_LABEL = re.compile(r"[a-z0-9-]+", re.IGNORECASE)


def _domain_problem(name: str) -> str | None:
    """Why `name` is not a domain name (RFC 1035 §2.3.1, RFC 5890 for IDNs), or None.

    An internationalised name must encode with IDNA; it is kept as given.
    """
    if any(c.isspace() or not c.isprintable() for c in name):
        return "no spaces or control characters"
    if "" in name.split("."):
        return "an empty label"
    ascii_name = name
    if not name.isascii():
        try:
            ascii_name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return "not a valid internationalised name"
    for label in ascii_name.split("."):
        if len(label) > 63:
            return "a label longer than 63 characters"
        if not _LDH_LABEL.fullmatch(label):
            return "a label may hold only letters, digits and '-'"
        if label.startswith("-") or label.endswith("-"):
            return "a label may not start or end with '-'"
    if len(ascii_name) > 253:
        return "longer than 253 characters"
    return None


_FILTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _filters(config: Config, base: Path) -> list[Filter]:
    """The `filters:` stages checked, each program's path made absolute and each
    callable imported (so a missing one stops the load, not the first message)."""
    out = []
    seen: set[str] = set()
    for i, stage in enumerate(config.filters):
        key = f"filters[{i}]"
        if not _FILTER_NAME_RE.fullmatch(stage.name):
            raise ConfigError(
                f"{key}.name: expected a name of letters, digits, '_', '.' and '-' "
                f"(at most 64), got {_describe(stage.name)}"
            )
        if stage.name in seen:
            raise ConfigError(f"{key}.name: {stage.name!r} names two filters")
        seen.add(stage.name)
        if (stage.command is None) == (stage.call is None):
            raise ConfigError(f"{key}: give command (a program) or call (a Python callable)")
        if stage.command is not None:
            if not stage.command:
                raise ConfigError(f"{key}.command: expected the program and its arguments")
            program = _find_program(stage.command[0], base, f"{key}.command")
            stage = dataclasses.replace(stage, command=[program, *stage.command[1:]])
        else:
            try:
                load_callable(stage.call or "")
            except ValueError as exc:
                raise ConfigError(f"{key}.call: {exc}") from None
        out.append(stage)
    return out


def _find_program(name: str, base: Path, key: str) -> str:
    """A program's absolute path: `name` with a "/" is a path (relative to the
    config's folder), else it is looked up on PATH."""
    if "/" in name:
        path = Path(name).expanduser()
        found = str(path if path.is_absolute() else base / path)
        if not (os.path.isfile(found) and os.access(found, os.X_OK)):
            raise ConfigError(f"{key}: {_describe(found)} is not an executable file")
        return found
    on_path = shutil.which(name)
    if on_path is None:
        raise ConfigError(f"{key}: no program {_describe(name)} on PATH")
    return os.path.abspath(on_path)


def from_mapping(data: Any, base: Path = Path(".")) -> Config:
    config = _build(Config, {} if data is None else data, "", base.resolve())
    config = dataclasses.replace(config, domains=[d.lower() for d in config.domains])
    if config.filters:
        config = dataclasses.replace(config, filters=_filters(config, base.resolve()))
    if config.auth.users_file is not None:
        config = dataclasses.replace(config, users={**config.users, **_users_file(config)})
    _check(config)
    return config


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last of them silently; in a config that hides a mistake
    (two `domains:`, two `limits:` sections). Keys brought in by a merge
    (`<<: *base`) may still be overridden.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {earlier.start_mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> tuple[Any, str]:
    """(data, "") or (None, the problem as one line: ' at line 3, column 5: what')."""
    try:
        return yaml.load(text, Loader=StrictLoader), ""  # a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "not YAML"
        return None, f"{where}: {what}"
    except yaml.reader.ReaderError as exc:
        return None, f" at character {exc.position}: {exc.reason}"
    except yaml.YAMLError as exc:
        return None, ": " + " ".join(str(exc).split())


def _users_file(config: Config) -> dict[str, User]:
    path = config.auth.users_file
    assert path is not None
    try:
        data, problem = _parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"auth.users_file: cannot read '{path}': {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"auth.users_file: '{path}' is not UTF-8 (at byte {exc.start})") from None
    if problem:
        raise ConfigError(f"auth.users_file: invalid YAML in '{path}'{problem}")
    if not isinstance(data, dict) or set(data) - {"users"}:
        raise ConfigError(f"auth.users_file: '{path}' must hold one mapping, 'users:'")
    return _convert(dict[str, User], data.get("users") or {}, f"{path}: users", {}, path.parent)


#: Settings that `PATCH /api/v1/config` and reload may change without a restart.
#: The rest (where the server listens, where mail goes, the admin listener
#: itself, the log folder) needs one.
RESTART_ONLY = (
    "hostname",
    "user",
    "group",
    "workers",
    "reuse_port",
    "listeners",
    "listen_backlog",
    "mail_dir",
    "spool_dir",
    "log.dir",
    "admin",
    "fsync",
    "relay",
    "delivery",
    "dns",
)


#: The keys `PATCH /api/v1/config` may change: numbers, switches and levels
#: that name no program, module, file or account (docs/management.md,
#: "Runtime-safe keys"). Every other key changes only through the file and a
#: reload (or, for RESTART_ONLY, a restart): a write token is not a shell.
RUNTIME_SAFE = (
    "max_clients",
    "unknown_recipients",
    "vrfy",
    "limits",
    "client_limits",
    "stress",
    "timeouts",
    "extensions",
    "log.level",
    "filter_concurrency",
    "tls.min_version",
    "tls.self_signed",
    "tls.handshake_timeout",
    "auth.max_failures",
    "auth.failure_delay",
    "auth_checks.enabled",
    "auth_checks.roles",
    "auth_checks.spf",
    "auth_checks.dkim",
    "auth_checks.dmarc",
    "auth_checks.max_signatures",
)
#: A filter stage's runtime-safe keys (its name, program and callable are not).
FILTER_RUNTIME_SAFE = ("enabled", "timeout", "max_output", "on_failure", "roles", "mail")


class NotRuntimeSafe(ConfigError):
    """A change through the API to a key that only the config file may change."""


def check_runtime_change(old: dict, new: Any, base: Path = Path(".")) -> None:
    """Refuse a change through the API from `old` to `new` (`to_mapping`
    results) unless it changes only runtime-safe keys.

    `new` is first checked for its shape only (unknown keys, types: nothing
    is read or imported), so a typo is a plain ConfigError; then a changed key
    that needs a restart is a ConfigError, and any other key that is not in
    RUNTIME_SAFE (or FILTER_RUNTIME_SAFE) a NotRuntimeSafe naming them all.
    """
    if not isinstance(new, dict):
        raise ConfigError("the change must be a config mapping")
    _build(Config, new, "", base.resolve())
    changed = changed_keys(
        {k: v for k, v in old.items() if k != "filters"},
        {k: v for k, v in new.items() if k != "filters"},
    )
    restart = needs_restart(changed)
    if restart:
        raise ConfigError(f"{restart[0]}: cannot change while running; restart geosmtp")
    refused = [k for k in changed if not _under(k, RUNTIME_SAFE)]
    refused += _filter_changes(old.get("filters") or [], new.get("filters") or [])
    if refused:
        raise NotRuntimeSafe(
            f"{', '.join(refused)}: not changeable through the API (it names a program, "
            "module, file or account, or decides whose mail this is); "
            "change it in the config file and reload"
        )


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _filter_changes(old: list, new: list) -> list[str]:
    """The changed keys of `filters:` that are not runtime-safe: a stage added,
    removed, renamed or moved is `filters`; else `filters[i].command` etc."""
    if old == new:
        return []
    names = [f.get("name") if isinstance(f, dict) else None for f in new]
    if names != [f["name"] for f in old]:
        return ["filters"]
    keys = []
    for i, (before, after) in enumerate(zip(old, new, strict=True)):
        for key in changed_keys(before, after):
            if not _under(key, FILTER_RUNTIME_SAFE):
                keys.append(f"filters[{i}].{key}")
    return keys


def to_mapping(config: Any, redact: bool = False) -> Any:
    """The config as plain YAML/JSON data (paths as strings); secrets hidden on request."""
    if dataclasses.is_dataclass(config):
        out = {}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            hidden = f.metadata.get("secret") or f.metadata.get("pattern") == "password_hash"
            if redact and hidden and value is not None:
                out[f.name] = "<redacted>"
            else:
                out[f.name] = to_mapping(value, redact)
        return out
    if isinstance(config, dict):
        return {k: to_mapping(v, redact) for k, v in config.items()}
    if isinstance(config, list):
        return [to_mapping(v, redact) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def lookup(data: Any, key: str) -> Any:
    """`limits.max_message_size` in a mapping from `to_mapping`; KeyError names the key."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(key)
        data = data[part]
    return data


def merged(base: dict, patch: dict, path: str = "") -> dict:
    """`base` with `patch` laid over it, mappings merged key by key."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value, f"{path}{key}.")
        else:
            out[key] = value
    return out


def changed_keys(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two `to_mapping` results.

    A key present on one side only has changed, whatever its value: a user
    added as `eve: null` (no password) is an account added, not a no-op.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            if (k in old) != (k in new):
                keys.append(f"{path}{k}")
            else:
                keys += changed_keys(old[k], new[k], f"{path}{k}.")
        return keys
    return [] if old == new else [path.rstrip(".")]


def needs_restart(keys: list[str]) -> list[str]:
    return [k for k in keys if any(k == r or k.startswith(r + ".") for r in RESTART_ONLY)]


def load(path: str | Path) -> Config:
    """Read and validate a YAML file; relative paths resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (at byte {exc.start})") from None
    data, problem = _parse_yaml(text)
    if problem:
        raise ConfigError(f"{path}: invalid YAML{problem}")
    return from_mapping(data, path.parent)
