"""PendingReplay: missed pending entries kept in order, bounded, recorded once Redis answers."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import redis

from brownout._cache.pending_replay import PendingReplay
from brownout._cache.redis_link import RedisLink, RedisUnavailable
from tests.conftest import REDIS_URL
from tests.support.polling import wait_until


def envelope(name: str = "create") -> Any:
    return SimpleNamespace(command_id=uuid.uuid4(), entity_id=uuid.uuid4(), name=name)


def link(redis_prefix: str) -> RedisLink:
    return RedisLink(redis.Redis.from_url(REDIS_URL, socket_timeout=1), prefix=redis_prefix, skip_seconds=1)


def test_flush_records_oldest_first_and_stops_at_the_first_failure(redis_prefix: str) -> None:
    recorded: list[Any] = []
    failing = {"on": True}

    def record(env: Any) -> None:
        if failing["on"] and len(recorded) == 1:
            raise RedisUnavailable("deadline missed")
        recorded.append(env)

    replay = PendingReplay(link(redis_prefix), record, lambda env: None)
    first, second, third = envelope(), envelope(), envelope()
    for env in (first, second, third):
        replay.add(env)
    assert replay.flush() == 1 and recorded == [first] and len(replay) == 2
    failing["on"] = False
    assert replay.flush() == 2 and recorded == [first, second, third] and len(replay) == 0


def test_bounded_the_oldest_go_first_and_a_waiting_creation_is_visible(redis_prefix: str) -> None:
    def describe(env: Any) -> dict[str, Any] | None:
        return {"id": str(env.entity_id)} if env.name == "create" else None

    replay = PendingReplay(link(redis_prefix), lambda env: None, describe, limit=2)
    oldest, mark, newest = envelope(), envelope("mark_read"), envelope()
    for env in (oldest, mark, newest):
        replay.add(env)
    assert len(replay) == 2 and replay.dropped == 1
    assert replay.item(str(oldest.entity_id)) is None  # dropped
    assert replay.item(str(mark.entity_id)) is None  # a mark shows no item
    assert replay.item(str(newest.entity_id)) == {"id": str(newest.entity_id)}


def test_the_thread_records_what_waits(redis_prefix: str) -> None:
    recorded: list[Any] = []
    replay = PendingReplay(link(redis_prefix), recorded.append, lambda env: None, interval_seconds=0.01).start()
    try:
        env = envelope()
        replay.add(env)
        assert wait_until(lambda: recorded == [env], timeout=5)
    finally:
        replay.stop()
