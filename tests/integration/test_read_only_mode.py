"""Read-only mode over HTTP: entered and left by the operator for the whole fleet, or set for a process.

Real PostgreSQL, RabbitMQ and Redis, with credentials; a second web process (in a process of its own)
shares only the test's database, queue and Redis prefix with the first.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pika.exceptions
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, build_registry
from app.schema import notifications
from brownout._auth.keys import entry_for
from brownout._db import Database
from brownout._settings import Settings
from brownout.fastapi import Brownout, BrownoutDep, require_scope
from tests.conftest import REDIS_URL
from tests.support.api_server import serve_in_process, serve_in_thread
from tests.support.credentials import AS_OPERATOR, AS_SERVICE, OPERATOR_TOKEN, SERVICE_KEY_ENTRY
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count

ADA = {"user_id": 42, "email": "ada@example.com", "subject": "Read-only", "body": "b"}
METRICS_KEY = "bo_prometheus-only-key-0123456789abcdefgh"


def set_mode(client: httpx.Client, mode: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post("/admin/mode", json={"mode": mode}, headers=headers or AS_OPERATOR)


def queued(queue_name: str) -> int:
    """Messages in the test's queue; 0 when no publisher has declared it yet."""
    try:
        return ready_count(queue_name)
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def rows(database: Database) -> int:
    with database.session() as session:
        return int(session.execute(select(func.count()).select_from(notifications)).scalar_one())


def keys_of(redis_prefix: str, kind: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=5)
    try:
        return [str(key) for key in client.scan_iter(match=f"{redis_prefix}{kind}:*", count=1000)]
    finally:
        client.close()


