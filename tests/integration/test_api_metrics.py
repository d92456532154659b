"""`GET /metrics` counts what happened, with bounded labels, from the real request and database paths."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from brownout._observability.metrics import Metrics
from brownout._settings import Settings
from brownout.fastapi._http_metrics import HTTP_METHODS, HttpMetrics
from tests.support.api_server import serve_in_thread

ADA = {"user_id": 3, "email": "ada@example.com", "subject": "Metrics", "body": "b"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_follow_reads_writes_and_the_breaker(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings()) as api:
        item = api.client.post("/notifications", json=ADA).json()
        api.client.get(f"/notifications/{item['id']}")  # a hit (written through)
        api.brownout.database.breaker.force_open()
        queued = api.client.post("/notifications", json=ADA | {"subject": "queued"})
        assert queued.status_code == 202
        api.client.get("/users/3/notifications/stats")  # shed
        api.brownout.database.breaker.reset()

        answer = api.client.get("/metrics")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        found = samples(answer.text)

    assert found[("brownout_dispatch_total", (("outcome", "applied"),))] == 1
    assert found[("brownout_dispatch_total", (("outcome", "queued"),))] == 1
    assert found[("brownout_cache_reads_total", (("result", "hit"),))] == 1
    assert found[("brownout_db_calls_total", ())] >= 1
    assert found[("brownout_db_call_duration_seconds_count", (("result", "ok"),))] >= 1
    transitions = {labels: value for (name, labels), value in found.items() if name == "brownout_breaker_transitions_total"}
    assert transitions[(("breaker", "database"), ("to", "open"))] == 1
    assert transitions[(("breaker", "database"), ("to", "closed"))] == 1
    assert found[("brownout_breaker_state", (("breaker", "database"),))] == 0
    assert found[("brownout_pool_connections", (("state", "size"),))] == 10
    assert found[("brownout_pool_max_overflow", ())] == 20  # with the size, the pool's maximum (default 10 + 20)
    assert found[("brownout_queue_max_length", ())] == 100_000
    assert found[("brownout_queue_messages", ())] == 1  # the queued write, read from RabbitMQ
    assert found[("brownout_dead_letters", ())] == 0
    routes = {dict(labels).get("route") for (name, labels) in found if name == "brownout_http_requests_total"}
    assert "/notifications/{notification_id}" in routes and "/users/{user_id}/notifications/stats" in routes
    assert not any(item["id"] in str(labels) for (_, labels) in found), "an id became a label"
    shed = found[
        (
            "brownout_http_requests_total",
            (("method", "GET"), ("route", "/users/{user_id}/notifications/stats"), ("status", "503")),
        )
    ]
    assert shed == 1


def test_refusals_by_the_open_breaker_are_counted(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings()) as api:
        # Start-up's own calls (the acceptance clock's seed) are counted before the breaker opens.
        calls_at_start = samples(api.client.get("/metrics").text).get(("brownout_db_calls_total", ()), 0)
        api.brownout.database.breaker.force_open()
        for _ in range(3):
            assert api.client.get("/users/3/notifications").status_code == 503  # nothing cached: a miss
        found = samples(api.client.get("/metrics").text)
    # refused before any loader (no lock, no query): counted as refusals, not as database calls
    assert found[("brownout_breaker_state", (("breaker", "database"),))] == 2
    assert found[("brownout_db_refused_total", ())] == 3
    assert found.get(("brownout_db_calls_total", ()), 0) == calls_at_start


def test_a_caller_cannot_make_series_with_invented_methods(api_settings: Callable[..., Settings]) -> None:
    """Each distinct label value is a series in every process's files and in Prometheus: a method is one of
    HTTP's, or `other`; a path is its route's template, or `unmatched`."""
    with serve_in_thread(api_settings()) as api:
        invented = [api.client.request(f"X{index}Y", "/health").status_code for index in range(5)]
        for index in range(5):
            api.client.get(f"/no/such/path/{index}")
        text = api.client.get("/metrics").text
    labels = {
        (sample.labels.get("method"), sample.labels.get("route"))
        for family in text_string_to_metric_families(text)
        if family.name == "brownout_http_requests"
        for sample in family.samples
    }
    assert invented == [400] * 5  # uvicorn's parser (httptools) refuses a method HTTP does not define
    assert {method for method, _ in labels} <= set(HTTP_METHODS)
    assert {route for _, route in labels if route and route.startswith("/no/")} == set()


def test_a_method_that_reaches_the_app_is_labelled_other_unless_http_defines_it() -> None:
    """Behind a server that passes any method on (h11 does), HttpMetrics itself keeps the labels bounded."""
    metrics = Metrics(CollectorRegistry())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    for method in ("X0Y", "GET"):
        asyncio.run(HttpMetrics(app, metrics=metrics)({"type": "http", "method": method, "path": "/"}, receive, send))
    assert metrics.http_requests.labels("other", "unmatched", "204")._value.get() == 1
    assert metrics.http_requests.labels("GET", "unmatched", "204")._value.get() == 1
