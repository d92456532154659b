"""PendingWrites against real Redis: one round trip per queued write, the latest mark wins."""

from __future__ import annotations

import uuid

import redis

from app.api.pending import PendingWrites
from brownout._cache.redis_link import RedisLink
from tests.conftest import REDIS_URL


def pending(redis_prefix: str) -> PendingWrites:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, decode_responses=True)
    return PendingWrites(RedisLink(client, prefix=redis_prefix, skip_seconds=1), ttl_seconds=60)


def test_a_queued_creation_is_recorded_with_its_command_and_recent_entry(redis_prefix: str) -> None:
    writes = pending(redis_prefix)
    ident, command = str(uuid.uuid4()), str(uuid.uuid4())
    item = {"id": ident, "user_id": 7, "subject": "s", "read": False, "created_at": "2026-11-29T15:00:00+00:00"}
    created_us = int(writes.clock() * 1_000_000)
    writes.record_queued(command, {"command": "create_notification"}, item=item, created_us=created_us)
    assert writes.items([ident]) == {ident: item | {"status": "pending"}}
    assert writes.command(command) == {"command": "create_notification"}
    assert writes.recent(7) == [(ident, created_us)]


def test_the_mark_with_the_latest_stamp_wins_whatever_the_arrival_order(redis_prefix: str) -> None:
    writes = pending(redis_prefix)
    ident = str(uuid.uuid4())
    writes.record_queued(str(uuid.uuid4()), {}, mark=(ident, True, 2**62 + 5))
    writes.record_queued(str(uuid.uuid4()), {}, mark=(ident, False, 2**62 + 4))  # older, arrives late
    assert writes.marks([ident])[ident]["read"] is True
    writes.record_queued(str(uuid.uuid4()), {}, mark=(ident, False, 2**62 + 6))
    assert writes.marks([ident])[ident]["read"] is False
