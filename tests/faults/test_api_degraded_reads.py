"""Reads degrade, they do not fail: stale answers with their age while the database is sick.

The database is made sick for real: the breaker opened by an operator, or a
TCP proxy in front of PostgreSQL that goes silent (reads must then give up at
the request deadline and serve the stale copy, not wait out libpq).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.pending import PendingWrites
from brownout._settings import Settings
from tests.conftest import database_url
from tests.support.api_server import OPERATOR_TOKEN, RunningApi, serve_in_thread
from tests.support.fakes import JumpingWallClock
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy

OPERATOR = OPERATOR_TOKEN
ADA = {"user_id": 9, "email": "ada@example.com", "subject": "Degraded", "body": "b"}


@pytest.fixture
def wall() -> JumpingWallClock:
    """The app's wall clock for cache ages: real time, plus the jumps a test makes to age the entries."""
    return JumpingWallClock()


@pytest.fixture
def api(
    api_settings: Callable[..., Settings], pg_database: str, proxy: FaultProxy, wall: JumpingWallClock
) -> Iterator[RunningApi]:
    settings = api_settings(
        database_url=database_url(pg_database, port=proxy.port),
        cache_fresh_seconds=0.2,
        request_db_deadline_seconds=0.3,
    )
    with serve_in_thread(settings, clock=wall) as running:
        yield running


def _stale_soon(wall: JumpingWallClock) -> None:
    """Age every cached copy past its fresh TTL (0.2 s) without touching it."""
    wall.advance(0.3)


def test_breaker_open_serves_stale_with_age_and_markers(api: RunningApi, wall: JumpingWallClock) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    page = api.client.get("/users/9/notifications").json()
    _stale_soon(wall)
    api.brownout.database.breaker.force_open()

    stale = api.client.get(f"/notifications/{item['id']}")
    assert stale.status_code == 200 and stale.json() == item
    assert stale.headers["x-brownout"] == "stale"
    assert int(stale.headers["age"]) >= 0
    assert stale.headers["cache-status"].startswith("Brownout; hit; ttl=-")
    assert "detail=database-unavailable" in stale.headers["cache-status"]

    stale_list = api.client.get("/users/9/notifications")
    assert stale_list.status_code == 200 and stale_list.headers["x-brownout"] == "stale"
    assert stale_list.json() == page


def test_a_miss_while_the_database_is_down_is_503_with_retry_after(api: RunningApi) -> None:
    api.brownout.database.breaker.force_open()
    miss = api.client.get("/notifications/2b0c8f4e-9d8a-4f1e-8c57-3f5c2a1d0e9b")
    assert miss.status_code == 503
    assert int(miss.headers["retry-after"]) >= 1
    assert "database unavailable" in miss.json()["detail"]
    assert api.client.get("/users/12345/notifications").status_code == 503


def test_a_silent_database_costs_a_read_the_deadline_then_serves_stale(
    api: RunningApi, proxy: FaultProxy, wall: JumpingWallClock
) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    _stale_soon(wall)
    proxy.silence()
    proxy.reset_existing()  # pooled connections die; new ones are accepted and never answered

    started = time.monotonic()
    stale = api.client.get(f"/notifications/{item['id']}")
    elapsed = time.monotonic() - started
    assert stale.status_code == 200 and stale.headers["x-brownout"] == "stale"
    assert elapsed < 2.0, f"a read waited {elapsed:.2f} s on a silent database (deadline 0.3 s)"


def test_writes_are_visible_stale_after_the_database_goes_away(
    api: RunningApi, proxy: FaultProxy, wall: JumpingWallClock
) -> None:
    """Write-through: what was just written (and marked) is served while the database is gone."""
    item = api.client.post("/notifications", json=ADA).json()
    api.client.get("/users/9/notifications")  # a cached page without the next write
    second = api.client.post("/notifications", json=ADA | {"subject": "second"}).json()
    marked = api.client.post(f"/notifications/{item['id']}/read").json()
    assert marked["read"] is True
    _stale_soon(wall)
    proxy.refuse()
    proxy.reset_existing()

    assert api.client.get(f"/notifications/{item['id']}").json()["read"] is True
    page = api.client.get("/users/9/notifications")
    assert page.status_code == 200 and page.headers["x-brownout"] == "stale"
    by_id = {entry["id"]: entry for entry in page.json()["items"]}
    assert set(by_id) == {item["id"], second["id"]}
    assert by_id[item["id"]]["read"] is True


def test_non_critical_routes_are_shed_while_the_breaker_is_not_closed(api: RunningApi) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    assert api.client.get("/users/9/notifications/stats").status_code == 200
    api.brownout.database.breaker.force_open()
    shed = api.client.get("/users/9/notifications/stats")
    assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
    assert api.client.get(f"/notifications/{item['id']}").status_code == 200  # critical reads still answer
    api.brownout.database.breaker.reset()
    assert wait_until(lambda: api.client.get("/users/9/notifications/stats").status_code == 200, timeout=10)


