"""RateLimiter against real Redis: one budget for the fleet, a per-process share of it while Redis is away.

Windows on the Redis path are long (e.g. 3/hour) so "over the limit" is tested
without waiting; the local path runs on an injected clock. One test waits
0.3 s for a real refill in Redis (Redis's own time drives the script).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from brownout._auth.rate_limit import Rate, RateLimiter
from brownout._cache.redis_link import RedisLink
from tests.conftest import REDIS_URL
from tests.support.tcp_proxy import FaultProxy


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def links(redis_prefix: str) -> Iterator[list[RedisLink]]:
    """Links made by `direct_link`, closed at the end."""
    made: list[RedisLink] = []
    yield made
    for link in made:
        link.close()


def direct_link(links: list[RedisLink], prefix: str) -> RedisLink:
    """A process's own link to the local Redis (a 1 s deadline: the machine is shared, the fault tests use the proxy)."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
    link = RedisLink(client, prefix=prefix, skip_seconds=60)
    links.append(link)
    return link


def raw_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, socket_timeout=5, decode_responses=True)


def outcomes(limiter: RateLimiter, subject: str, rate: Rate, times: int) -> list[float | None]:
    return [limiter.hit(subject, rate) for _ in range(times)]


def test_allowed_up_to_the_count_then_refused_with_a_retry_after(links: list[RedisLink], redis_prefix: str) -> None:
    limiter = RateLimiter(link=direct_link(links, redis_prefix), processes=4)
    rate = Rate.parse("3/hour")
    assert outcomes(limiter, "key:orders:writes", rate, 3) == [None, None, None]
    first = limiter.hit("key:orders:writes", rate)
    assert first is not None and 1100 <= first <= 1200  # one slot comes back every 1200 s
    again = limiter.hit("key:orders:writes", rate)
    assert again is not None and again <= first, "a refused request must not spend budget"


def test_two_processes_worth_share_one_budget_whatever_their_clocks(links: list[RedisLink], redis_prefix: str) -> None:
    # Each its own link (its own connections) and wildly different clocks: Redis's TIME is the only one used.
    one = RateLimiter(link=direct_link(links, redis_prefix), processes=2, clock=FakeClock(0.0))
    two = RateLimiter(link=direct_link(links, redis_prefix), processes=2, clock=FakeClock(1e9))
    rate = Rate.parse("4/hour")
    results = [limiter.hit("user:7:reads", rate) for _ in range(4) for limiter in (one, two)]
    assert results[:4] == [None] * 4
    assert all(result is not None and result >= 1 for result in results[4:])


def test_subjects_are_independent(links: list[RedisLink], redis_prefix: str) -> None:
    limiter = RateLimiter(link=direct_link(links, redis_prefix), processes=1)
    rate = Rate.parse("2/hour")
    assert outcomes(limiter, "auth-failures:10.0.0.1", rate, 3)[2] is not None
    assert outcomes(limiter, "auth-failures:10.0.0.2", rate, 2) == [None, None]
    assert limiter.hit("key:orders:writes", rate) is None


def test_a_cost_spends_several_slots_at_once(links: list[RedisLink], redis_prefix: str) -> None:
    limiter = RateLimiter(link=direct_link(links, redis_prefix), processes=1)
    rate = Rate.parse("3/hour")
    assert limiter.hit("key:bulk", rate, cost=2) is None
    assert limiter.hit("key:bulk", rate, cost=2) is not None
    assert limiter.hit("key:bulk", rate) is None
    with pytest.raises(ValueError, match="cost"):
        limiter.hit("key:bulk", rate, cost=4)  # could never be allowed
    with pytest.raises(ValueError, match="cost"):
        limiter.hit("key:bulk", rate, cost=0)


def test_every_key_written_expires_within_its_period(links: list[RedisLink], redis_prefix: str) -> None:
    limiter = RateLimiter(link=direct_link(links, redis_prefix), processes=1)
    rates = {"a": Rate.parse("3/hour"), "b": Rate.parse("10/minute"), "c": Rate.parse("50/30s"), "d": Rate.parse("1/day")}
    for subject, rate in rates.items():
        outcomes(limiter, subject, rate, rate.count + 2 if rate.count < 10 else 4)
    client = raw_client()
    try:
        keys = set(client.scan_iter(match=redis_prefix + "*", count=1000))
        assert keys == {redis_prefix + "rate:" + subject for subject in rates}
        for subject, rate in rates.items():
            ttl = client.pttl(redis_prefix + "rate:" + subject)
            assert 0 < ttl <= rate.seconds * 1000, (subject, ttl)
    finally:
        client.close()


def test_a_short_window_refills_in_redis_time(links: list[RedisLink], redis_prefix: str) -> None:
    limiter = RateLimiter(link=direct_link(links, redis_prefix), processes=1)
    rate = Rate.parse("5/second")  # a slot comes back every 0.2 s
    refused = None
    for _ in range(50):  # until refused, however slow the machine
        refused = limiter.hit("key:fast", rate)
        if refused is not None:
            break
    assert refused == 1.0, "a wait of 0.2 s is announced as Retry-After: 1"
    time.sleep(0.3)
    assert limiter.hit("key:fast", rate) is None


