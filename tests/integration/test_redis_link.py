"""RedisLink against real Redis: a missed write ends cached freshness once, fleet-wide."""

from __future__ import annotations

import threading

import redis

from app.cache.redis_link import RedisLink
from tests.conftest import REDIS_URL


def test_a_missed_write_bumps_the_epoch_once_however_many_threads_come_back(redis_prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, decode_responses=True)
    link = RedisLink(client, prefix=redis_prefix, skip_seconds=1)
    link.missed_write()
    start = threading.Barrier(16)

    def read() -> None:
        start.wait(timeout=10)
        link.run(lambda c: c.get(link.key("anything")))

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert client.get(link.epoch_key) == "1"
    link.run(lambda c: c.ping())
    assert client.get(link.epoch_key) == "1"  # the flag is spent
