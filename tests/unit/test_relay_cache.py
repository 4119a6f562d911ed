"""The relay's connection cache (`geosmtp.relay.cache`) with a clock of its own."""

from __future__ import annotations

from geosmtp.relay.cache import ConnectionCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Conn:
    def __init__(self, transactions: int = 1) -> None:
        self.transactions = transactions
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_connection_is_taken_back_by_its_key_only():
    cache = ConnectionCache(clock=Clock())
    a, b = Conn(), Conn()
    assert cache.put("a", a) and cache.put("b", b)
    assert cache.take("c") is None
    assert cache.take("a") is a and cache.take("a") is None
    assert cache.take("b") is b and len(cache) == 0
    assert not (a.closed or b.closed)
    cache.close()


def test_newest_first_so_the_older_go_idle():
    clock = Clock()
    cache = ConnectionCache(clock=clock)
    old, new = Conn(), Conn()
    cache.put("k", old)
    clock.now += 1
    cache.put("k", new)
    assert cache.take("k") is new
    cache.close()


def test_an_idle_connection_past_the_time_is_closed_when_it_would_be_taken():
    clock = Clock()
    cache = ConnectionCache(idle_time=2.0, clock=clock)
    conn = Conn()
    cache.put("k", conn)
    clock.now += 2.0
    assert cache.take("k") is conn  # 2 s idle: still kept (the limit is inclusive)
    cache.put("k", conn)
    clock.now += 2.01
    assert cache.take("k") is None and conn.closed and len(cache) == 0


def test_the_reaper_closes_the_stale_ones_only():
    clock = Clock()
    cache = ConnectionCache(idle_time=2.0, clock=clock)
    stale, fresh = Conn(), Conn()
    cache.put("a", stale)
    clock.now += 1.5
    cache.put("b", fresh)
    clock.now += 1.0
    assert cache.reap() == 1
    assert stale.closed and not fresh.closed
    assert cache.take("a") is None and cache.take("b") is fresh
    cache.close()


def test_the_reuse_limit():
    cache = ConnectionCache(reuse_limit=3, clock=Clock())
    assert cache.put("k", Conn(transactions=2))
    worn = Conn(transactions=3)
    assert not cache.put("k", worn)  # it has carried its share: the caller closes it
    assert len(cache) == 1
    cache.close()


def test_off_and_closed_caches_keep_nothing():
    for cache in (ConnectionCache(reuse_limit=1), ConnectionCache(idle_time=0)):
        assert not cache.enabled and not cache.put("k", Conn())
    cache = ConnectionCache(clock=Clock())
    kept = Conn()
    cache.put("k", kept)
    cache.close()
    assert kept.closed and len(cache) == 0
    assert not cache.put("k", Conn()) and cache.take("k") is None
