"""The HTTP API while Redis refuses, goes silent or comes back, through a real TCP proxy.

What it proves: Redis is only ever a shortcut. With Redis refusing or silent,
reads and writes are answered from the database; the first request pays at
most about one Redis deadline (redis_timeout_seconds, 0.05 s) instead of
redis-py's seconds, and later ones skip Redis for redis_skip_seconds; the
cache serves again once Redis answers; with the database down too, a read is
a clean 503 with Retry-After. An operator action that must reach the fleet
through Redis is refused (503) rather than applied to one process.

Bounds are wide (shared machine); the timed tests print their measured latencies
(`pytest -s`).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from brownout._cache.redis_link import RedisLink
from brownout._db import BreakerState
from brownout._settings import Settings
from tests.conftest import database_url
from tests.support.api_server import OPERATOR_TOKEN, RunningApi, serve_in_thread
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy

ADA = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}
TOKEN = OPERATOR_TOKEN
REQUEST_BOUND = 1.0  # seconds; redis-py's defaults cost ~4.5 s (refused) to over a minute (silent)
REDIS_DEADLINE_SHARE = 0.1  # what one failed Redis round trip may add (2 x redis_timeout_seconds)
MARGIN = 0.25  # scheduling noise on 2 shared cores
TRACE_MARKERS = ("Traceback", 'File "', "psycopg2", "redis.exceptions", "sqlalchemy")


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=6379) as p:
        yield p


@pytest.fixture
def settings_via(api_settings: Callable[..., Settings], redis_proxy: FaultProxy) -> Callable[..., Settings]:
    """API settings whose Redis is reached through the proxy, with production's Redis deadline."""

    def factory(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "redis_url": f"redis://127.0.0.1:{redis_proxy.port}/0",
            "redis_timeout_seconds": Settings.model_fields["redis_timeout_seconds"].default,
        }
        return api_settings(**fields | overrides)

    return factory


def break_redis(proxy: FaultProxy, fault: str) -> None:
    if fault == "refuse":
        proxy.refuse()
        proxy.reset_existing()  # pooled connections die too, as when Redis itself goes away
    else:
        proxy.silence()  # open connections are silenced as well


def timed_get(api: RunningApi, path: str) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = api.client.get(path)
    return time.perf_counter() - started, response


def link_of(api: RunningApi) -> RedisLink:
    link = api.brownout.link
    assert link is not None
    return link


def create(api: RunningApi, **fields: Any) -> dict[str, Any]:
    response = api.client.post("/notifications", json=ADA | fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_clean_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]
    assert not any(marker in response.text for marker in TRACE_MARKERS), response.text


@pytest.mark.parametrize("fault", ["refuse", "silence"])
def test_dead_redis_costs_one_deadline_then_is_skipped(
    settings_via: Callable[..., Settings], redis_proxy: FaultProxy, fault: str
) -> None:
    # A long skip window and no override polling: the first request below is the one that meets Redis.
    settings = settings_via(redis_skip_seconds=60, override_poll_seconds=3600)
    assert settings.redis_timeout_seconds == 0.05
    with serve_in_thread(settings) as api:
        link = link_of(api)
        item = create(api)
        path = f"/notifications/{item['id']}"
        healthy = []
        for _ in range(8):
            elapsed, response = timed_get(api, path)
            assert response.headers["cache-status"].startswith("Brownout; hit")
            healthy.append(elapsed)

        break_redis(redis_proxy, fault)
        assert link.available
        first_s, first = timed_get(api, path)
        assert first.status_code == 200 and first.json() == item
        assert first.headers["cache-status"] == "Brownout; fwd=miss; detail=cache-unavailable"
        assert not link.available, "one failure must start the skip window"

        skipped = []
        for i in range(8):
            elapsed, response = timed_get(api, path if i % 2 else "/users/42/notifications")
            assert response.status_code == 200, response.text
            skipped.append(elapsed)
        assert api.client.get("/users/42/notifications").json()["items"] == [item]

        started = time.perf_counter()
        written = create(api, subject="while Redis is down")
        write_s = time.perf_counter() - started
        assert written["status"] == "applied"
        assert api.client.get(f"/notifications/{written['id']}").json() == written
        assert [i["id"] for i in api.client.get("/users/42/notifications").json()["items"]] == [written["id"], item["id"]]

    healthy_median, skipped_median = statistics.median(healthy), statistics.median(skipped)
    print(
        f"\n[redis {fault}] healthy median {healthy_median * 1000:.1f} ms, first {first_s * 1000:.1f} ms, "
        f"skipped median {skipped_median * 1000:.1f} ms (max {max(skipped) * 1000:.1f}), write {write_s * 1000:.1f} ms"
    )
    assert max([first_s, write_s, *skipped]) < REQUEST_BOUND
    # The Redis time paid by the first request: one deadline, not redis-py's retries.
    assert first_s - skipped_median < REDIS_DEADLINE_SHARE + MARGIN
    assert first_s - healthy_median < REDIS_DEADLINE_SHARE + MARGIN


