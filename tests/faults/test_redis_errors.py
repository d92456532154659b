"""Redis answering with an error is Redis unavailable for that call: a degraded answer, never a 500.

Redis at `maxmemory` with `noeviction` answers writes with OOM; a replica after a failover answers them with
READONLY. Neither is a connection error, and both escaped the link as ResponseError into cache fills and into
every write carrying an Idempotency-Key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from brownout import RedisLink, RedisUnavailable, Settings
from tests.support.api_server import serve_in_thread
from tests.support.polling import wait_until
from tests.support.throwaway_redis import throwaway_redis

ADA = {"user_id": 42, "email": "ada@example.com", "subject": "Hello", "body": "b"}


@pytest.fixture(scope="module")
def full_redis() -> Iterator[int]:
    """A Redis whose memory is full: every write is refused with OOM, reads still answer."""
    with throwaway_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as port:
        client = redis.Redis(port=port)
        # Large values first, then small ones: once a 64 KB write is refused, freeing its query buffer can leave
        # room for a small write (the test's own failed in CI that way); full means even a small one is refused.
        for size in (65536, 1024, 1):
            try:
                for index in range(100_000):
                    client.set(f"filler:{size}:{index}", b"x" * size)
            except redis.exceptions.OutOfMemoryError:
                continue
            pytest.fail(f"the throwaway Redis never filled up with {size}-byte values")
        yield port


def link_to(port: int) -> RedisLink:
    return RedisLink(redis.Redis(port=port, socket_timeout=1), prefix="t:", skip_seconds=5)


def test_out_of_memory_is_unavailability_and_opens_the_skip_window(full_redis: int) -> None:
    link = link_to(full_redis)
    with pytest.raises(RedisUnavailable, match="OutOfMemoryError"):
        link.run(lambda client: client.set("t:k", "v"))
    assert not link.available  # the next calls go around Redis for the skip window


def test_a_read_only_replica_is_unavailability() -> None:
    with throwaway_redis() as primary, throwaway_redis("--replicaof", "127.0.0.1", str(primary)) as replica:
        assert wait_until(lambda: redis.Redis(port=replica).info("replication")["master_link_status"] == "up", timeout=10)
        link = link_to(replica)
        with pytest.raises(RedisUnavailable, match="ReadOnlyError"):
            link.run(lambda client: client.set("t:k", "v"))


def test_the_api_answers_from_the_database_when_redis_refuses_writes(
    api_settings: Callable[..., Settings], full_redis: int
) -> None:
    with serve_in_thread(api_settings(redis_url=f"redis://127.0.0.1:{full_redis}/0")) as api:
        created = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "oom-1"})
        assert created.status_code == 201, created.text
        read = api.client.get(f"/notifications/{created.json()['id']}")
        assert read.status_code == 200 and read.json()["subject"] == "Hello", read.text
        listed = api.client.get("/users/42/notifications")
        assert listed.status_code == 200 and listed.json()["items"], listed.text
        metrics = api.client.get("/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith('brownout_redis_errors_total{kind="out_of_memory"}')]
    assert counted and float(counted[0].split()[-1]) >= 1, "counted by kind"
