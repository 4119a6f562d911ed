"""Config values that would stop all mail: ranges, YAML pitfalls, listeners that cannot
all bind, domain names, folders that are files, control characters in messages."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml

from geosmtp import config as cfg

#: Every section of the config (`tls:`, `relay:`, `auth_checks:`, ...), from the schema.
SECTIONS = {
    f.name: tp
    for f in dataclasses.fields(cfg.Config)
    if dataclasses.is_dataclass(tp := typing.get_type_hints(cfg.Config)[f.name])
}


def _numeric_fields(cls: type) -> list[tuple[str, type, typing.Mapping]]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return [(f.name, hints[f.name], f.metadata) for f in fields if hints[f.name] in (int, float)]


def numeric_keys() -> list[tuple[str, type, typing.Mapping]]:
    """Every numeric key of the schema, as a key path: `timeouts.command`, `listeners[0].port`."""
    keys = [(name, tp, meta) for name, tp, meta in _numeric_fields(cfg.Config)]
    for section, cls in SECTIONS.items():
        keys += [(f"{section}.{name}", tp, meta) for name, tp, meta in _numeric_fields(cls)]
    keys += [(f"listeners[0].{name}", tp, m) for name, tp, m in _numeric_fields(cfg.Listener)]
    return keys


NUMERIC = numeric_keys()


def mapping_for(key: str, value: object) -> dict:
    """The smallest config that sets `key` (a path from `numeric_keys`) to `value`."""
    if key.startswith("listeners[0]."):
        return {"listeners": [{"address": "127.0.0.1", key.split(".")[1]: value}]}
    section, _, name = key.partition(".")
    return {section: {name: value}} if name else {section: value}


def load_text(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return cfg.load(path)


def load_data(tmp_path: Path, data: dict) -> cfg.Config:
    return load_text(tmp_path, yaml.safe_dump(data))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(cfg.ConfigError) as err:
        load_text(tmp_path, text)
    message = str(err.value)
    assert message.isprintable(), repr(message)  # one line, no control characters
    return message


# ------------------------------------------------------------------ ranges


def test_every_numeric_key_has_a_documented_range():
    assert len(NUMERIC) >= 16
    for key, _, meta in NUMERIC:
        assert "max" in meta, key
        assert "min" in meta or meta.get("positive"), key


def test_the_ranges_are_documented():
    root = Path(__file__).parents[2]
    management = (root / "docs" / "management.md").read_text()
    for key, _, meta in NUMERIC:
        generic = key.replace("listeners[0]", "listeners[]")
        assert f"`{generic}`" in management, key
        assert f"{meta['max']:,}" in management or str(meta["max"]) in management, key


@pytest.mark.parametrize(("key", "tp", "meta"), NUMERIC, ids=[k for k, _, _ in NUMERIC])
@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, 1e308, 10**20],
    ids=["nan", "inf", "-inf", "1e308", "20 digits"],
)
def test_nan_infinite_and_huge_values_are_refused(tmp_path, key, tp, meta, value):
    text = yaml.safe_dump(mapping_for(key, value))
    message = error_of(tmp_path, text)
    assert message.startswith(f"{key}: expected "), message


@pytest.mark.parametrize(("key", "tp", "meta"), NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_the_bounds_are_inclusive(tmp_path, key, tp, meta):
    top = meta["max"]
    config = cfg.to_mapping(load_data(tmp_path, mapping_for(key, top)))
    if key.startswith("listeners[0]."):
        assert config["listeners"][0][key.split(".")[1]] == top
    else:
        assert cfg.lookup(config, key) == top
    over = top + 1 if tp is int else top * 1.5
    message = error_of(tmp_path, yaml.safe_dump(mapping_for(key, over)))
    assert message == f"{key}: expected at most {top}, got {over!r}", message


def test_out_of_range_messages(tmp_path):
    assert error_of(tmp_path, "timeouts: {data_block: .nan}") == (
        "timeouts.data_block: expected a finite number, got nan"
    )
    assert error_of(tmp_path, "timeouts: {command: .inf}") == (
        "timeouts.command: expected a finite number, got inf"
    )
    assert error_of(tmp_path, "timeouts: {data_total: 1.0e+308}") == (
        "timeouts.data_total: expected at most 86400, got 1e+308"
    )
    assert error_of(tmp_path, "max_clients: 12345678901234567890") == (
        "max_clients: expected at most 1000000, got 12345678901234567890"
    )
    assert error_of(tmp_path, "auth: {failure_delay: -1}") == (
        "auth.failure_delay: expected at least 0, got -1"
    )


def test_fractions_and_zero_where_allowed(tmp_path):
    config = load_text(
        tmp_path, "timeouts: {shutdown_grace: 0, data_block: 0.25}\nauth: {failure_delay: 0}"
    )
    assert config.timeouts.shutdown_grace == 0 and config.timeouts.data_block == 0.25
    assert config.auth.failure_delay == 0


# --------------------------------------------------------- tls.min_version


@pytest.mark.parametrize(("text", "version"), [("1.2", "1.2"), ("1.3", "1.3"), ('"1.3"', "1.3")])
def test_min_version_unquoted_is_accepted(tmp_path, text, version):
    config = load_text(tmp_path, f"tls:\n  min_version: {text}\n")
    assert config.tls.min_version == version
    assert isinstance(config.tls.min_version, str)


def test_min_version_other_numbers_are_refused(tmp_path):
    assert error_of(tmp_path, "tls: {min_version: 1.1}") == (
        "tls.min_version: expected one of 1.2, 1.3, got 1.1"
    )
    assert error_of(tmp_path, "tls: {min_version: 1}").startswith("tls.min_version: expected one")


# ------------------------------------------------------------- duplicates


def test_duplicate_keys_are_refused(tmp_path):
    message = error_of(tmp_path, "domains: [a.example]\nmax_clients: 5\ndomains: [b.example]\n")
    assert message == (
        f"{tmp_path / 'c.yaml'}: invalid YAML at line 3, column 1: "
        "duplicate key 'domains' (first at line 1)"
    )
    nested = error_of(tmp_path, "limits:\n  max_errors: 5\n  max_errors: 6\n")
    assert nested.endswith("line 3, column 3: duplicate key 'max_errors' (first at line 2)")
    flow = error_of(tmp_path, "tls: {self_signed: true, self_signed: false}\n")
    assert "duplicate key 'self_signed'" in flow and "line 1" in flow


def test_merge_keys_are_not_duplicates(tmp_path):
    text = "limits:\n  <<: {max_errors: 5, max_recipients: 7}\n  max_errors: 6\n"
    config = load_text(tmp_path, text)
    assert (config.limits.max_errors, config.limits.max_recipients) == (6, 7)


def test_duplicate_keys_in_the_users_file(tmp_path):
    (tmp_path / "users.yaml").write_text("users:\n  carol: {}\n  dave: {}\n  carol: {}\n")
    message = error_of(tmp_path, "auth: {users_file: users.yaml}\n")
    assert message == (
        f"auth.users_file: invalid YAML in '{tmp_path / 'users.yaml'}' at line 4, column 3: "
        "duplicate key 'carol' (first at line 2)"
    )


# --------------------------------------------------------------- listeners


def _listeners(*pairs: tuple[str, int]) -> str:
    return yaml.safe_dump({"listeners": [{"address": a, "port": p} for a, p in pairs]})


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (
            [("127.0.0.1", 2525), ("127.0.0.1", 2525)],
            "listeners[1]: same address and port as listeners[0] ([127.0.0.1]:2525)",
        ),
        (
            [("::1", 2525), ("127.0.0.1", 2526), ("0:0::1", 2525)],
            "listeners[2]: same address and port as listeners[0] ([::1]:2525)",
        ),
        (
            [("0.0.0.0", 25), ("127.0.0.1", 25)],
            "listeners[1]: [127.0.0.1]:25 cannot be bound beside listeners[0] "
            "([0.0.0.0]:25, every IPv4 address)",
        ),
        (
            [("::1", 25), ("::", 25)],
            "listeners[1]: [::]:25 cannot be bound beside listeners[0] "
            "([::1]:25; [::] is every IPv6 address)",
        ),
    ],
)
def test_listeners_that_cannot_both_bind(tmp_path, pairs, message):
    assert error_of(tmp_path, _listeners(*pairs)) == message


@pytest.mark.parametrize(
    "pairs",
    [
        [("127.0.0.1", 2525), ("::1", 2525)],  # IPv6 sockets are IPv6-only
        [("0.0.0.0", 25), ("::", 25)],
        [("0.0.0.0", 25), ("::1", 25)],
        [("127.0.0.1", 0), ("127.0.0.1", 0), ("0.0.0.0", 0)],  # ephemeral ports never collide
        [("127.0.0.1", 25), ("127.0.0.2", 25)],
    ],
)
def test_listeners_that_can_all_bind(tmp_path, pairs):
    assert len(load_text(tmp_path, _listeners(*pairs)).listeners) == len(pairs)


def test_admin_listener_collision(tmp_path):
    base = "listeners: [{address: 127.0.0.1, port: 8025}]\n"
    admin = "admin: {enabled: %s, address: '%s', port: 8025, token: 0123456789abcdef}\n"
    assert error_of(tmp_path, base + admin % ("true", "127.0.0.1")) == (
        "admin: same address and port as listeners[0] ([127.0.0.1]:8025)"
    )
    assert error_of(tmp_path, base + admin % ("true", "0.0.0.0")) == (
        "admin: [0.0.0.0]:8025 cannot be bound beside listeners[0] "
        "([127.0.0.1]:8025; [0.0.0.0] is every IPv4 address)"
    )
    load_text(tmp_path, base + admin % ("false", "127.0.0.1"))  # not started: no collision
    load_text(tmp_path, base + admin % ("true", "::1"))


# ------------------------------------------------------------------ domains


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("bad domain", "'bad domain' (no spaces or control characters)"),
        ("x..y", "'x..y' (an empty label)"),
        (".example.org", "'.example.org' (an empty label)"),
        ("example.org.", "'example.org.' (an empty label)"),
        ("a\r\nb.example", "'a\\r\\nb.example' (no spaces or control characters)"),
        ("tab\t.example", "'tab\\t.example' (no spaces or control characters)"),
        ("-a.example", "'-a.example' (a label may not start or end with '-')"),
        ("a_b.example", "'a_b.example' (a label may hold only letters, digits and '-')"),
        ("a" * 64 + ".example", f"'{'a' * 64}.example' (a label longer than 63 characters)"),
        (
            ".".join(["a" * 60] * 5),
            f"'{'.'.join(['a' * 60] * 5)}' (longer than 253 characters)",
        ),
        ("bü\u200bcher.example", "'bü\\u200bcher.example' (no spaces or control characters)"),
        ("a\u05d0.example", "'a\u05d0.example' (not a valid internationalised name)"),
        ("ü" * 60 + ".example", f"'{'ü' * 60}.example' (not a valid internationalised name)"),
    ],
)
def test_invalid_domains(tmp_path, domain, reason):
    message = error_of(tmp_path, yaml.safe_dump({"domains": ["ok.example", domain]}))
    assert message == f"domains[1]: not a valid domain name: {reason}"


def test_valid_domains_are_kept_lower_cased_as_given(tmp_path):
    names = ["Example.ORG", "localhost", "BÜCHER.example", "xn--bcher-kva.example", "a-b.c0"]
    config = load_data(tmp_path, {"domains": names})
    assert config.domains == [
        "example.org",
        "localhost",
        "bücher.example",
        "xn--bcher-kva.example",
        "a-b.c0",
    ]


# ------------------------------------------------------- folders and files


def test_mail_dir_and_log_dir_must_not_be_files(tmp_path):
    (tmp_path / "afile").write_text("")
    assert error_of(tmp_path, "mail_dir: afile\n") == (
        f"mail_dir: '{tmp_path / 'afile'}' is not a directory"
    )
    assert error_of(tmp_path, "log: {dir: afile}\n") == (
        f"log.dir: '{tmp_path / 'afile'}' is not a directory"
    )
    assert load_text(tmp_path, "mail_dir: new-folder\n").mail_dir == tmp_path / "new-folder"


# ----------------------------------------------------- control characters


def test_control_characters_are_escaped_in_messages(tmp_path):
    assert error_of(tmp_path, 'hostname: "mx\\0.example"\n') == (
        "hostname: not a valid host name: 'mx\\x00.example'"
    )
    assert error_of(tmp_path, 'hostname: "mx\\e[31m.example"\n') == (
        "hostname: not a valid host name: 'mx\\x1b[31m.example'"
    )
    assert error_of(tmp_path, '"bo\\ngus": 1\n') == "bo\\ngus: unknown key"
    assert error_of(tmp_path, 'users: {"a\\tb": {}}\n').startswith("users.a\\tb: not a valid")
    assert error_of(tmp_path, 'log: {rotation: "1\\x07 day"}\n') == (
        "log.rotation: not a valid rotation: '1\\x07 day'"
    )
    with pytest.raises(cfg.ConfigError) as err:
        cfg.from_mapping({"listeners": [{"address": "1.2.3.4\n5", "port": 1}]}, tmp_path)
    assert str(err.value) == "listeners[0].address: not an IP address: '1.2.3.4\\n5'"


def test_an_unreadable_smarthost_password_file_names_its_key(tmp_path):
    from geosmtp.app import runner_settings

    smarthost = {"smarthost": "127.0.0.1:2525", "smarthost_auth": {"user": "u"}}
    missing = {**smarthost, "smarthost_auth": {"user": "u", "password_file": "missing.pw"}}
    with pytest.raises(cfg.ConfigError) as err:
        runner_settings(load_data(tmp_path, {"relay": missing}))
    assert str(err.value) == (
        f"relay.smarthost_auth.password_file: cannot read '{tmp_path / 'missing.pw'}': "
        "No such file or directory"
    )
    (tmp_path / "latin1.pw").write_bytes(b"caf\xe9")
    latin1 = {**smarthost, "smarthost_auth": {"user": "u", "password_file": "latin1.pw"}}
    with pytest.raises(cfg.ConfigError, match=r"latin1\.pw': not UTF-8 text$"):
        runner_settings(load_data(tmp_path, {"relay": latin1}))
    (tmp_path / "ok.pw").write_text("secret\n")
    readable = {**smarthost, "smarthost_auth": {"user": "u", "password_file": "ok.pw"}}
    assert runner_settings(load_data(tmp_path, {"relay": readable})).smarthost_auth == (
        "u",
        "secret",
    )


# ------------------------------------------------------------------ delivery.lmtp


@pytest.mark.parametrize(
    ("value", "target"),
    [
        ("127.0.0.1:24", ("127.0.0.1", 24)),
        ("[::1]:24", ("::1", 24)),
        ("lmtp.example.org:24", ("lmtp.example.org", 24)),
        ("/run/dovecot/lmtp", ("/run/dovecot/lmtp", 0)),
    ],
)
def test_delivery_lmtp_is_host_port_or_a_socket_path(tmp_path, value, target):
    from geosmtp.app import runner_settings

    assert runner_settings(load_data(tmp_path, {"delivery": {"lmtp": value}})).lmtp == target
    assert runner_settings(load_data(tmp_path, {})).lmtp is None  # unset: the Maildirs


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("dovecot", "expected host:port or a UNIX socket's absolute path, got 'dovecot'"),
        ("127.0.0.1:0", "expected host:port or a UNIX socket's absolute path"),
        ("127.0.0.1", "expected host:port or a UNIX socket's absolute path"),
        ("run/dovecot/lmtp", "expected host:port or a UNIX socket's absolute path"),
        ("/run/dovecot/", "expected a UNIX socket's path"),
        ("/" + "x" * 107, "a UNIX socket path is at most 107 octets"),
        (24, "expected a non-empty string"),
    ],
)
def test_a_bad_delivery_lmtp_is_a_config_error_naming_the_key(tmp_path, value, message):
    with pytest.raises(cfg.ConfigError) as err:
        load_data(tmp_path, {"delivery": {"lmtp": value}})
    assert str(err.value).startswith("delivery.lmtp: ") and message in str(err.value)


def test_delivery_lmtp_needs_a_restart():
    """Where local mail goes is not changed under running sessions."""
    old = cfg.to_mapping(cfg.Config())
    new = cfg.merged(old, {"delivery": {"lmtp": "127.0.0.1:24"}})
    with pytest.raises(cfg.ConfigError, match=r"delivery\.lmtp: cannot change while running"):
        cfg.check_runtime_change(old, new)
