"""RedisLink against real Redis: a missed write ends cached freshness once, fleet-wide."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio
import uvloop
from redis.backoff import NoBackoff
from redis.retry import Retry

from brownout._auth.rate_limit import Rate, RateLimiter
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


def async_link(host: str, port: int, redis_prefix: str, deadline: float = 0.05) -> RedisLink:
    """A link with its asyncio client, as build_redis_link makes it (the deadline kept by the link)."""
    sync = redis.Redis(host=host, port=port, socket_timeout=deadline, retry=Retry(NoBackoff(), 0), decode_responses=True)
    aclient = redis.asyncio.Redis(host=host, port=port, socket_connect_timeout=deadline, decode_responses=True)
    return RedisLink(sync, prefix=redis_prefix, skip_seconds=60, aclient=aclient, atimeout=deadline)


def test_a_stalled_event_loop_is_no_verdict_on_redis(redis_prefix: str) -> None:
    """Eight commands in flight, then the loop stalls past their deadline (a collection, a CPU-bound callback):
    Redis answered in time and the replies wait unread; whether the timers run before the replies are read
    depends on where in its round trip each command was, so the stall comes after 1 to 12 turns of the loop."""
    shared = async_link("127.0.0.1", 6379, redis_prefix)

    async def stalls() -> list[str]:
        await asyncio.gather(*(shared.arun(lambda c: c.ping()) for _ in range(8)))  # eight warm connections
        tripped, key = [], shared.key("k")
        for turns in range(1, 13):
            link = RedisLink(shared.client, prefix=redis_prefix, skip_seconds=60, aclient=shared.aclient, atimeout=0.05)
            calls = [asyncio.ensure_future(link.arun(lambda c: c.get(key))) for _ in range(8)]
            for _ in range(turns):
                await asyncio.sleep(0)
            time.sleep(0.08)  # noqa: ASYNC251 - the stall under test
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(outcome is None or isinstance(outcome, RedisUnavailable) for outcome in outcomes), outcomes
            if not link.available:
                tripped.append(f"after {turns} turns: {link.last_error}")
        await shared.aclose()
        return tripped

    assert uvloop.run(stalls()) == [], "a stalled loop tripped the link"


def test_a_silent_redis_still_trips_the_link_on_the_event_loop(redis_prefix: str) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=6379) as proxy:
        # A roomy deadline: on a busy CI machine the loop may run a 50 ms timer 25 ms late, which is no verdict.
        link = async_link("127.0.0.1", proxy.port, redis_prefix, deadline=0.4)

        async def silent() -> None:
            await link.arun(lambda c: c.ping())
            proxy.silence()
            for _ in range(2):
                with pytest.raises(RedisUnavailable):
                    await link.arun(lambda c: c.ping())
            await link.aclose()

        uvloop.run(silent())
        assert not link.available, "two timeouts in a row, the loop on time: skip Redis"


class _Refusing:
    """A Redis that refuses the rate with a 1 us wait (what GCRA answers a hair before the next slot)."""

    async def evalsha(self, *args: object) -> list[int]:
        return [1]


def test_a_refusal_by_a_microsecond_is_a_refusal_not_an_empty_read(redis_prefix: str) -> None:
    link = RedisLink(redis.Redis.from_url(REDIS_URL), prefix=redis_prefix, skip_seconds=1, aclient=_Refusing(), atimeout=1)  # type: ignore[arg-type]
    limiter = RateLimiter(link=link, processes=1)
    wait, values = uvloop.run(limiter.ahit_and_read("someone:reads", Rate(10, 1), ["a", "b", "c"]))
    assert (wait, values) == (1.0, None)
