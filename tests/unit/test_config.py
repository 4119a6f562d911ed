"""The YAML schema: defaults, validation messages that name the key, paths."""

from pathlib import Path

import pytest

from geosmtp import config as cfg


def load_text(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return cfg.load(path)


def test_empty_file_runs_on_defaults(tmp_path):
    config = load_text(tmp_path, "")
    assert config.limits.command_line == 512
    assert config.limits.text_line == 1000
    assert config.unknown_recipients == "accept"
    assert [(li.address, li.port) for li in config.listeners] == [
        ("127.0.0.1", 2525),
        ("::1", 2525),
    ]
    assert config.mail_dir == tmp_path.resolve() / "mail_dir"
    assert config.log.dir == tmp_path.resolve() / "logs"


def test_bundled_config_is_valid():
    config = cfg.load(Path(__file__).parents[2] / "config.yaml")
    assert "geosmtp.test" in config.domains
    mx = [li for li in config.listeners if li.role == "mx"]
    assert {(li.address, li.port) for li in mx} == {("127.0.0.1", 2525), ("::1", 2525)}
    roles = {li.role: li.port for li in config.listeners if li.role != "mx"}
    # Ports any user may bind: the README's first command works without root.
    assert roles == {"submission": 2587, "submissions": 2465, "pop3": 2110, "pop3s": 2995}
    assert all(li.port >= 1024 for li in config.listeners) and config.admin.port >= 1024
    assert config.tls.self_signed and all(u.password for u in config.users.values())


def test_production_example_is_valid():
    config = cfg.load(Path(__file__).parents[2] / "examples" / "config.production.yaml")
    by_role: dict[str, set] = {}
    for li in config.listeners:
        by_role.setdefault(li.role, set()).add((li.address, li.port))
    assert by_role == {
        "mx": {("0.0.0.0", 25), ("::", 25)},
        "submission": {("0.0.0.0", 587), ("::", 587)},
        "submissions": {("0.0.0.0", 465), ("::", 465)},
        "pop3": {("0.0.0.0", 110), ("::", 110)},
        "pop3s": {("0.0.0.0", 995), ("::", 995)},
    }
    assert config.users == {} and config.auth.users_file is None  # no demo accounts
    assert not config.tls.self_signed
    assert config.tls.cert is not None and config.tls.cert.is_absolute()
    assert config.admin.address == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "limits: {max_message_size: ten}",
            "limits.max_message_size: expected a positive integer, got 'ten'",
        ),
        ("limits: {max_message_size: 0}", "limits.max_message_size: expected a positive integer"),
        ("timeouts: {command: 0}", "timeouts.command: expected a positive number, got 0"),
        ("max_clients: 0", "max_clients: expected a positive integer, got 0"),
        ("users: {alice: {password: secret}}", "users.alice.password: expected a password hash"),
        ("trusted_networks: [0.0.0.0/0]", "trusted_networks[0]: '0.0.0.0/0' is not a loopback"),
        ("trusted_networks: [8.8.8.0/24]", "would make an open relay"),
        ("trusted_networks: [nope]", "trusted_networks[0]: not a network"),
        (
            "listeners: [{address: 127.0.0.1, port: 1, role: submissions}]",
            "listeners[0].role: submissions needs tls.cert",
        ),
        (
            "listeners: [{address: 127.0.0.1, port: 1, role: relay}]",
            "listeners[0].role: expected one of mx, submission, submissions",
        ),
        ("limits: {command_line: 100}", "limits.command_line: expected at least 512, got 100"),
        ("limits: {bogus: 1}", "limits.bogus: unknown key"),
        ("nonsense: 1", "nonsense: unknown key"),
        ("fsync: maybe", "fsync: expected true or false, got 'maybe'"),
        ("unknown_recipients: drop", "unknown_recipients: expected one of accept, reject"),
        ("listeners: [{address: nowhere, port: 25}]", "listeners[0].address: not an IP address"),
        ("listeners: [{address: 127.0.0.1, port: 70000}]", "listeners[0].port: expected at most"),
        ("listeners: []", "listeners: at least one listener"),
        ("domains: []", "domains: at least one local domain"),
        ("users: {'../x': {}}", "users.../x: not a valid mailbox name"),
        ("timeouts: {command: true}", "timeouts.command: expected a positive number, got True"),
        ("log: {rotation: sometimes}", "log.rotation: not a valid rotation"),
        ("log: {level: LOUD}", "log.level: expected one of"),
        ("- a list", "config: expected a mapping"),
        ("limits: [1, 2]", "limits: expected a mapping"),
        ("admin: {read_token: too-short}", "admin.read_token: use at least 16 characters"),
        (
            "admin: {token: same-0123456789abc, read_token: same-0123456789abc}",
            "admin.read_token: must differ from admin.token (the write token)",
        ),
        (
            "admin: {token_file: t, read_token_file: t}",
            "admin.read_token_file: must be another file than admin.token_file",
        ),
        ("admin: {idle_timeout: 0}", "admin.idle_timeout: expected a positive number, got 0"),
        ("admin: {request_timeout: 3601}", "admin.request_timeout: expected at most 3600"),
        ("admin: {max_connections: 0}", "admin.max_connections: expected a positive integer"),
    ],
)
def test_errors_name_the_key_path(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError) as err:
        load_text(tmp_path, text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="invalid YAML"):
        load_text(tmp_path, "limits: {")
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "missing.yaml")


