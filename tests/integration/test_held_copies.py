"""Copies Redis missed while away, stored stale-only once it answers (src/brownout/_cache/held_copies.py).

Redis is real, reached through the project's TCP proxy that refuses; the clock is a fake one where age matters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from brownout._cache.held_copies import HeldCopies
from brownout._cache.read_cache import ReadCache
from brownout._cache.redis_link import RedisLink, RedisUnavailable
from tests.conftest import REDIS_URL
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy

ITEM = {"id": "n-1", "subject": "Welcome", "read_stamp": 7}


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=6379) as p:
        yield p


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cache_via(proxy: FaultProxy, prefix: str, clock: Clock) -> ReadCache:
    client = redis.Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=0.5, decode_responses=True)
    link = RedisLink(client, prefix=prefix, skip_seconds=0.05)
    return ReadCache(link, fresh_seconds=30, stale_seconds=300, clock=clock)


def down(proxy: FaultProxy) -> None:
    proxy.refuse()
    proxy.reset_existing()


def written_while_down(
    proxy: FaultProxy, cache: ReadCache, key: str, gen_key: str, value: dict[str, object], version: int
) -> None:
    """A write-through with Redis away: it fails, and the cache holds the copy."""
    down(proxy)
    with pytest.raises(RedisUnavailable):
        cache.write_through(key, [gen_key], value, version=version)


def keys(cache: ReadCache, ident: str) -> tuple[str, str]:
    return cache.link.key("cache", "item", ident), cache.link.key("gen", "item", ident)


def back(proxy: FaultProxy, cache: ReadCache, clock: Clock) -> None:
    proxy.pass_through()
    clock.now += 1  # the wall clock moves on
    assert wait_until(lambda: cache.link.available, timeout=5), "the link's 50 ms skip window never ended"


def test_a_write_through_redis_missed_is_stored_stale_only_once_it_answers(redis_proxy: FaultProxy, redis_prefix: str) -> None:
    clock = Clock(1_000_000.0)
    cache = cache_via(redis_proxy, redis_prefix, clock)
    key, gen_key = keys(cache, "n-1")
    written_while_down(redis_proxy, cache, key, gen_key, ITEM, 7)
    assert len(cache.held) == 1
    back(redis_proxy, cache, clock)

    assert cache.held.flush() == 1 and len(cache.held) == 0
    lookup = cache.lookup(key, gen_key)
    assert lookup.entry is not None and lookup.entry.value == ITEM
    assert lookup.entry.stored_at == 1_000_000.0  # its true age, not the time it reached Redis
    assert not lookup.entry.fresh(clock(), cache.fresh_seconds), "a held copy is never a hit"
    assert 0 < cache.link.client.pttl(key) <= 300_000


def test_a_database_read_redis_missed_is_held_and_stored_the_same_way(redis_proxy: FaultProxy, redis_prefix: str) -> None:
    clock = Clock(2_000_000.0)
    cache = cache_via(redis_proxy, redis_prefix, clock)
    key, gen_key = keys(cache, "n-2")
    cache.hold_read(key, ITEM)
    cache.hold_read(cache.link.key("cache", "item", "gone"), None)  # a 404 is not worth holding
    assert len(cache.held) == 1
    assert cache.held.flush() == 1
    entry = cache.lookup(key, gen_key).entry
    assert entry is not None and entry.value == ITEM and not entry.fresh(clock(), cache.fresh_seconds)


def test_a_newer_copy_already_there_is_kept(redis_proxy: FaultProxy, redis_prefix: str) -> None:
    clock = Clock(3_000_000.0)
    cache = cache_via(redis_proxy, redis_prefix, clock)
    key, gen_key = keys(cache, "n-3")
    written_while_down(redis_proxy, cache, key, gen_key, ITEM | {"subject": "old"}, 7)
    back(redis_proxy, cache, clock)
    # Once Redis is back another process writes the item again (a later version, taken later) before the flush.
    cache.write_through(key, [gen_key], ITEM | {"subject": "new"}, version=8)
    assert cache.held.flush() == 1
    entry = cache.lookup(key, gen_key).entry
    assert entry is not None and entry.value["subject"] == "new" and entry.fresh(clock(), cache.fresh_seconds)

    # An older copy there (from before the outage) gives way to the held one.
    other, other_gen = keys(cache, "n-4")
    cache.write_through(other, [other_gen], ITEM | {"subject": "before"}, version=5)
    clock.now += 1
    written_while_down(redis_proxy, cache, other, other_gen, ITEM | {"subject": "during"}, 6)
    back(redis_proxy, cache, clock)
    assert cache.held.flush() == 1
    raw = cache.link.client.get(other)
    assert raw is not None and json.loads(raw)["value"]["subject"] == "during"


def test_flush_stops_while_redis_is_away_and_the_thread_stores_later(redis_proxy: FaultProxy, redis_prefix: str) -> None:
    clock = Clock(4_000_000.0)
    cache = cache_via(redis_proxy, redis_prefix, clock)
    key, gen_key = keys(cache, "n-5")
    written_while_down(redis_proxy, cache, key, gen_key, ITEM, 9)
    assert cache.held.flush() == 0 and len(cache.held) == 1  # skipped: Redis is still away
    redis_proxy.pass_through()
    assert wait_until(lambda: len(cache.held) == 0, timeout=10), "the held copy's thread never stored it"
    assert cache.lookup(key, gen_key).entry is not None


def test_bounded_oldest_dropped(redis_prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, decode_responses=True)
    link = RedisLink(client, prefix=redis_prefix, skip_seconds=1)
    held = HeldCopies(link, stale_seconds=300, limit=2, interval_seconds=3600)
    for ident in ("a", "b", "c"):
        held.hold(link.key("cache", "item", ident), json.dumps({"id": ident}), taken_at=1.0)
    assert len(held) == 2 and held.dropped == 1