def test_threads_of_one_process_never_overspend(links: list[RedisLink], redis_prefix: str) -> None:
    limiter = RateLimiter(link=direct_link(links, redis_prefix), processes=1)
    rate = Rate.parse("30/hour")
    allowed: list[bool] = []
    start = threading.Barrier(8)

    def run() -> None:
        start.wait(timeout=10)
        allowed.extend(limiter.hit("key:busy", rate) is None for _ in range(10))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(allowed) == 80 and sum(allowed) == 30


def proxied_link(proxy: FaultProxy, prefix: str, clock: FakeClock) -> RedisLink:
    """Production's deadlines (50 ms, no retry) through the proxy; the skip window on *clock*."""
    client = redis.Redis(
        host="127.0.0.1",
        port=proxy.port,
        socket_timeout=0.05,
        socket_connect_timeout=0.05,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )
    return RedisLink(client, prefix=prefix, skip_seconds=60, clock=clock)


def test_redis_refusing_limits_each_process_to_its_share_then_the_fleet_budget_returns(redis_prefix: str) -> None:
    link_clock, clock = FakeClock(), FakeClock()
    rate = Rate.parse("4/hour")
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=6379) as proxy:
        link = proxied_link(proxy, redis_prefix, link_clock)
        limiter = RateLimiter(link=link, processes=2, clock=clock)
        assert limiter.hit("key:orders:writes", rate) is None  # through Redis: 3 left fleet-wide

        proxy.refuse()
        proxy.reset_existing()
        # 4/hour over 2 processes: 2 here, neither unlimited nor refused for Redis's sake.
        assert outcomes(limiter, "key:orders:writes", rate, 2) == [None, None]
        assert not link.available
        waited = limiter.hit("key:orders:writes", rate)
        assert waited == 1800.0  # one local slot per 1800 s
        clock.now += 1800
        assert limiter.hit("key:orders:writes", rate) is None
        assert limiter.hit("key:orders:writes", rate) is not None

        proxy.pass_through()
        link_clock.now += 61  # the skip window is over
        assert outcomes(limiter, "key:orders:writes", rate, 3) == [None, None, None]
        assert link.available
        refused = limiter.hit("key:orders:writes", rate)
        assert refused is not None and 800 < refused <= 900  # Redis's budget (a slot per 900 s), spent before and after
        link.close()


def test_without_redis_the_limit_is_the_process_share_on_the_injected_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(link=None, processes=3, clock=clock)
    rate = Rate.parse("6/minute")  # 2 per process, one back every 30 s
    assert outcomes(limiter, "user:1:reads", rate, 3) == [None, None, 30.0]
    clock.now += 10
    assert limiter.hit("user:1:reads", rate) == 20.0
    clock.now += 20
    assert limiter.hit("user:1:reads", rate) is None
    assert limiter.hit("user:2:reads", rate) is None


def test_a_share_below_one_still_lets_one_request_through() -> None:
    clock = FakeClock()
    limiter = RateLimiter(link=None, processes=8, clock=clock)
    rate = Rate.parse("2/minute")  # 1/4 per process: one per 240 s
    assert outcomes(limiter, "s", rate, 2) == [None, 240.0]
    clock.now += 240
    assert limiter.hit("s", rate) is None


def test_a_wait_under_a_second_is_announced_as_one() -> None:
    limiter = RateLimiter(link=None, processes=1, clock=FakeClock())
    assert outcomes(limiter, "s", Rate.parse("10/second"), 11)[-1] == 1.0


def test_local_threads_never_overspend() -> None:
    limiter = RateLimiter(link=None, processes=1, clock=FakeClock())
    rate = Rate.parse("50/hour")
    allowed: list[bool] = []
    start = threading.Barrier(16)

    def run() -> None:
        start.wait(timeout=10)
        allowed.extend(limiter.hit("key:busy", rate) is None for _ in range(10))

    threads = [threading.Thread(target=run) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(allowed) == 160 and sum(allowed) == 50


def test_local_state_is_bounded_and_keeps_the_busy_subjects() -> None:
    limiter = RateLimiter(link=None, processes=1, clock=FakeClock(), max_subjects=10)
    rate = Rate.parse("1/hour")
    assert limiter.hit("hot", rate) is None
    for i in range(1000):
        limiter.hit(f"cold:{i}", rate)
        assert limiter.hit("hot", rate) is not None, "the busiest subject was forgotten"
    assert limiter.local_subjects <= 10


_CHILD = textwrap.dedent(
    """
    import sys, redis
    from brownout._auth.rate_limit import Rate, RateLimiter
    from brownout._cache.redis_link import RedisLink
    url, prefix = sys.argv[1], sys.argv[2]
    link = RedisLink(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2), prefix=prefix, skip_seconds=60)
    limiter = RateLimiter(link=link, processes=2)
    sys.stdin.readline()  # both started: go
    print(sum(limiter.hit("key:shared", Rate.parse("10/hour")) is None for _ in range(10)))
    """
)


def test_two_os_processes_share_one_budget(redis_prefix: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, REDIS_URL, redis_prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for child in children:  # both are up before either starts
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    answers = [int(child.communicate(timeout=60)[0]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert sum(answers) == 10, answers
