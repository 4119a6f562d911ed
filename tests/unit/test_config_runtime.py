"""Helpers behind live config changes: to_mapping, merged, changed_keys, needs_restart, lookup."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from geosmtp import config as cfg
from tests.conftest import password_hash

TOKEN = "a-token-of-32-characters-0123456"


@pytest.fixture
def config(tmp_path: Path) -> cfg.Config:
    return cfg.from_mapping(
        {
            "hostname": "mx.test.example",
            "listeners": [{"address": "127.0.0.1", "port": 2525}],
            "users": {"alice": {"password": password_hash("pw")}, "bob": {}},
            "admin": {"enabled": True, "token": TOKEN},
            "limits": {"max_recipients": 50},
        },
        tmp_path,
    )


# ---------------------------------------------------------------- to_mapping


def test_to_mapping_is_plain_data(config, tmp_path):
    data = cfg.to_mapping(config)
    assert json.loads(json.dumps(data)) == data  # only JSON types
    assert data["mail_dir"] == str(tmp_path.resolve() / "mail_dir")
    assert data["listeners"] == [
        {
            "address": "127.0.0.1",
            "port": 2525,
            "role": "mx",
            "path": None,
            "mode": 0o660,
            "proxy_protocol": False,  # issue 22
            "proxy_trusted": [],
        }
    ]
    assert data["limits"]["max_recipients"] == 50
    assert data["limits"]["command_line"] == 512  # defaults included
    assert data["users"]["bob"] == {"password": None}
    assert data["admin"]["token"] == TOKEN
    assert data["tls"]["cert"] is None


def test_to_mapping_round_trips(config):
    assert cfg.from_mapping(cfg.to_mapping(config)) == config


def test_to_mapping_redacts_secrets(config):
    data = cfg.to_mapping(config, redact=True)
    text = json.dumps(data)
    assert TOKEN not in text and "$argon2" not in text
    assert data["admin"]["token"] == "<redacted>"
    assert data["users"]["alice"]["password"] == "<redacted>"
    assert data["users"]["bob"]["password"] is None  # unset is not a secret
    assert data["admin"]["token_file"] is None
    # Only the secrets differ.
    plain = cfg.to_mapping(config)
    assert cfg.changed_keys(plain, data) == ["admin.token", "users.alice.password"]
    assert config.admin.token == TOKEN  # the config itself is untouched


# -------------------------------------------------------------------- merged


def test_merged_lays_a_patch_over_a_mapping(config):
    base = cfg.to_mapping(config)
    pristine = copy.deepcopy(base)
    out = cfg.merged(base, {"limits": {"max_errors": 3}, "max_clients": 7, "new": {"a": 1}})
    assert out["limits"] == {**base["limits"], "max_errors": 3}  # siblings kept
    assert out["max_clients"] == 7
    assert out["new"] == {"a": 1}
    assert base == pristine  # not modified


def test_merged_replaces_lists_and_non_mappings():
    base = {"domains": ["a", "b"], "limits": {"x": 1}, "n": {"deep": {"k": 1, "j": 2}}}
    assert cfg.merged(base, {"domains": ["c"]})["domains"] == ["c"]
    assert cfg.merged(base, {"limits": 5})["limits"] == 5
    assert cfg.merged(base, {"n": {"deep": {"k": 9}}})["n"] == {"deep": {"k": 9, "j": 2}}
    assert cfg.merged(base, {}) == base
    assert cfg.merged({"x": 1}, {"x": {"y": 2}}) == {"x": {"y": 2}}


def test_merged_then_from_mapping_validates_like_load(config):
    base = cfg.to_mapping(config)
    with pytest.raises(cfg.ConfigError, match=r"^limits\.bogus: unknown key$"):
        cfg.from_mapping(cfg.merged(base, {"limits": {"bogus": 1}}))
    with pytest.raises(cfg.ConfigError, match=r"^max_clients: expected a positive integer"):
        cfg.from_mapping(cfg.merged(base, {"max_clients": "many"}))
    new = cfg.from_mapping(cfg.merged(base, {"timeouts": {"command": 30}}))
    assert new.timeouts.command == 30 and new.limits.max_recipients == 50


# -------------------------------------------------------------- changed_keys


def test_changed_keys_names_dotted_leaves_sorted(config):
    old = cfg.to_mapping(config)
    new = cfg.merged(
        old, {"max_clients": 9, "limits": {"max_errors": 2}, "log": {"level": "DEBUG"}}
    )
    assert cfg.changed_keys(old, new) == ["limits.max_errors", "log.level", "max_clients"]
    assert cfg.changed_keys(old, old) == []
    assert cfg.changed_keys(old, copy.deepcopy(old)) == []


def test_changed_keys_lists_and_missing_keys():
    assert cfg.changed_keys({"l": [1, 2]}, {"l": [1, 3]}) == ["l"]
    assert cfg.changed_keys({"l": [{"port": 1}]}, {"l": [{"port": 2}]}) == ["l"]
    assert cfg.changed_keys({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c"]
    assert cfg.changed_keys({"a": {"b": 1}}, {}) == ["a"]
    assert cfg.changed_keys({"a": 1}, {"a": {"b": 1}}) == ["a"]
    assert cfg.changed_keys(1, 2) == [""]


# ------------------------------------------------------------- needs_restart


@pytest.mark.parametrize(
    "key",
    ["hostname", "listeners", "mail_dir", "log.dir", "admin.port", "admin.token", "fsync"],
)
def test_restart_only_keys(key):
    assert cfg.needs_restart([key]) == [key]


@pytest.mark.parametrize(
    "key",
    [
        "max_clients",
        "limits.max_recipients",
        "timeouts.command",
        "log.level",
        "log.rotation",
        "extensions.chunking",
        "users.alice.password",
        "tls.cert",
        "domains",
        "hostnames",  # a prefix of a restart-only key's name is not that key
        "administrator",
        "log.directory",
    ],
)
def test_live_keys(key):
    assert cfg.needs_restart([key]) == []


def test_needs_restart_keeps_order_and_filters():
    keys = ["fsync", "limits.max_errors", "listeners", "max_clients"]
    assert cfg.needs_restart(keys) == ["fsync", "listeners"]
    assert cfg.needs_restart([]) == []


# -------------------------------------------------------------------- lookup


def test_lookup(config):
    data = cfg.to_mapping(config, redact=True)
    assert cfg.lookup(data, "limits.max_recipients") == 50
    assert cfg.lookup(data, "limits") == data["limits"]
    assert cfg.lookup(data, "admin.token") == "<redacted>"
    assert cfg.lookup(data, "users.bob.password") is None  # present, unset
    for key in ("nope", "limits.nope", "limits.max_recipients.deeper", "listeners.0"):
        with pytest.raises(KeyError) as exc:
            cfg.lookup(data, key)
        assert exc.value.args == (key,)
