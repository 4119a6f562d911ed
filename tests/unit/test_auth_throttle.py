"""AuthThrottle: counted before the check, bounded, by IPv4 address or IPv6 /64 (no sockets).

Every test runs twice: with the records in this process, and in the shared
memory the worker processes share (tests/unit/test_shared.py has the tests
across processes).
"""

from __future__ import annotations

import pytest

from geosmtp.auth import BUSY, AuthThrottle, LocalThrottleRecords, throttle_key
from geosmtp.server.shared import SharedState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def shared_records(max_tracked: int):
    return SharedState(slots=1, max_tracked=max_tracked).throttle_records


@pytest.fixture(autouse=True, params=[LocalThrottleRecords, shared_records])
def records_kind(request, monkeypatch):
    """Where `throttle()` keeps its records, for this run of the test."""
    monkeypatch.setitem(globals(), "make_records", request.param)


def throttle(clock: Clock, max_tracked: int = 100_000, **kwargs) -> AuthThrottle:
    settings = {"max_failures": 3, "base_delay": 1.0, "max_delay": 8.0, "window": 600.0}
    records = make_records(max_tracked)  # noqa: F821 (set by records_kind)
    return AuthThrottle(**{**settings, **kwargs}, clock=clock, records=records)


def fail(t: AuthThrottle, address: str) -> tuple[float, bool] | None:
    """One whole failed attempt: None when it got no check at all."""
    attempt = t.reserve(address)
    return None if attempt is None else t.failed(address, attempt)


# --------------------------------------------------------------- counting


def test_reservations_before_any_result_are_limited_to_max_failures(clock):
    t = throttle(clock)
    # Eight parallel logins all reserve before any check has finished.
    attempts = [t.reserve("192.0.2.1") for _ in range(8)]
    assert attempts == [1, 2, 3, BUSY, BUSY, BUSY, BUSY, BUSY]  # the rest wait
    assert [t.failed("192.0.2.1", n) for n in (1, 2, 3)] == [
        (1.0, False),
        (2.0, False),
        (4.0, True),
    ]
    assert t.reserve("192.0.2.1") is None  # now blocked: no check at all
    assert t.reserve("192.0.2.2") == 1  # another client is not affected


def test_parallel_logins_with_the_right_password_all_get_their_turn(clock):
    t = throttle(clock)
    running = [t.reserve("192.0.2.1") for _ in range(3)]
    assert running == [1, 2, 3] and t.reserve("192.0.2.1") == BUSY
    for _ in range(8):  # each success frees a place for a waiting login
        t.succeeded("192.0.2.1")
        assert t.reserve("192.0.2.1") == 3
    for _ in range(3):
        t.succeeded("192.0.2.1")
    assert len(t) == 0