def test_cache_serves_again_once_redis_answers(settings_via: Callable[..., Settings], redis_proxy: FaultProxy) -> None:
    with serve_in_thread(settings_via(redis_skip_seconds=0.5)) as api:
        link = link_of(api)
        break_redis(redis_proxy, "refuse")
        item = create(api)  # its write-through fails: not cached
        assert not link.available
        during = api.client.get(f"/notifications/{item['id']}")
        assert during.status_code == 200 and "detail=cache-unavailable" in during.headers["cache-status"]

        redis_proxy.pass_through()
        assert wait_until(lambda: link.available, timeout=10)
        first = api.client.get(f"/notifications/{item['id']}")
        second = api.client.get(f"/notifications/{item['id']}")
        assert first.json() == second.json() == item
        assert first.headers["cache-status"] == "Brownout; fwd=miss; stored"
        assert second.headers["cache-status"].startswith("Brownout; hit")


def test_write_during_outage_is_not_hidden_by_the_cache_after_it(
    settings_via: Callable[..., Settings], redis_proxy: FaultProxy
) -> None:
    with serve_in_thread(settings_via(redis_skip_seconds=0.5)) as api:
        link = link_of(api)
        item = create(api)  # written through: cached, fresh for 30 s
        assert api.client.get(f"/notifications/{item['id']}").headers["cache-status"].startswith("Brownout; hit")
        break_redis(redis_proxy, "refuse")
        marked = api.client.post(f"/notifications/{item['id']}/read")
        assert marked.status_code == 200 and marked.json()["read"] is True

        redis_proxy.pass_through()
        assert wait_until(lambda: link.available, timeout=10)
        after = api.client.get(f"/notifications/{item['id']}")
        assert after.status_code == 200
        assert after.json()["read"] is True, after.headers.get("cache-status")


def test_database_and_redis_both_down_is_a_clean_503(
    settings_via: Callable[..., Settings], redis_proxy: FaultProxy, proxy: FaultProxy, pg_database: str
) -> None:
    settings = settings_via(database_url=database_url(pg_database, port=proxy.port))
    with serve_in_thread(settings) as api:
        item = create(api)  # in the database and in the cache
        assert api.client.get(f"/notifications/{item['id']}").status_code == 200
        break_redis(redis_proxy, "refuse")
        proxy.refuse()
        proxy.reset_existing()
        elapsed, response = timed_get(api, f"/notifications/{item['id']}")
        listed = api.client.get("/users/42/notifications")
    print(f"\n[redis + database down] 503 in {elapsed * 1000:.1f} ms")
    assert_clean_503(response)
    assert_clean_503(listed)
    assert elapsed < REQUEST_BOUND + settings.request_db_deadline_seconds


