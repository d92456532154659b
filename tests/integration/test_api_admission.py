"""Admission control over HTTP: past its limit a process refuses at once, critical work last, and still
answers reads from the cache.

The limit is pinned (min = max = 4) and the work in flight is set by the test, standing for requests the
process is busy with: what is tested is each verdict's answer, not the timing of real concurrency
(the rules that move the limit are in tests/unit/test_admission.py; bench/overload.py measures them
under real load).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine, text

from brownout._settings import Settings
from tests.conftest import database_url
from tests.support.api_server import RunningApi, serve_in_thread
from tests.support.fakes import JumpingWallClock
from tests.support.polling import wait_until

ADA = {"user_id": 7, "email": "ada@example.com", "subject": "Busy", "body": "b"}
LIMIT = 4


@pytest.fixture
def wall() -> JumpingWallClock:
    return JumpingWallClock()


@pytest.fixture
def api(api_settings: Callable[..., Settings], wall: JumpingWallClock) -> Iterator[RunningApi]:
    settings = api_settings(cache_fresh_seconds=0.2, admission_min_in_flight=LIMIT, admission_max_in_flight=LIMIT)
    with serve_in_thread(settings, clock=wall) as running:
        yield running


_made_busy: dict[int, int] = {}


def busy(api: RunningApi, in_flight: int) -> None:
    """The process is working on *in_flight* requests (of the test's own making)."""
    admission = api.brownout.admission
    assert admission is not None and admission.limit == LIMIT
    # The test's last request is released once its answer is sent, which the client may see first.
    before = _made_busy.get(id(api), 0)
    assert wait_until(lambda: admission.in_flight == before, timeout=2), admission.in_flight
    admission.in_flight = _made_busy[id(api)] = in_flight


def count_rows(pg_database: str) -> int:
    engine = create_engine(database_url(pg_database).replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM notifications")).scalar_one())
    finally:
        engine.dispose()


def assert_overloaded(response: object) -> None:
    assert response.status_code == 503, response.text  # type: ignore[attr-defined]
    assert response.headers["retry-after"] == "1"  # type: ignore[attr-defined]
    assert response.json() == {"detail": "overloaded", "retry_after": 1}  # type: ignore[attr-defined]


def test_past_the_limit_a_write_is_refused_before_its_body_or_caller_is_looked_at(api: RunningApi, pg_database: str) -> None:
    busy(api, LIMIT)
    assert_overloaded(api.client.post("/notifications", json=ADA))
    assert_overloaded(api.client.post("/notifications", content=b"{not json"))  # not a 422: the body is not read
    with api.anonymous() as anonymous:
        assert_overloaded(anonymous.post("/notifications", json=ADA))  # not a 401: nobody was identified
    assert count_rows(pg_database) == 0
    busy(api, 0)
    assert api.client.post("/notifications", json=ADA).status_code == 201
    admission = api.brownout.admission
    assert admission is not None
    assert wait_until(lambda: admission.in_flight == 0, timeout=2), "every admission is released"


def test_optional_routes_go_first_then_list_reads_then_writes_and_item_reads(api: RunningApi, wall: JumpingWallClock) -> None:
    item = api.client.post("/notifications", json=ADA).json()
    busy(api, 2)  # half the limit
    assert_overloaded(api.client.get("/users/7/notifications/stats"))
    listed = api.client.get("/users/7/notifications")
    assert listed.status_code == 200 and "fwd=miss" in listed.headers["cache-status"]  # admitted in full: 2 < 3
    busy(api, 3)  # three quarters: a list read now uses the cache alone, an item read is admitted in full
    wall.advance(0.3)  # every cached copy is past freshness
    listed = api.client.get("/users/7/notifications")
    assert listed.status_code == 200 and listed.json()["items"][0]["id"] == item["id"]
    assert listed.headers["x-brownout"] == "stale"
    assert listed.headers["cache-status"].endswith("detail=overloaded")
    fetched = api.client.get(f"/notifications/{item['id']}")
    assert fetched.status_code == 200 and "fwd=miss" in fetched.headers["cache-status"]
    assert api.client.post(f"/notifications/{item['id']}/read").status_code == 200


def test_at_the_limit_a_cached_read_is_served_from_the_cache_alone_and_a_miss_is_refused(
    api: RunningApi, wall: JumpingWallClock
) -> None:
    cached = api.client.post("/notifications", json=ADA).json()
    api.client.get(f"/notifications/{cached['id']}")  # stored in the cache
    busy(api, LIMIT)

    fresh = api.client.get(f"/notifications/{cached['id']}")
    assert fresh.status_code == 200 and fresh.json() == cached and "x-brownout" not in fresh.headers
    wall.advance(0.3)
    stale = api.client.get(f"/notifications/{cached['id']}")
    assert stale.status_code == 200 and stale.json() == cached
    assert stale.headers["x-brownout"] == "stale" and stale.headers["cache-status"].endswith("detail=overloaded")
    assert_overloaded(api.client.get(f"/notifications/{uuid.uuid4()}"))  # nothing cached: the database is not asked

    busy(api, LIMIT + LIMIT // 2)  # the cache's headroom is full too
    assert_overloaded(api.client.get(f"/notifications/{cached['id']}"))
    busy(api, 0)
    again = api.client.get(f"/notifications/{cached['id']}")
    assert again.status_code == 200 and "fwd=miss" in again.headers["cache-status"], "the shed flag did not stay behind"


def test_probes_metrics_and_the_operator_are_never_refused(api: RunningApi) -> None:
    busy(api, 10 * LIMIT)
    assert api.client.get("/health").status_code == 200
    assert api.client.get("/ready").status_code == 200
    metrics = api.client.get("/metrics")
    assert metrics.status_code == 200
    assert_overloaded(api.client.get("/users/7/notifications/stats"))
    busy(api, 0)
    text_ = api.client.get("/metrics").text
    assert 'brownout_admission_shed_total{criticality="optional",outcome="refused"} 1.0' in text_
    assert "brownout_admission_limit 4.0" in text_


def test_admission_control_can_be_turned_off(api_settings: Callable[..., Settings]) -> None:
    with serve_in_thread(api_settings(admission=False)) as api:
        assert api.brownout.admission is None
        assert api.client.get("/users/7/notifications/stats").status_code == 200


def test_a_refusal_costs_none_of_the_app_s_middleware_and_a_browser_can_read_it(api_settings: Callable[..., Settings]) -> None:
    """Past capacity refusals are most of what a process does: the gate sits outside Starlette's stack (its
    error handler, the HTTP metrics), inside CORS only. Counted once, as a refusal."""
    settings = api_settings(admission_min_in_flight=LIMIT, admission_max_in_flight=LIMIT, cors_origins="https://app.example.com")
    with serve_in_thread(settings) as api:
        busy(api, LIMIT)
        refused = api.client.post("/notifications", json=ADA, headers={"Origin": "https://app.example.com"})
        assert_overloaded(refused)
        assert refused.headers["access-control-allow-origin"] == "https://app.example.com"
        busy(api, 0)
        registry = api.brownout.metrics.registry
        shed = {"criticality": "critical", "outcome": "refused"}
        assert registry.get_sample_value("brownout_admission_shed_total", shed) == 1
        as_request = {"method": "POST", "route": "unmatched", "status": "503"}
        assert registry.get_sample_value("brownout_http_requests_total", as_request) is None