def test_no_stack_trace_reaches_a_client(api: RunningApi, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(user_id: int) -> dict[str, int]:
        raise RuntimeError("password=hunter2 in a Traceback")

    monkeypatch.setattr(api.services.reads, "stats", explode)
    answer = api.client.get("/users/9/notifications/stats")
    assert answer.status_code == 500
    assert answer.json() == {"detail": "internal error"}
    assert "hunter2" not in answer.text and "Traceback" not in answer.text


def test_a_hung_database_read_does_not_block_the_event_loop(api: RunningApi, proxy: FaultProxy, wall: JumpingWallClock) -> None:
    """Database work runs on the thread pool: liveness answers while reads wait on a silent database."""
    item = api.client.post("/notifications", json=ADA).json()
    _stale_soon(wall)
    proxy.silence()
    proxy.reset_existing()
    with ThreadPoolExecutor(4) as pool:
        reads = [pool.submit(api.client.get, f"/notifications/{item['id']}") for _ in range(4)]
        started = time.monotonic()
        health = api.client.get("/health")
        health_seconds = time.monotonic() - started
        assert all(read.result(20).status_code == 200 for read in reads)
    assert health.status_code == 200 and health_seconds < 0.25, f"/health took {health_seconds:.3f} s"


def test_ready_is_503_when_no_write_can_be_made_durable(
    api_settings: Callable[..., Settings], pg_database: str, proxy: FaultProxy
) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5672) as rabbit:
        settings = api_settings(
            rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{rabbit.port}/%2F", publish_timeout_seconds=0.5, admin_token=OPERATOR
        )
        operator = {"Authorization": f"Bearer {OPERATOR}"}
        with serve_in_thread(settings) as api:
            assert wait_until(
                lambda: api.client.get("/ready", headers=operator).json()["rabbitmq"]["publisher"] == "ready", timeout=20
            )
            assert api.client.get("/ready").status_code == 200
            api.brownout.database.breaker.force_open()
            rabbit.refuse()
            rabbit.reset_existing()
            assert wait_until(lambda: api.client.get("/ready").status_code == 503, timeout=20)
            with api.anonymous() as outsider:
                assert outsider.get("/ready").json() == {"ready": False}  # anonymous: the status, nothing else
            body = api.client.get("/ready", headers=operator).json()
            # Neither the database nor the queue can take a write: read-only in effect, said as the operator's
            # mode is (the status stays 503: a failure, not a decision).
            assert body["ready"] is False and body["writes"] == "read-only" and body["mode"]["reason"] == "automatic"
            assert body["parts"]["breaker"] == "open" and body["parts"]["rabbitmq"] != "ready"
            assert any("circuit breaker open" in reason for reason in body["reasons"])
            assert any("RabbitMQ publisher" in reason for reason in body["reasons"])
            assert "guest:guest" not in str(body)  # the URL's password never shows
            assert mode_metric(api.client.get("/metrics").text) == {
                "read-write": 0,
                "read-only": 0,
                "read-only-automatic": 1,
            }
            rabbit.pass_through()  # the queue takes writes again: the automatic state ends, in /ready and the metric
            assert wait_until(lambda: api.client.get("/ready").status_code == 200, timeout=30)
            assert api.client.get("/ready", headers=operator).json()["writes"] == "queued"
            assert mode_metric(api.client.get("/metrics").text)["read-write"] == 1


def mode_metric(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "brownout_mode":
            return {sample.labels["brownout_mode"]: sample.value for sample in family.samples}
    return {}


def test_a_cached_not_found_never_joins_a_stale_list(api: RunningApi, wall: JumpingWallClock) -> None:
    """An id read (404, cached as "not found") before its creation was applied, then in the user's recent set."""
    item = api.client.post("/notifications", json=ADA).json()
    page = api.client.get("/users/9/notifications").json()
    early = "0b7e3c1d-2f4a-4b5c-8d6e-7f8091a2b3c4"
    assert api.client.get(f"/notifications/{early}").status_code == 404  # cached: not found
    assert api.brownout.link is not None
    pending = PendingWrites(api.brownout.link, ttl_seconds=api.brownout.settings.pending_seconds)
    pending.note_recent(9, early, int(wall() * 1_000_000))  # as its accepted write did; its pending item is gone
    _stale_soon(wall)
    api.brownout.database.breaker.force_open()

    stale_list = api.client.get("/users/9/notifications")
    assert stale_list.status_code == 200, stale_list.text  # was a 500: None sorted as an item
    assert stale_list.headers["x-brownout"] == "stale"
    assert stale_list.json() == page and page["items"] == [item]
