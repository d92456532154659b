"""RedisLink against real Redis: a missed write ends cached freshness once, fleet-wide."""

from __future__ import annotations

import threading

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from brownout._cache.redis_link import RedisLink, RedisUnavailable
from tests.conftest import REDIS_URL
from tests.support.tcp_proxy import FaultProxy


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


def proxied_link(proxy: FaultProxy, redis_prefix: str) -> RedisLink:
    client = redis.Redis(
        host="127.0.0.1",
        port=proxy.port,
        socket_timeout=0.05,
        socket_connect_timeout=0.05,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )
    return RedisLink(client, prefix=redis_prefix, skip_seconds=60)


def test_a_lone_timeout_on_a_healthy_link_does_not_trip_two_in_a_row_do(redis_prefix: str) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=6379) as proxy:
        link = proxied_link(proxy, redis_prefix)
        link.run(lambda c: c.ping())
        proxy.silence()
        with pytest.raises(RedisUnavailable):
            link.run(lambda c: c.ping())
        assert link.available, "one timeout (a starved process, perhaps) is no verdict"
        proxy.pass_through()
        link.run(lambda c: c.ping())  # answered: the count starts again
        proxy.silence()
        with pytest.raises(RedisUnavailable):
            link.run(lambda c: c.ping())
        assert link.available
        with pytest.raises(RedisUnavailable):
            link.run(lambda c: c.ping())
        assert not link.available, "two timeouts in a row: skip Redis"


def test_a_refused_connection_trips_at_once(redis_prefix: str) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=6379) as proxy:
        link = proxied_link(proxy, redis_prefix)
        link.run(lambda c: c.ping())
        proxy.refuse()
        proxy.reset_existing()
        with pytest.raises(RedisUnavailable):
            link.run(lambda c: c.ping())
        assert not link.available
