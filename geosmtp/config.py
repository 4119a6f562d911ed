"""The YAML configuration, loaded into frozen dataclasses.

The dataclasses are the schema: every field has a type and a default (so an
empty file runs), and `metadata` carries the extra checks (minimum, choices,
path). Errors name the key path: `limits.max_message_size: expected a
positive integer, got 'ten'`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The `extensions:` section is the core's own switchboard: one dataclass for both.
from .smtp.session import Extensions


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key path."""


def _positive(default: float, **extra: Any) -> Any:
    """A number that must be above zero (an int field: at least 1)."""
    return field(default=default, metadata={"positive": True, **extra})


#: What a listener is for: `mx` takes mail for the local domains from anyone;
#: `submission` (port 587) wants AUTH before MAIL; `submissions` (port 465) is
#: the same inside implicit TLS (RFC 8314).
Role = Literal["mx", "submission", "submissions"]


@dataclass(frozen=True)
class Listener:
    #: IPv4 or IPv6 address to bind ("0.0.0.0" or "::" for all).
    address: str = "127.0.0.1"
    port: int = field(default=2525, metadata={"min": 0, "max": 65535})
    role: Role = "mx"


@dataclass(frozen=True)
class Limits:
    command_line: int = field(default=512, metadata={"min": 512})  # RFC 5321 §4.5.3.1.4
    text_line: int = field(default=1000, metadata={"min": 1000})  # RFC 5321 §4.5.3.1.6
    max_message_size: int = _positive(10 * 1024 * 1024)
    max_recipients: int = _positive(100)  # RFC 5321 §4.5.3.1.8 asks for at least 100
    max_errors: int = _positive(20)


@dataclass(frozen=True)
class Timeouts:
    """Seconds. RFC 5321 §4.5.3.2 suggests the server waits 5 minutes for a command."""

    command: float = _positive(300)
    data_block: float = _positive(180)  # §4.5.3.2.5: between two reads of message data
    data_total: float = _positive(600)  # the whole of DATA, however it trickles
    shutdown_grace: float = field(default=10, metadata={"min": 0})


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
    handshake_timeout: float = _positive(10)


@dataclass(frozen=True)
class Auth:
    #: Offer AUTH without TLS (passwords in the clear): for local testing only.
    allow_plaintext: bool = False
    #: A YAML file with a `users:` mapping like the one here, merged into it.
    users_file: Path | None = field(default=None, metadata={"path": True})
    #: An authenticated user may send only as <user@local domain> (else 553 5.7.1).
    sender_must_match: bool = False
    #: Failed logins from one address before 421 and disconnect.
    max_failures: int = _positive(5)
    #: Seconds the reply to the first failure is held; doubles each time (at most 8 s).
    failure_delay: float = field(default=1.0, metadata={"min": 0})


