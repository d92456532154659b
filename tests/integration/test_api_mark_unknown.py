"""A mark (read/unread) of a notification nobody created: 404 at once while the database and Redis can tell.

Queued, such a mark would wait its whole dependency wait in the worker before being recorded `dropped`,
and a flood of them would fill the command queue that real writes need during an outage. The 404 is
answered only when the database says the row is not there and Redis says no creation of it (nor this
very mark) is queued; whenever either cannot tell, the mark is queued as before (202).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from sqlalchemy import func, select

from brownout._db import Database
from brownout._schema import applied_commands
from brownout._settings import Settings
from tests.support.api_server import RunningApi, serve_in_thread
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count
from tests.support.tcp_proxy import FaultProxy

ADA = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}

Serve = Callable[..., RunningApi]


@pytest.fixture
def serve(api_settings: Callable[..., Settings]) -> Iterator[Serve]:
    with ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(serve_in_thread(api_settings(**overrides)))


@pytest.fixture
def api(serve: Serve) -> RunningApi:
    """Served, its publisher connected: the queue is declared by then, so an empty one can be counted."""
    running = serve()
    assert wait_until(lambda: running.brownout.dispatcher.publisher_state == "ready", timeout=10)
    return running


@pytest.fixture
def db(make_database: Callable[..., Database]) -> Database:
    return make_database()


def recorded(db: Database) -> int:
    with db.session() as session:
        return int(session.execute(select(func.count()).select_from(applied_commands)).scalar_one())


def mark(api: RunningApi, ident: str, route: str = "read", key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return api.client.post(f"/notifications/{ident}/{route}", headers=headers)


@pytest.mark.parametrize("route", ["read", "unread"])
def test_a_mark_of_an_unknown_notification_is_404_nothing_queued_nothing_recorded(
    api: RunningApi, db: Database, queue_name: str, route: str
) -> None:
    ident = str(uuid.uuid4())
    response = mark(api, ident, route)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/json"
    assert ident in response.json()["detail"] and "not found" in response.json()["detail"]
    assert ready_count(queue_name) == 0
    assert recorded(db) == 0

    again = mark(api, ident, route, key="k-unknown")  # with a key, and replayed: the same answer each time
    replayed = mark(api, ident, route, key="k-unknown")
    assert (again.status_code, replayed.status_code) == (404, 404)
    assert again.json() == replayed.json()
    assert ready_count(queue_name) == 0 and recorded(db) == 0


def test_a_mark_of_a_queued_creation_is_queued_not_404(api: RunningApi, db: Database, queue_name: str) -> None:
    api.brownout.database.breaker.force_open()
    created = api.client.post("/notifications", json=ADA)
    assert created.status_code == 202, created.text
    api.brownout.database.breaker.reset()  # the database answers again; the creation is still in the queue

    marked = mark(api, created.json()["id"])
    assert marked.status_code == 202, marked.text
    assert marked.json()["id"] == created.json()["id"] and marked.json()["status"] == "queued"
    assert ready_count(queue_name) == 2
    assert recorded(db) == 0


def test_a_mark_queued_before_and_replayed_with_its_key_is_queued_again(api: RunningApi, db: Database, queue_name: str) -> None:
    ident = str(uuid.uuid4())
    api.brownout.database.breaker.force_open()
    first = mark(api, ident, key="k-queued")
    assert first.status_code == 202, first.text
    api.brownout.database.breaker.reset()

    replayed = mark(api, ident, key="k-queued")  # the first answer was 202: the replay must not deny it
    assert replayed.status_code == 202, replayed.text
    assert replayed.json() == first.json()
    assert recorded(db) == 0


def test_a_mark_of_a_directly_created_notification_is_applied(api: RunningApi) -> None:
    created = api.client.post("/notifications", json=ADA)
    assert created.status_code == 201, created.text
    marked = mark(api, created.json()["id"])
    assert marked.status_code == 200, marked.text
    assert marked.json()["read"] is True


def test_with_redis_unavailable_a_mark_of_an_unknown_notification_is_queued(
    api_settings: Callable[..., Settings], db: Database, queue_name: str
) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=6379) as proxy:
        settings = api_settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0", override_poll_seconds=3600)
        with serve_in_thread(settings) as api:
            proxy.refuse()
            proxy.reset_existing()
            response = mark(api, str(uuid.uuid4()))
            assert response.status_code == 202, response.text  # Redis cannot say no creation of it is queued
            assert ready_count(queue_name) == 1
            assert recorded(db) == 0