def test_admin_breaker_refused_and_ready_says_why_while_redis_is_down(
    settings_via: Callable[..., Settings], redis_proxy: FaultProxy
) -> None:
    with serve_in_thread(settings_via(admin_token=TOKEN, redis_skip_seconds=0.5)) as api:
        breaker = api.brownout.database.breaker
        auth = {"Authorization": f"Bearer {TOKEN}"}
        break_redis(redis_proxy, "refuse")
        before = breaker.snapshot()
        refused = api.client.post("/admin/breaker", json={"action": "open"}, headers=auth)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        assert "nothing was changed" in refused.json()["detail"]
        assert breaker.state is BreakerState.CLOSED and breaker.snapshot() == before

        ready = api.client.get("/ready", headers=auth)
        assert ready.status_code in (200, 503)
        body = ready.json()
        assert body["redis"]["ok"] is False and body["redis"]["error"] and body["parts"]["redis"] in ("skipped", "unreachable")
        assert any(reason.startswith("Redis unavailable") for reason in body["reasons"]), body["reasons"]

        # Control: the same request works once Redis answers, so the 503 above was Redis's doing.
        redis_proxy.pass_through()
        assert wait_until(lambda: link_of(api).available, timeout=10)
        applied = api.client.post("/admin/breaker", json={"action": "open"}, headers=auth)
        assert applied.status_code == 200, applied.text
        assert breaker.snapshot()["state"] == "open" and breaker.snapshot()["forced"] == "open"
        assert api.client.post("/admin/breaker", json={"action": "reset"}, headers=auth).status_code == 200
        assert wait_until(lambda: api.client.get("/ready", headers=auth).json()["redis"]["ok"] is True, timeout=10)


def test_read_only_mode_refused_while_redis_is_down_and_nothing_changes(
    settings_via: Callable[..., Settings], redis_proxy: FaultProxy
) -> None:
    with serve_in_thread(settings_via(admin_token=TOKEN, redis_skip_seconds=0.5)) as api:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        break_redis(redis_proxy, "refuse")
        refused = api.client.post("/admin/mode", json={"mode": "read-only"}, headers=auth)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5" and "nothing was changed" in refused.json()["detail"]
        assert api.brownout.write_mode.state.mode == "read-write"
        assert api.client.post("/notifications", json=ADA).status_code == 201  # writes go on

        # Control: the same request works once Redis answers, so the 503 above was Redis's doing.
        redis_proxy.pass_through()
        assert wait_until(lambda: link_of(api).available, timeout=10)
        entered = api.client.post("/admin/mode", json={"mode": "read-only"}, headers=auth)
        assert entered.status_code == 200 and entered.json()["mode"] == "read-only", entered.text
        assert api.client.post("/notifications", json=ADA).status_code == 503
        # Redis down again: the process keeps the mode it last followed, and read-write cannot reach the fleet either.
        break_redis(redis_proxy, "refuse")
        assert api.client.post("/admin/mode", json={"mode": "read-write"}, headers=auth).status_code == 503
        assert api.client.post("/notifications", json=ADA).status_code == 503
        redis_proxy.pass_through()
        assert wait_until(lambda: link_of(api).available, timeout=10)
        assert api.client.post("/admin/mode", json={"mode": "read-write"}, headers=auth).status_code == 200


@pytest.mark.parametrize("outage", ["breaker", "refuse"])
def test_database_down_uncached_read_is_503_cached_one_is_stale(
    settings_via: Callable[..., Settings], proxy: FaultProxy, pg_database: str, outage: str
) -> None:
    # Entries go stale at once, so the cached item below is answered from the stale window, not as a hit.
    settings = settings_via(database_url=database_url(pg_database, port=proxy.port), cache_fresh_seconds=0.01)
    with serve_in_thread(settings) as api:
        cached = create(api)
        written = time.time()
        assert wait_until(lambda: time.time() > written + 0.05, timeout=5)  # the wall clock ages the entry past fresh
        if outage == "breaker":
            api.brownout.database.breaker.force_open()
        else:
            proxy.refuse()
            proxy.reset_existing()
        elapsed, miss = timed_get(api, f"/notifications/{uuid.uuid4()}")  # never cached: cannot say 404
        stale = api.client.get(f"/notifications/{cached['id']}")
        assert link_of(api).available, "Redis was up all along"
    print(f"\n[database down ({outage}), Redis up] miss 503 in {elapsed * 1000:.1f} ms")
    assert_clean_503(miss)
    assert "database unavailable" in miss.json()["detail"]
    assert elapsed < REQUEST_BOUND + settings.request_db_deadline_seconds
    assert stale.status_code == 200 and stale.json() == cached
    assert stale.headers["x-brownout"] == "stale"