def test_paths_resolve_against_the_config_folder(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    config = load_text(sub, "mail_dir: ../spool\nlog: {dir: /var/tmp/x}")
    assert config.mail_dir == (sub / "../spool").resolve() or config.mail_dir.resolve() == (
        tmp_path / "spool"
    )
    assert config.log.dir == Path("/var/tmp/x")


def test_domains_are_lower_cased_and_users_parsed(tmp_path):
    config = load_text(tmp_path, "domains: [Example.ORG]\nusers: {alice: {}, bob: null}")
    assert config.domains == ["example.org"]
    assert set(config.users) == {"alice", "bob"}
    assert config.users["bob"].password is None


def test_fractional_timeouts_are_allowed(tmp_path):
    config = load_text(tmp_path, "timeouts: {command: 0.5, shutdown_grace: 0}")
    assert config.timeouts.command == 0.5
    assert config.timeouts.shutdown_grace == 0


def test_users_file_is_merged(tmp_path):
    from geosmtp.auth import hash_password

    digest = hash_password("pw")
    (tmp_path / "users.yaml").write_text(f"users:\n  carol: {{password: '{digest}'}}\n")
    config = load_text(tmp_path, "users: {alice: {}}\nauth: {users_file: users.yaml}")
    assert set(config.users) == {"alice", "carol"}
    assert config.users["carol"].password == digest
    (tmp_path / "users.yaml").write_text("users:\n  carol: {password: plain}\n")
    with pytest.raises(cfg.ConfigError, match=r"users\.carol\.password: expected a password hash"):
        load_text(tmp_path, "auth: {users_file: users.yaml}")
    with pytest.raises(cfg.ConfigError, match=r"auth\.users_file: cannot read"):
        load_text(tmp_path, "auth: {users_file: missing.yaml}")


def test_private_trusted_networks_are_accepted(tmp_path):
    config = load_text(tmp_path, "trusted_networks: [127.0.0.0/8, '::1/128', 10.1.0.0/16]")
    assert len(config.trusted_networks) == 3


@pytest.mark.parametrize(
    "network",
    [
        "2001::/23",  # IETF protocol assignments: public, though Python's is_private says yes
        "100.64.0.0/10",  # CGNAT: the provider's customers
        "192.0.2.0/24",  # documentation: is_private, and no one's network here
        "198.18.0.0/15",  # benchmarking
        "fc00::/6",  # wider than RFC 4193
        "10.0.0.0/7",  # wider than RFC 1918's 10/8
        "8.8.8.0/24",
    ],
)
def test_trusted_networks_refuse_ranges_beyond_loopback_and_private(tmp_path, network):
    with pytest.raises(cfg.ConfigError) as info:
        load_text(tmp_path, f"trusted_networks: ['{network}']")
    message = str(info.value)
    assert message.startswith(f"trusted_networks[0]: '{network}' is not a loopback or private")
    assert "trusted_networks_allow_public: true" in message  # says how, if it is meant


@pytest.mark.parametrize(
    "network",
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "172.31.7.0/24",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "::1",
        "fc00::/7",
        "fd12:3456::/32",
        "192.0.2.7/32",  # an explicit host, of any address: the operator's choice
        "2001:db8::25/128",
        "203.0.113.9",  # a bare address is a host
    ],
)
def test_trusted_networks_take_private_ranges_and_single_hosts(tmp_path, network):
    config = load_text(tmp_path, f"trusted_networks: ['{network}']")
    assert config.trusted_networks == [network]
    assert config.trusted_networks_allow_public is False


