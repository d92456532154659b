"""Redis cannot grow without bound: every key the service writes expires (but the few fleet records that must
not), a user's cached pages and recent writes are capped, and a flood of reads for ids and pages that do not
exist leaves a bounded number of keys. TTLs are asserted with PTTL, never waited for.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from app.api.pending import PendingWrites
from app.api.queries import Position
from brownout import ReadCache, RedisLink
from brownout._fleet.assembly import build_fleet_breaker, stop_breaker
from brownout._fleet.shared_breaker import SharedBreaker
from brownout._settings import Settings
from tests.conftest import REDIS_URL
from tests.support.api_server import RunningApi, serve_in_thread

ADA = {"user_id": 7, "email": "ada@example.com", "subject": "Bounds", "body": "b"}
TOKEN = "memory-test-operator-token-0123456789"
FRESH, STALE, PENDING = 30.0, 600.0, 300.0
FUTURE_US = 4_000_000_000_000_000  # a cursor after every item: the page holds the user's newest items


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=5)
    yield connection
    connection.close()


@pytest.fixture
def api(api_settings: Callable[..., Settings]) -> Iterator[RunningApi]:
    settings = api_settings(cache_fresh_seconds=FRESH, cache_stale_seconds=STALE, pending_seconds=PENDING, admin_token=TOKEN)
    with serve_in_thread(settings) as running:
        yield running


def keys_under(client: redis.Redis, prefix: str) -> list[str]:
    return [str(key) for key in client.scan_iter(match=prefix + "*", count=1000)]


def kind_of(key: str, prefix: str) -> str:
    parts = key[len(prefix) :].split(":")
    return parts[0] if parts[0] in ("idempotency", "command", "rate") else ":".join(parts[:2])


def cursor(created_us: int) -> str:
    return Position(created_us, str(uuid.uuid4())).encode()


def test_every_key_the_service_writes_expires_but_the_fleet_override(
    api: RunningApi, client: redis.Redis, redis_prefix: str
) -> None:
    created = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "k-1"}).json()  # direct
    assert api.client.post(f"/notifications/{created['id']}/read").status_code == 200
    api.client.get(f"/notifications/{created['id']}")
    api.client.get("/users/7/notifications")  # a page
    api.client.get("/users/8/notifications")  # an empty page
    assert api.client.get(f"/notifications/{uuid.uuid4()}").status_code == 404  # a remembered miss
    opened = api.client.post("/admin/breaker", json={"action": "open"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert opened.status_code == 200, opened.text
    mode = api.client.post("/admin/mode", json={"mode": "read-write"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert mode.status_code == 200, mode.text
    assert api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "k-2"}).status_code == 202
    assert api.client.post(f"/notifications/{created['id']}/unread").status_code == 202  # a pending mark

    bounds = {
        "cache:item": STALE,
        "cache:list": STALE,
        "gen:item": STALE,
        "gen:user": STALE,
        "idempotency": STALE,
        "index:empty": STALE,
        "index:pages": STALE,
        "pending:item": PENDING,
        "pending:mark": PENDING,
        "recent:user": PENDING,
        "command": PENDING,
        "rate": 60,  # a caller's rate budget: within its period (a minute by default)
    }
    never_expire = {"breaker:override", "mode:override"}  # the operator's records: see README "Redis memory"
    seen: dict[str, list[int]] = {}
    for key in keys_under(client, redis_prefix):
        seen.setdefault(kind_of(key, redis_prefix), []).append(int(client.pttl(key)))
    assert set(seen) == set(bounds) | never_expire, f"key kinds written: {sorted(seen)}"
    for kind, ttls in seen.items():
        if kind in never_expire:
            assert ttls == [-1]
        else:
            # -2: gone between the listing and its PTTL (a rate key lives a few milliseconds): it did expire.
            assert all(ttl == -2 or 0 < ttl <= bounds[kind] * 1000 for ttl in ttls), f"{kind}: PTTL {ttls}"


def test_a_remembered_miss_lives_no_longer_than_the_fresh_window(api: RunningApi, client: redis.Redis, redis_prefix: str) -> None:
    missing = str(uuid.uuid4())
    assert api.client.get(f"/notifications/{missing}").status_code == 404
    ttl = client.pttl(f"{redis_prefix}cache:item:{missing}")
    assert 0 < ttl <= FRESH * 1000, f"a cached 404 lives {ttl} ms"


def test_the_cache_locks_and_generations_expire_the_epoch_does_not(redis_prefix: str, client: redis.Redis) -> None:
    link = RedisLink(redis.Redis.from_url(REDIS_URL, decode_responses=True), prefix=redis_prefix, skip_seconds=1)
    cache = ReadCache(link, fresh_seconds=FRESH, stale_seconds=STALE)
    token = cache.try_lock(link.key("cache", "order", 1, "loading"), 2.0)
    assert token is not None and 0 < client.pttl(link.key("cache", "order", 1, "loading")) <= 2000
    cache.write_through(link.key("cache", "order", 1), [link.key("gen", "order", 1)], {"id": 1})
    assert 0 < client.pttl(link.key("gen", "order", 1)) <= STALE * 1000
    assert 0 < client.pttl(link.key("cache", "order", 1)) <= STALE * 1000
    link.missed_write()
    link.run(lambda c: c.ping())  # the first command after a missed write bumps the epoch
    assert client.pttl(link.epoch_key) == -1  # one key, never expires: see README "Redis memory"
    link.close()


def test_the_shared_breaker_keys_expire_but_its_state(make_settings: Callable[..., Settings], redis_prefix: str) -> None:
    from brownout._db import ErrorKind

    settings = make_settings(
        breaker_backend="redis",
        redis_url=REDIS_URL,
        redis_key_prefix=redis_prefix,
        breaker_failure_threshold=2,
        breaker_open_seconds=30,
        breaker_probe_interval_seconds=0.5,
    )
    breaker = build_fleet_breaker(settings)
    assert isinstance(breaker, SharedBreaker)
    try:
        base = f"{redis_prefix}breaker:{breaker.name}"
        client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        breaker.record_failure(breaker.before_call(), ErrorKind.DISCONNECT)
        assert 0 < client.pttl(base + ":failures") <= breaker.window_seconds * 1000
        assert breaker.claim_probe() and 0 < client.pttl(base + ":probe") <= 1000
        breaker.record_failure(breaker.before_call(), ErrorKind.DISCONNECT)  # opens, fleet-wide
        breaker.on_health({"healthy": True})  # probe-gated: OPEN -> HALF_OPEN
        permit = breaker.before_call()  # the fleet's one trial: a lease
        assert 0 < client.pttl(base + ":lease") <= 30_000
        breaker.release(permit)
        assert client.pttl(base) == -1  # the fleet's breaker state never expires: see README "Redis memory"
        client.close()
    finally:
        stop_breaker(breaker)


def test_a_users_cached_pages_are_capped_the_oldest_dropped(api: RunningApi, client: redis.Redis, redis_prefix: str) -> None:
    from app.api.reads import PAGES_PER_USER

    api.client.post("/notifications", json=ADA)
    cursors = [cursor(FUTURE_US + n) for n in range(PAGES_PER_USER + 20)]
    for each in cursors:
        assert len(api.client.get("/users/7/notifications", params={"cursor": each}).json()["items"]) == 1
    pages = [key for key in keys_under(client, redis_prefix) if kind_of(key, redis_prefix) == "cache:list"]
    assert len(pages) == PAGES_PER_USER, f"{len(pages)} pages cached for one user"
    assert client.exists(f"{redis_prefix}cache:list:7:20:{cursors[-1]}")  # the newest kept
    assert not client.exists(f"{redis_prefix}cache:list:7:20:{cursors[0]}")  # the oldest dropped


def test_a_users_recent_writes_are_capped_the_oldest_dropped(redis_prefix: str) -> None:
    link = RedisLink(redis.Redis.from_url(REDIS_URL, decode_responses=True), prefix=redis_prefix, skip_seconds=1)
    pending = PendingWrites(link, ttl_seconds=PENDING, recent_cap=10)
    now_us = int(pending.clock() * 1_000_000)
    idents = [str(uuid.uuid4()) for _ in range(25)]
    for n, ident in enumerate(idents):
        pending.note_recent(7, ident, now_us - 1000 + n)
    assert [ident for ident, _ in pending.recent(7)] == idents[::-1][:10]
    link.close()


def test_a_flood_of_reads_for_missing_ids_and_pages_leaves_a_bounded_number_of_keys(
    api: RunningApi, client: redis.Redis, redis_prefix: str
) -> None:
    from app.api.reads import PAGES_PER_USER

    cache = api.brownout.cache
    assert cache is not None
    cache.empty_cap = 20  # the fleet-wide bound on remembered misses and empty pages (default 1,000)
    for _ in range(3):
        api.client.post("/notifications", json=ADA)
    before = len(keys_under(client, redis_prefix))
    rng = random.Random(7)
    for n in range(4 * (PAGES_PER_USER + 10)):  # each kind past its bound
        if n % 4 == 0:
            path = f"/notifications/{uuid.uuid4()}"  # no such notification
        elif n % 4 == 1:
            path = f"/users/{rng.randrange(10**6, 10**9)}/notifications"  # no such user
        elif n % 4 == 2:
            path = f"/users/7/notifications?cursor={cursor(rng.randrange(0, 10**12))}"  # before every item: empty
        else:
            path = f"/users/7/notifications?cursor={cursor(FUTURE_US + n)}"  # a page of its own, not empty
        assert api.client.get(path).status_code in (200, 404)
    grown = len(keys_under(client, redis_prefix)) - before
    assert grown <= 20 + PAGES_PER_USER + 2, f"{grown} keys after {n + 1} reads of things that do not exist"