@dataclass(frozen=True)
class Admin:
    """The management API and /metrics (HTTP/JSON); see docs/management.md."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = field(default=8025, metadata={"min": 0, "max": 65535})
    #: The bearer token every request must carry. A secret: never shown by the API.
    token: str | None = field(default=None, metadata={"secret": True})
    #: A file holding the token; made with a random one (mode 0600) if missing.
    token_file: Path | None = field(default=None, metadata={"path": True})


@dataclass(frozen=True)
class Log:
    dir: Path = field(default=Path("logs"), metadata={"path": True})
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: When a log file is rotated: a size ("10 MB") or an interval ("1 day").
    rotation: str = field(default="10 MB", metadata={"pattern": "rotation"})
    #: How many rotated files to keep.
    retention: int = _positive(10)


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=socket.getfqdn)
    domains: list[str] = field(default_factory=lambda: ["localhost"])
    listeners: list[Listener] = field(
        default_factory=lambda: [Listener("127.0.0.1", 2525), Listener("::1", 2525)]
    )
    max_clients: int = _positive(1000)
    mail_dir: Path = field(default=Path("mail_dir"), metadata={"path": True})
    unknown_recipients: Literal["accept", "reject"] = "accept"
    users: dict[str, User] = field(default_factory=dict)
    #: Client networks that may relay without AUTH: loopback and private ranges only.
    trusted_networks: list[str] = field(default_factory=list)
    postmaster: str = "postmaster"
    fsync: bool = True
    vrfy: bool = False
    tls: TLS = field(default_factory=TLS)
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    extensions: Extensions = field(default_factory=Extensions)
    log: Log = field(default_factory=Log)
    admin: Admin = field(default_factory=Admin)


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
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def _convert(tp: Any, value: Any, path: str, meta: typing.Mapping, base: Path) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path, base)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, meta, base)
    if origin is Literal:
        choices = typing.get_args(tp)
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
            or (meta.get("positive") and value <= 0)
        ):
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


def _check(config: Config) -> None:
    """Checks that span keys or need more than a type."""
    if not _HOSTNAME_RE.fullmatch(config.hostname):
        raise ConfigError(f"hostname: not a valid host name: '{config.hostname}'")
    if not config.domains:
        raise ConfigError("domains: at least one local domain is needed")
    for i, listener in enumerate(config.listeners):
        try:
            ipaddress.ip_address(listener.address)
        except ValueError:
            raise ConfigError(
                f"listeners[{i}].address: not an IP address: '{listener.address}'"
            ) from None
    if not config.listeners:
        raise ConfigError("listeners: at least one listener is needed")
    for i, text in enumerate(config.trusted_networks):
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_networks[{i}]: not a network: '{text}'") from None
        # Trusting a public range would make an open relay, whatever else is set.
        if not (net.is_loopback or net.is_private or net.is_link_local) or net.prefixlen < 8:
            raise ConfigError(
                f"trusted_networks[{i}]: '{text}' is not a loopback or private network; "
                "trusting it would make an open relay"
            )
    admin = config.admin
    try:
        ipaddress.ip_address(admin.address)
    except ValueError:
        raise ConfigError(f"admin.address: not an IP address: '{admin.address}'") from None
    if admin.enabled and admin.token is None and admin.token_file is None:
        raise ConfigError("admin.token: the admin listener needs a token or a token_file")
    if admin.token is not None and len(admin.token) < 16:
        raise ConfigError("admin.token: use at least 16 characters")
    has_tls = config.tls.cert is not None or config.tls.self_signed
    for i, listener in enumerate(config.listeners):
        if listener.role == "submissions" and not has_tls:
            raise ConfigError(
                f"listeners[{i}].role: submissions needs tls.cert and tls.key (or tls.self_signed)"
            )
    from .mail import safe_mailbox_name

    for name in [*config.users, config.postmaster]:
        if safe_mailbox_name(name) != name:
            key = "postmaster" if name == config.postmaster else f"users.{name}"
            raise ConfigError(f"{key}: not a valid mailbox name (lower-case, no '/' or '..')")


def from_mapping(data: Any, base: Path = Path(".")) -> Config:
    config = _build(Config, {} if data is None else data, "", base.resolve())
    config = dataclasses.replace(config, domains=[d.lower() for d in config.domains])
    if config.auth.users_file is not None:
        config = dataclasses.replace(config, users={**config.users, **_users_file(config)})
    _check(config)
    return config


def _users_file(config: Config) -> dict[str, User]:
    path = config.auth.users_file
    assert path is not None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"auth.users_file: cannot read '{path}': {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"auth.users_file: invalid YAML in '{path}': {exc}") from None
    if not isinstance(data, dict) or set(data) - {"users"}:
        raise ConfigError(f"auth.users_file: '{path}' must hold one mapping, 'users:'")
    return _convert(dict[str, User], data.get("users") or {}, f"{path}: users", {}, path.parent)


#: Settings that `PATCH /api/v1/config` and reload may change without a restart.
#: The rest (where the server listens, where mail goes, the admin listener
#: itself, the log folder) needs one.
RESTART_ONLY = ("hostname", "listeners", "mail_dir", "log.dir", "admin", "fsync")


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
    """Dotted keys whose values differ between two `to_mapping` results."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in sorted(set(old) | set(new)):
            keys += changed_keys(old.get(k), new.get(k), f"{path}{k}.")
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return from_mapping(data, path.parent)