@pytest.mark.parametrize("flag", ["", "\ntrusted_networks_allow_public: true"])
@pytest.mark.parametrize(
    ("network", "why"),
    [
        # Link-local: any host on the link takes such an address itself.
        ("169.254.0.0/16", "is link-local"),
        ("169.254.7.7", "is link-local"),
        ("fe80::/10", "is link-local"),
        ("fe80::1%lo/128", "is link-local"),
        # IPv4-mapped: a client on IPv4 is matched by its IPv4 address, so
        # these matched no one (and ::ffff:0:0/96 is all of IPv4).
        ("::ffff:127.0.0.23/128", "is an IPv4-mapped IPv6 network; write its IPv4 form"),
        ("::ffff:8.8.8.8", "is an IPv4-mapped IPv6 network; write its IPv4 form"),
        ("::ffff:0:0/96", "is an IPv4-mapped IPv6 network; write its IPv4 form"),
    ],
)
def test_trusted_networks_refuse_link_local_and_mapped_entries(tmp_path, network, why, flag):
    with pytest.raises(cfg.ConfigError) as info:
        load_text(tmp_path, f"trusted_networks: ['{network}']{flag}")
    assert str(info.value).startswith(f"trusted_networks[0]: '{network}' {why}")


def test_a_public_range_is_trusted_only_with_the_flag(tmp_path):
    text = "trusted_networks: [198.51.100.0/24, '2001:db8::/32']"
    with pytest.raises(cfg.ConfigError, match="is not a loopback or private network"):
        load_text(tmp_path, text)
    config = load_text(tmp_path, text + "\ntrusted_networks_allow_public: true")
    assert config.trusted_networks == ["198.51.100.0/24", "2001:db8::/32"]
    # Even then, not most of the internet.
    with pytest.raises(cfg.ConfigError, match=r"'0\.0\.0\.0/0' is wider than a /8"):
        load_text(tmp_path, "trusted_networks: [0.0.0.0/0]\ntrusted_networks_allow_public: true")
    with pytest.raises(cfg.ConfigError, match=r"trusted_networks_allow_public: expected"):
        load_text(tmp_path, "trusted_networks_allow_public: maybe")


def test_relay_timeouts_reach_the_queue_client(tmp_path):
    from geosmtp.app import runner_settings

    path = tmp_path / "config.yaml"
    path.write_text("relay:\n  timeouts: {connect: 2, command: 3, data_block: 0.5, data_end: 4}\n")
    t = runner_settings(cfg.load(path)).timeouts
    assert (t.connect, t.greeting, t.rcpt, t.data_init, t.data_block, t.data_end, t.quit) == (
        2, 3, 3, 120, 0.5, 4, 3,
    )  # fmt: skip


# issue 22: the PROXY protocol per listener
@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ("{proxy_protocol: true}", "listeners[0].proxy_trusted: needed with proxy_protocol: true"),
        (
            "{proxy_trusted: [10.0.0.1]}",
            "listeners[0].proxy_trusted: set without proxy_protocol: true",
        ),
        (
            "{proxy_protocol: true, proxy_trusted: [10.0.0.1, balancer.example]}",
            "listeners[0].proxy_trusted[1]: not a network or address: 'balancer.example'",
        ),
        (
            "{proxy_protocol: true, proxy_trusted: [10.0.0.0/33]}",
            "listeners[0].proxy_trusted[0]: not a network or address: '10.0.0.0/33'",
        ),
        (
            "{proxy_protocol: true, proxy_trusted: ['::ffff:10.0.0.1']}",
            "listeners[0].proxy_trusted[0]: '::ffff:10.0.0.1' is an IPv4-mapped IPv6 network",
        ),
        (
            "{proxy_protocol: true, proxy_trusted: 10.0.0.1}",
            "listeners[0].proxy_trusted: expected a list",
        ),
        (
            "{proxy_protocol: yes please, proxy_trusted: [10.0.0.1]}",
            "listeners[0].proxy_protocol: expected",
        ),
        (
            "{role: lmtp, path: /run/x.sock, proxy_protocol: true, proxy_trusted: [10.0.0.1]}",
            "listeners[0].proxy_protocol: not on a UNIX socket (path) listener",
        ),
    ],
)
def test_proxy_protocol_keys_are_checked(tmp_path, listener, message):
    with pytest.raises(cfg.ConfigError) as err:
        load_text(tmp_path, f"listeners: [{listener}]\n")
    assert message in str(err.value)


def test_proxy_protocol_takes_networks_and_addresses_of_both_families(tmp_path):
    config = load_text(
        tmp_path,
        "listeners: [{proxy_protocol: true, proxy_trusted: [10.0.0.0/24, 192.0.2.7, "
        "'2001:db8::/64', '::1']}]\ntimeouts: {proxy_header: 2.5}\n",
    )
    (listener,) = config.listeners
    assert listener.proxy_protocol is True
    assert listener.proxy_trusted == ["10.0.0.0/24", "192.0.2.7", "2001:db8::/64", "::1"]
    assert config.timeouts.proxy_header == 2.5
    assert load_text(tmp_path, "{}").listeners[0].proxy_protocol is False