def test_an_unknown_id_is_503_not_404_while_redis_cannot_say_what_is_pending(
    settings_via: Callable[..., Settings], redis_proxy: FaultProxy
) -> None:
    """A 404 would deny a creation this service acknowledged (202) and still holds in the queue."""
    with serve_in_thread(settings_via()) as api:
        unknown = "5f0e9a3c-1b2d-4c8e-9f7a-6d5c4b3a2e10"
        assert api.client.get(f"/notifications/{unknown}").status_code == 404  # Redis up: it is known not to exist
        break_redis(redis_proxy, "refuse")
        answer = api.client.get(f"/notifications/{unknown}")
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
        assert "pending writes are unknown" in answer.json()["detail"]


def test_a_queued_creation_redis_missed_is_recorded_once_redis_answers(
    settings_via: Callable[..., Settings], api_settings: Callable[..., Settings], redis_proxy: FaultProxy
) -> None:
    """The 202 does not wait for Redis; its pending entry, missed once, is recorded later, not lost."""
    with serve_in_thread(settings_via(redis_skip_seconds=0.5)) as writer, serve_in_thread(api_settings()) as reader:
        writer.brownout.database.breaker.force_open()  # writes are queued (no worker here: they stay queued)
        break_redis(redis_proxy, "silence")
        queued = writer.client.post("/notifications", json=ADA)
        assert queued.status_code == 202, queued.text
        ident, command_id = queued.json()["id"], queued.json()["command_id"]
        replay = writer.services.replay
        assert replay is not None and len(replay) == 1

        own = writer.client.get(f"/notifications/{ident}")  # the process that accepted it still shows it
        assert own.status_code == 200, own.text
        assert own.json()["status"] == "pending" and own.json()["subject"] == ADA["subject"]
        # The window that remains: another process finds no row and no pending entry.
        assert reader.client.get(f"/notifications/{ident}").status_code == 404

        redis_proxy.pass_through()
        assert wait_until(lambda: reader.client.get(f"/notifications/{ident}").status_code == 200, timeout=10)
        shown = reader.client.get(f"/notifications/{ident}").json()
        assert shown["status"] == "pending" and shown["subject"] == ADA["subject"]
        assert reader.client.get(f"/commands/{command_id}").json()["status"] == "queued"
        assert len(replay) == 0


def test_an_item_written_while_redis_was_away_is_served_stale_in_a_later_database_outage(
    settings_via: Callable[..., Settings], redis_proxy: FaultProxy, proxy: FaultProxy, pg_database: str
) -> None:
    """Redis down, then (after it is back) the database down: the item created meanwhile is still answered.
    Before, it had no cached copy until someone read it with both up, and every read of it was a 503."""
    settings = settings_via(database_url=database_url(pg_database, port=proxy.port), redis_skip_seconds=0.5)
    with serve_in_thread(settings) as api:
        link = link_of(api)
        break_redis(redis_proxy, "refuse")
        item = create(api)  # 201 from the database; its write-through missed Redis
        assert not link.available

        redis_proxy.pass_through()
        cached = link.key("cache", "item", item["id"])
        assert wait_until(lambda: link.available and bool(link.client.exists(cached)), timeout=10), "never stored"
        proxy.refuse()
        proxy.reset_existing()
        stale = api.client.get(f"/notifications/{item['id']}")
    assert stale.status_code == 200, stale.text
    assert stale.json() == item
    assert stale.headers["x-brownout"] == "stale"
    assert "detail=database-unavailable" in stale.headers["cache-status"]
