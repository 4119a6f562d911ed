"""The `auth_checks:` and `dkim:` sections: defaults, and every mistake named by its key."""

from __future__ import annotations

import pytest

from geosmtp import config as cfg
from tests.unit.test_mailauth import KEY_PEM


def test_off_by_default():
    config = cfg.from_mapping({})
    assert config.auth_checks.enabled is False
    assert config.auth_checks.roles == ["mx"]
    assert (config.auth_checks.spf.on_fail, config.auth_checks.spf.on_temperror) == (
        "record",
        "record",
    )
    assert config.dkim.domains == {}
    assert config.dkim.canonicalization == "relaxed/relaxed"
    assert "from" in config.dkim.headers


def test_a_signing_domain(tmp_path):
    (tmp_path / "k.pem").write_bytes(KEY_PEM)
    config = cfg.from_mapping(
        {"dkim": {"domains": {"example.org": {"selector": "s2025.a", "key_file": "k.pem"}}}},
        tmp_path,
    )
    assert config.dkim.domains["example.org"].key_file == tmp_path / "k.pem"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"auth_checks": {"spf": {"on_fail": "bounce"}}},
         "auth_checks.spf.on_fail: expected one of record, tempfail, reject, got 'bounce'"),
        ({"auth_checks": {"dmarc": {"on_temperror": "reject"}}},
         "auth_checks.dmarc.on_temperror: expected one of record, tempfail, got 'reject'"),
        ({"auth_checks": {"roles": ["imap"]}}, "auth_checks.roles[0]: expected one of mx,"),
        ({"auth_checks": {"max_signatures": 0}}, "auth_checks.max_signatures: expected at least 1"),
        ({"auth_checks": {"enabled": True, "public_suffix_list": "nowhere.dat"}},
         "auth_checks.public_suffix_list: no such file:"),
        ({"dkim": {"domains": {"example.org": {"key_file": "k.pem"}}}},
         "dkim.domains.example.org.selector: expected a selector"),
        ({"dkim": {"domains": {"example.org": {"selector": "bad_sel", "key_file": "k.pem"}}}},
         "dkim.domains.example.org.selector: expected a selector"),
        ({"dkim": {"domains": {"example.org": {"selector": "s1"}}}},
         "dkim.domains.example.org.key_file: the domain's private key is needed"),
        ({"dkim": {"domains": {"example.org": {"selector": "s1", "key_file": "gone.pem"}}}},
         "dkim.domains.example.org.key_file: cannot read"),
        ({"dkim": {"domains": {"example.org": {"selector": "s1", "key_file": "bad.pem"}}}},
         "dkim.domains.example.org.key_file: "),
        ({"dkim": {"domains": {"exa mple.org": {"selector": "s1", "key_file": "k.pem"}}}},
         "dkim.domains.exa mple.org: not a valid domain name"),
        ({"dkim": {"headers": ["subject"],
                   "domains": {"example.org": {"selector": "s1", "key_file": "k.pem"}}}},
         "dkim.headers: From must be signed"),
        ({"dkim": {"headers": ["from", "Received"]}},
         "dkim.headers[1]: received is changed in transit"),
        ({"dkim": {"headers": ["from", "sub ject"]}}, "dkim.headers[1]: not a header field name"),
        ({"dkim": {"canonicalization": "relaxed"}}, "dkim.canonicalization: expected one of"),
    ],
)  # fmt: skip
def test_mistakes_name_their_key(tmp_path, data, message):
    (tmp_path / "k.pem").write_bytes(KEY_PEM)
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(cfg.ConfigError) as err:
        cfg.from_mapping(data, tmp_path)
    assert str(err.value).startswith(message), str(err.value)
