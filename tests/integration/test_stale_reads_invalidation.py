"""A service's cached items stop being fresh when their writes are applied, by the web or by the worker."""

from __future__ import annotations

from collections.abc import Callable

from brownout import Database, ReadCache, Settings, StaleReads, build_redis_link, invalidate_after_apply


def test_a_write_applied_elsewhere_makes_the_cached_item_stale_not_gone(
    api_settings: Callable[..., Settings], make_database: Callable[..., Database]
) -> None:
    settings = api_settings()
    link = build_redis_link(settings)
    assert link is not None
    cache = ReadCache(link, fresh_seconds=60, stale_seconds=600)
    reads = StaleReads(database=make_database(), cache=cache, deadline=1.0)
    keys = reads.keys("order", 7)
    assert keys is not None
    first = reads.read(keys, lambda session: {"id": 7, "status": "placed"})
    assert first.from_database
    assert not reads.read(keys, lambda session: {"id": 7, "status": "never asked"}).from_database  # fresh in Redis

    hook = invalidate_after_apply("order", lambda result: result["id"])(settings)
    assert hook is not None
    hook([({"id": 7, "status": "shipped"}, True)])  # what the worker calls after its COMMIT
    again = reads.read(keys, lambda session: {"id": 7, "status": "shipped"})
    assert again.from_database and again.body["status"] == "shipped"

    reads.written(keys)  # what a route calls after a write it applied
    lookup = cache.lookup(*keys)
    assert lookup.entry is not None and not lookup.entry.fresh(cache.clock(), cache.fresh_seconds)  # still servable stale
    link.close()


def test_without_redis_there_is_nothing_to_tell(api_settings: Callable[..., Settings]) -> None:
    assert invalidate_after_apply("order", lambda result: result["id"])(api_settings(redis_url=None)) is None