def test_the_delay_doubles_up_to_max_delay(clock):
    t = throttle(clock, max_failures=10, base_delay=0.5, max_delay=3.0)
    delays = [fail(t, "192.0.2.1")[0] for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_success_clears_the_record_and_releases_the_reservation(clock):
    t = throttle(clock)
    fail(t, "192.0.2.1")
    fail(t, "192.0.2.1")
    assert t.reserve("192.0.2.1") == 3  # the last check allowed ...
    t.succeeded("192.0.2.1")  # ... was the right password
    assert len(t) == 0
    assert [t.reserve("192.0.2.1") for _ in range(4)] == [1, 2, 3, BUSY]


def test_a_failure_after_a_parallel_success_is_not_counted_again(clock):
    t = throttle(clock)
    first, second = t.reserve("192.0.2.1"), t.reserve("192.0.2.1")
    t.succeeded("192.0.2.1")  # the first: failures forgotten, the second still runs
    assert t.failed("192.0.2.1", second) == (1.0, False)  # counted from the success on
    assert first == 1 and t.reserve("192.0.2.1") == 2


def test_the_record_expires_a_window_after_the_last_failure(clock):
    t = throttle(clock)
    for _ in range(3):
        fail(t, "192.0.2.1")
    clock.now += 600
    assert t.reserve("192.0.2.1") is None  # still inside the window
    clock.now += 0.5
    assert t.reserve("192.0.2.1") == 1  # expired: counting starts again
    assert len(t) == 1


def test_a_refused_attempt_does_not_extend_the_window(clock):
    t = throttle(clock)
    for _ in range(3):
        fail(t, "192.0.2.1")
    clock.now += 300
    assert t.reserve("192.0.2.1") is None
    clock.now += 300
    assert t.reserve("192.0.2.1") is None
    clock.now += 0.5  # a window after the last failure, not after the last refusal
    assert t.reserve("192.0.2.1") == 1


def test_settings_changed_on_the_object_apply_to_the_kept_record(clock):
    """listeners.py sets max_failures/base_delay on the running throttle."""
    t = throttle(clock)
    fail(t, "192.0.2.1")
    fail(t, "192.0.2.1")
    t.max_failures, t.base_delay = 2, 0.25
    assert t.reserve("192.0.2.1") is None
    t.max_failures = 5
    assert t.reserve("192.0.2.1") == 3
    assert t.failed("192.0.2.1", 3) == (1.0, False)


# ------------------------------------------------------------- the bound


def test_the_table_is_capped_and_forgets_the_least_recently_seen(clock):
    t = throttle(clock, max_tracked=3)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        fail(t, address)
        fail(t, address)
    clock.now += 1
    assert t.reserve("192.0.2.1") == 3  # touched: now the most recently seen (one running)
    fail(t, "192.0.2.4")  # over the cap: .2, the least recently seen, goes
    assert len(t) == 3
    # The others keep their counts (each reserve below touches one).
    assert t.reserve("192.0.2.1") == BUSY  # two failures and one check running
    assert t.reserve("192.0.2.3") == 3
    assert t.reserve("192.0.2.4") == 2
    assert t.reserve("192.0.2.2") == 1  # forgotten: counting starts again
    assert len(t) == 3  # and .1, now the least recently seen, made room for it
    assert t.reserve("192.0.2.1") == 1


def test_a_refused_attempt_counts_as_recent_use(clock):
    t = throttle(clock, max_tracked=2)
    for _ in range(3):
        fail(t, "192.0.2.1")
    fail(t, "192.0.2.2")
    assert t.reserve("192.0.2.1") is None  # blocked, and touched
    fail(t, "192.0.2.3")  # evicts .2, not the blocked .1
    assert t.reserve("192.0.2.1") is None
    assert t.reserve("192.0.2.2") == 1


def test_a_spray_of_addresses_never_exceeds_the_cap(clock):
    t = throttle(clock, max_tracked=100)
    for i in range(5000):
        fail(t, f"2001:db8:{i:x}::1")
        assert len(t) <= 100
    assert len(t) == 100


# ----------------------------------------------------------- the key


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff", "2001:db8::/64"),
        ("2001:db8:0:0:ffff:ffff:ffff:ffff", "2001:db8::/64"),
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not an address", "not an address"),
    ],
)
def test_throttle_key(address, key):
    assert throttle_key(address) == key


def test_an_ipv6_64_shares_one_count(clock):
    t = throttle(clock)
    fail(t, "2001:db8::1")
    fail(t, "2001:db8::ffff")
    assert fail(t, "2001:db8::abcd:1") == (4.0, True)
    assert t.reserve("2001:db8::2") is None
    assert t.reserve("2001:db8:0:1::1") == 1  # the next /64 is someone else
    t.succeeded("2001:db8::99")  # a success anywhere in the /64 clears it
    assert t.reserve("2001:db8::1") == 1


def test_a_mapped_ipv4_address_counts_as_the_ipv4_address(clock):
    t = throttle(clock)
    fail(t, "192.0.2.1")
    fail(t, "::ffff:192.0.2.1")
    assert fail(t, "192.0.2.1") == (4.0, True)
    assert t.reserve("::ffff:192.0.2.1") is None
    assert t.reserve("::ffff:192.0.2.2") == 1


def test_a_scoped_address_drops_its_zone(clock):
    t = throttle(clock)
    for _ in range(3):
        fail(t, "fe80::1%eth0")
    assert t.reserve("fe80::1") is None
    assert t.reserve("fe80::2%eth1") is None  # same /64
