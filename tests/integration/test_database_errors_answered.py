"""A service's own database calls on a sick database are answered 503 + Retry-After, never a 500 with a trace:
the errors Brownout's retry layer raises, and a transient driver error that escaped it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.dispatch.notifications import build_registry
from brownout import Settings, execute_with_retry
from brownout._db.errors import CommitOutcomeUnknown
from brownout.fastapi import Brownout

TRACE_MARKERS = ("Traceback", "psycopg2", "sqlalchemy", 'File "')


@pytest.fixture
def client(api_settings: Callable[..., Settings]) -> Iterator[tuple[TestClient, Brownout]]:
    brownout = Brownout(api_settings(), registry=build_registry())
    app = brownout.init_app(FastAPI())

    @app.get("/sleep/{seconds}")
    def sleep(seconds: float) -> dict[str, int]:
        with brownout.database.session() as db:
            execute_with_retry(db, lambda: db.execute(text("SELECT pg_sleep(:s)"), {"s": seconds}), deadline=0.3)
        return {"slept": 1}

    @app.get("/own-connection-dies")
    def own_connection_dies() -> dict[str, int]:
        with brownout.database.session() as db:  # no retry layer: the driver's error escapes as it is
            db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return {"never": 1}

    @app.get("/bad-sql")
    def bad_sql() -> dict[str, int]:
        with brownout.database.session() as db:
            db.execute(text("SELECT * FROM no_such_table"))
        return {"never": 1}

    @app.get("/commit-unknown")
    def commit_unknown() -> dict[str, int]:
        raise CommitOutcomeUnknown("connection lost during COMMIT (ssl)")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client, brownout


def assert_clean_503(response: httpx.Response, *, retry_after: int = 1) -> dict[str, str]:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= retry_after
    assert not any(marker in response.text for marker in TRACE_MARKERS), response.text
    body: dict[str, str] = response.json()
    return body


def test_a_call_the_breaker_refuses_is_a_503_with_the_breakers_retry_after(
    client: tuple[TestClient, Brownout],
) -> None:
    test_client, brownout = client
    assert test_client.get("/sleep/0").status_code == 200
    brownout.database.breaker.force_open()
    body = assert_clean_503(test_client.get("/sleep/0"), retry_after=2)
    assert body == {"detail": "database unavailable: circuit breaker open"}


def test_a_spent_deadline_is_a_503(client: tuple[TestClient, Brownout]) -> None:
    test_client, _ = client
    assert assert_clean_503(test_client.get("/sleep/2")) == {"detail": "database unavailable: deadline exceeded"}


def test_a_lost_connection_outside_the_retry_layer_is_a_503(client: tuple[TestClient, Brownout]) -> None:
    test_client, _ = client
    assert assert_clean_503(test_client.get("/own-connection-dies")) == {"detail": "database unavailable: retry later"}


def test_an_unknown_commit_outcome_says_to_retry_with_the_same_key(client: tuple[TestClient, Brownout]) -> None:
    test_client, _ = client
    body = assert_clean_503(test_client.get("/commit-unknown"))
    assert "same Idempotency-Key" in body["detail"]


def test_bad_sql_stays_a_500_without_detail(client: tuple[TestClient, Brownout]) -> None:
    test_client, _ = client
    response = test_client.get("/bad-sql")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