def mode_metric(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "brownout_mode":
            return {sample.labels["brownout_mode"]: sample.value for sample in family.samples}
    return {}


def ready_detail(client: httpx.Client) -> tuple[int, dict[str, Any]]:
    answer = client.get("/ready", headers=AS_OPERATOR)
    return answer.status_code, answer.json()


@pytest.fixture
def database(api_settings: Callable[..., Settings]) -> Any:
    database = Database.from_settings(api_settings())
    yield database
    database.close()


def test_only_the_admin_scope_changes_the_mode_and_before_its_body_is_read(api_settings: Callable[..., Settings]) -> None:
    keys = f"{SERVICE_KEY_ENTRY},{entry_for('prometheus', METRICS_KEY, ['metrics'])}"
    with serve_in_thread(api_settings(api_keys=keys, admin_token=OPERATOR_TOKEN)) as api, api.anonymous() as outsider:
        forbidden = set_mode(outsider, "read-only", {"Authorization": f"Bearer {METRICS_KEY}"})
        assert forbidden.status_code == 403 and "admin" in forbidden.json()["detail"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {OPERATOR_TOKEN}"}):
            answer = outsider.post("/admin/mode", json={"mode": "read-only"}, headers=headers)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", headers
        assert outsider.post("/admin/mode", json={"mode": "explode"}).status_code == 401  # the body is not looked at
        assert set_mode(outsider, "explode").status_code == 422
        assert api.brownout.write_mode.state.mode == "read-write"
        assert api.client.post("/notifications", json=ADA).status_code == 201  # nothing changed


def test_without_redis_the_mode_cannot_reach_the_fleet(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings(redis_url=None, admin_token=OPERATOR_TOKEN)) as api:
        refused = set_mode(api.client, "read-only")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
        assert "nothing was changed" in refused.json()["detail"]
        assert api.brownout.write_mode.state.mode == "read-write"
        assert api.client.post("/notifications", json=ADA).status_code == 201


def test_a_write_in_read_only_mode_leaves_nothing_and_its_key_is_an_ordinary_write_after(
    api_settings: Callable[..., Settings], database: Database, queue_name: str, redis_prefix: str
) -> None:
    # Cached copies are fresh for 50 ms only: the stale read below is served from the stale window.
    with serve_in_thread(api_settings(admin_token=OPERATOR_TOKEN, cache_fresh_seconds=0.05)) as api:
        earlier = api.client.post("/notifications", json=ADA)  # no key: nothing of it kept in Redis but the cache
        assert earlier.status_code == 201, earlier.text
        entered = set_mode(api.client, "read-only")
        assert entered.status_code == 200, entered.text
        assert entered.json()["mode"] == "read-only" and entered.json()["reason"] == "operator"
        assert entered.json()["since"] and entered.json()["fleet"]["mode"] == "read-only"

        key = {"Idempotency-Key": "during-read-only"}
        refused = api.client.post("/notifications", json=ADA | {"subject": "refused"}, headers=key)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == str(refused.json()["retry_after"])
        assert refused.json()["detail"] == "read-only mode" and refused.json()["reason"] == "operator"
        assert refused.json()["since"] == entered.json()["since"]
        mark = api.client.post(f"/notifications/{earlier.json()['id']}/read", headers={"Idempotency-Key": "mark-1"})
        assert mark.status_code == 503 and mark.json()["detail"] == "read-only mode"
        assert rows(database) == 1 and queued(queue_name) == 0  # nothing applied, nothing queued
        assert keys_of(redis_prefix, "idempotency") == [] and keys_of(redis_prefix, "pending") == []

        # Reads are served as usual: the database while it answers, the cache otherwise.
        assert api.client.get(f"/notifications/{earlier.json()['id']}").json() == earlier.json()
        assert api.client.get("/users/42/notifications").json()["items"] == [earlier.json()]
        read_at = time.time()
        assert wait_until(lambda: time.time() > read_at + 0.1, timeout=5)  # the cached copy is past fresh
        api.brownout.database.breaker.force_open()
        stale = api.client.get(f"/notifications/{earlier.json()['id']}")
        assert stale.status_code == 200 and stale.headers["x-brownout"] == "stale"
        api.brownout.database.breaker.reset()

        status, body = ready_detail(api.client)
        assert status == 200 and body["ready"] is True and body["writes"] == "read-only"
        assert body["mode"]["reason"] == "operator" and body["mode"]["since"] == entered.json()["since"]
        with api.anonymous() as outsider:
            plain = outsider.get("/ready")
            assert plain.status_code == 200 and plain.json() == {"ready": True}
        metric = mode_metric(api.client.get("/metrics").text)
        assert metric == {"read-write": 0, "read-only": 1, "read-only-automatic": 0}, metric

        left = set_mode(api.client, "read-write")
        assert left.status_code == 200 and left.json()["mode"] == "read-write", left.text
        again = api.client.post("/notifications", json=ADA | {"subject": "refused"}, headers=key)
        assert again.status_code == 201, again.text  # an ordinary write: no claim, no record of the refusal
        assert again.json()["subject"] == "refused" and rows(database) == 2
        assert ready_detail(api.client)[1]["writes"] == "direct"
        assert mode_metric(api.client.get("/metrics").text)["read-write"] == 1


def test_writes_in_flight_at_the_switch_end_applied_or_refused_never_in_between(
    api_settings: Callable[..., Settings], database: Database, queue_name: str, redis_prefix: str
) -> None:
    """Each write checks the mode once, before anything: one that passed is applied (or queued); one refused
    left nothing, so its key is free."""
    # no 503 but the mode's on a busy machine: no admission control
    settings = api_settings(admin_token=OPERATOR_TOKEN, admission=False)
    with serve_in_thread(settings) as api, ThreadPoolExecutor(8) as pool:
        with httpx.Client(base_url=api.url, headers=AS_SERVICE, timeout=20) as client:

            def write(index: int) -> tuple[str, int, str]:
                key = f"flight-{index}-{uuid.uuid4().hex[:6]}"
                answer = client.post("/notifications", json=ADA | {"subject": key}, headers={"Idempotency-Key": key})
                return key, answer.status_code, str(answer.json().get("detail", ""))

            writes = [pool.submit(write, index) for index in range(60)]
            assert wait_until(lambda: sum(future.done() for future in writes) >= 5, timeout=20)
            assert set_mode(api.client, "read-only").status_code == 200
            outcomes = [future.result(30) for future in writes]
            late = [pool.submit(write, index) for index in range(60, 64)]
            outcomes += [future.result(30) for future in late]
    applied = {key for key, status, _ in outcomes if status == 201}
    in_queue = {key for key, status, _ in outcomes if status == 202}
    refused = {key for key, status, detail in outcomes if status == 503 and detail == "read-only mode"}
    assert len(applied) + len(in_queue) + len(refused) == len(outcomes), outcomes  # nothing else, no 500
    assert all(key in refused for key, _, _ in outcomes[-4:])  # after the switch: every one refused
    assert applied and refused
    with database.session() as session:
        assert set(session.execute(select(notifications.c.subject)).scalars()) == applied
    assert queued(queue_name) == len(in_queue)
    # An accepted write claimed its key (for its body) in Redis; a refused one claimed nothing.
    assert len(keys_of(redis_prefix, "idempotency")) == len(applied) + len(in_queue)


def test_another_process_follows_the_mode_and_one_started_later_applies_it(api_settings: Callable[..., Settings]) -> None:
    settings = api_settings(admin_token=OPERATOR_TOKEN, override_poll_seconds=0.2)
    fields = {name: getattr(settings, name) for name in type(settings).model_fields} | {"admin_token": OPERATOR_TOKEN}

    def writes_of(url: str) -> str:
        return str(httpx.get(f"{url}/ready", headers=AS_OPERATOR, timeout=5).json()["writes"])

    with serve_in_thread(settings) as api, serve_in_process(fields) as other:
        assert wait_until(lambda: writes_of(other) == "direct", timeout=15)  # its first health check done
        assert set_mode(api.client, "read-only").status_code == 200
        assert wait_until(lambda: writes_of(other) == "read-only", timeout=2), "not within a few poll intervals"
        refused = httpx.post(f"{other}/notifications", json=ADA, headers=AS_SERVICE, timeout=10)
        assert refused.status_code == 503 and refused.json()["detail"] == "read-only mode"

        with serve_in_thread(settings) as later:  # started while the mode stands: read-only from its first request
            assert later.brownout.write_mode.state.reason == "operator"
            assert later.client.post("/notifications", json=ADA).status_code == 503

        assert set_mode(api.client, "read-write").status_code == 200
        assert wait_until(lambda: writes_of(other) != "read-only", timeout=2)
        assert httpx.post(f"{other}/notifications", json=ADA, headers=AS_SERVICE, timeout=10).status_code == 201


def test_the_read_only_setting_holds_a_process_whatever_the_fleet_says(
    api_settings: Callable[..., Settings], database: Database
) -> None:
    with serve_in_thread(api_settings(read_only=True, admin_token=OPERATOR_TOKEN)) as api:
        refused = api.client.post("/notifications", json=ADA)
        assert refused.status_code == 503 and refused.json()["reason"] == "setting"
        status, body = ready_detail(api.client)
        assert status == 200 and body["writes"] == "read-only" and body["mode"]["reason"] == "setting"
        lifted = set_mode(api.client, "read-write")
        assert lifted.status_code == 200 and lifted.json()["mode"] == "read-only" and lifted.json()["reason"] == "setting"
        assert lifted.json()["fleet"]["mode"] == "read-write" and "BROWNOUT_READ_ONLY" in lifted.json()["detail"]
        assert api.client.post("/notifications", json=ADA).status_code == 503
        assert rows(database) == 0


def test_a_service_s_own_write_route_gets_the_same_answer(api_settings: Callable[..., Settings]) -> None:
    """The check is in the library's write path (`Dispatcher.accept`, under `submit`), and `init_app` maps it:
    a route of a service's own, which knows nothing of the mode, answers as the reference service's do."""
    brownout = Brownout(api_settings(read_only=True), registry=build_registry())
    app = brownout.init_app(FastAPI(), observability=False)

    @app.post("/orders", dependencies=[require_scope("write")])
    def place(brownout: BrownoutDep) -> dict[str, str]:
        outcome = brownout.dispatcher.submit(CREATE, ADA, idempotency_key="own-route-1")
        return {"outcome": type(outcome).__name__}

    with TestClient(app, headers=AS_SERVICE) as client:  # the app's lifespan: Brownout started on the real services
        refused = client.post("/orders")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "30", refused.text
    assert refused.json()["detail"] == "read-only mode" and refused.json()["reason"] == "setting"


def test_a_full_queue_with_the_breaker_open_is_automatic_read_only(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings(queue_max_length=2, admin_token=OPERATOR_TOKEN)) as api:
        assert wait_until(lambda: ready_detail(api.client)[1]["rabbitmq"]["publisher"] == "ready", timeout=20)
        api.brownout.database.breaker.force_open()
        for index in range(2):
            assert api.client.post("/notifications", json=ADA | {"subject": f"queued {index}"}).status_code == 202
        full = api.client.post("/notifications", json=ADA | {"subject": "one too many"})
        assert full.status_code == 503 and full.json()["detail"] != "read-only mode", full.text  # the queue's refusal
        # The queue's depth is read every few seconds: the state shows within that.
        assert wait_until(lambda: ready_detail(api.client)[1]["writes"] == "read-only", timeout=15)
        status, body = ready_detail(api.client)
        assert status == 503 and body["mode"]["reason"] == "automatic"
        assert any("queue full" in reason for reason in body["reasons"]), body["reasons"]
        assert mode_metric(api.client.get("/metrics").text)["read-only-automatic"] == 1
