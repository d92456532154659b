"""The HTTP write path while the database breaker is open, and read-your-writes.

A queued write is answered 202 with Location: /commands/{id}, is really in
RabbitMQ, and shows to this service's reads as pending (from Redis) until the
database row supersedes it or the pending entry expires. The queued messages
are applied for real: taken from the real queue and run through `apply_envelope`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pytest
import redis
from sqlalchemy import select

from app.api.applied_elsewhere import AppliedElsewhere
from app.dispatch.notifications import CREATE, build_registry
from app.schema import notifications
from brownout._db import Database
from brownout._dispatch.apply import apply_envelope
from brownout._dispatch.dead_letters import store
from brownout._dispatch.envelope import Envelope, caller_scope, command_id_for, entity_id_for
from brownout._schema import dead_letters
from brownout._settings import Settings
from tests.conftest import REDIS_URL
from tests.support.api_server import RunningApi, serve_in_thread
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count, take_all
from tests.support.tcp_proxy import FaultProxy

ADA = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}

Serve = Callable[..., RunningApi]


@pytest.fixture
def serve(api_settings: Callable[..., Settings]) -> Iterator[Serve]:
    """Start the API in a thread with these settings overrides; stopped at the end."""
    with ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(serve_in_thread(api_settings(**overrides)))


@pytest.fixture
def api(serve: Serve) -> RunningApi:
    return serve()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def db(make_database: Callable[..., Database]) -> Database:
    return make_database()


@pytest.fixture
def apply_queued(db: Database, queue_name: str, api_settings: Callable[..., Settings]) -> Iterator[Callable[[], list[str]]]:
    """Take every message from the real queue and apply it as the worker does (its after-apply
    hook included, see src/brownout/_worker/assembly.py); returns the outcomes."""
    tell_readers = AppliedElsewhere.from_settings(api_settings())
    assert tell_readers is not None

    def run() -> list[str]:
        outcomes = []
        for _properties, body in take_all(queue_name):
            envelope = Envelope.from_message(dramatiq.Message.decode(body))
            with db.session() as session:
                written = apply_envelope(session, build_registry(), envelope, path="queued")
            tell_readers(written.result, current=not written.duplicate)
            outcomes.append("duplicate" if written.duplicate else written.outcome)
        return outcomes

    yield run
    tell_readers.close()


def queue_create(api: RunningApi, payload: dict[str, Any] = ADA, key: str | None = None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    response = api.client.post("/notifications", json=payload, headers=headers)
    assert response.status_code == 202, response.text
    return dict(response.json())


def pending_key(prefix: str, kind: str, ident: str) -> str:
    return f"{prefix}pending:{kind}:{ident}"


def test_breaker_open_create_is_202_queued_in_rabbitmq(api: RunningApi, queue_name: str) -> None:
    api.brownout.database.breaker.force_open()
    response = api.client.post("/notifications", json=ADA)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and set(body) == {"id", "command_id", "status"}
    assert response.headers["location"] == f"/commands/{body['command_id']}"
    assert ready_count(queue_name) == 1

    status = api.client.get(f"/commands/{body['command_id']}")
    assert status.status_code == 200, status.text
    assert status.json()["status"] == "queued" and status.json()["entity_id"] == body["id"]


def test_queued_create_shows_as_pending_in_a_cached_list(api: RunningApi, redis_client: redis.Redis, redis_prefix: str) -> None:
    assert api.client.get("/users/42/notifications").json() == {"items": [], "next": None}  # cached while healthy
    api.brownout.database.breaker.force_open()
    before = datetime.now(UTC)
    queued = queue_create(api)
    after = datetime.now(UTC)
    assert redis_client.exists(pending_key(redis_prefix, "item", queued["id"]))

    listed = api.client.get("/users/42/notifications")
    assert listed.status_code == 200, listed.text
    [item] = listed.json()["items"]
    assert item["id"] == queued["id"] and item["status"] == "pending" and item["read"] is False
    assert before <= datetime.fromisoformat(item["created_at"]) <= after  # the acceptance time
    assert {name: item[name] for name in ADA} == ADA | {"user_id": "42"} and "read_stamp" not in item  # a string now


def test_queued_create_reads_back_by_id_while_the_breaker_is_open(api: RunningApi) -> None:
    api.brownout.database.breaker.force_open()
    queued = queue_create(api)
    fetched = api.client.get(f"/notifications/{queued['id']}")
    assert fetched.status_code == 200, fetched.text
    assert (fetched.json()["status"], fetched.json()["read"]) == ("pending", False)


def mark_read_while_open(api: RunningApi) -> str:
    """Create directly (201), open the breaker, mark read (202): shown read, pending."""
    created = api.client.post("/notifications", json=ADA)
    assert created.status_code == 201, created.text
    ident = str(created.json()["id"])
    api.brownout.database.breaker.force_open()
    marked = api.client.post(f"/notifications/{ident}/read")
    assert marked.status_code == 202, marked.text
    assert marked.json()["id"] == ident and marked.headers["location"] == f"/commands/{marked.json()['command_id']}"
    shown = api.client.get(f"/notifications/{ident}")
    assert shown.status_code == 200, shown.text
    assert (shown.json()["read"], shown.json()["status"]) == (True, "pending")
    return ident


def test_pending_mark_read_until_the_applied_row_supersedes_it(
    serve: Serve, apply_queued: Callable[[], list[str]], redis_client: redis.Redis, redis_prefix: str
) -> None:
    api = serve(cache_fresh_seconds=1)  # the item written through at creation stops being fresh quickly
    ident = mark_read_while_open(api)
    assert redis_client.exists(pending_key(redis_prefix, "mark", ident))

    api.brownout.database.breaker.reset()
    assert apply_queued() == ["applied"]
    assert api.client.get(f"/notifications/{ident}").json()["read"] is True  # never flips back meanwhile
    assert wait_until(lambda: api.client.get(f"/notifications/{ident}").json()["status"] == "applied", timeout=5)
    final = api.client.get(f"/notifications/{ident}").json()
    assert final["read"] is True
    assert not redis_client.exists(pending_key(redis_prefix, "mark", ident))


def test_applied_mark_is_not_shown_pending_after_the_apply(
    api: RunningApi, apply_queued: Callable[[], list[str]], redis_client: redis.Redis, redis_prefix: str
) -> None:
    ident = mark_read_while_open(api)
    api.brownout.database.breaker.reset()
    assert redis_client.exists(pending_key(redis_prefix, "mark", ident))
    assert apply_queued() == ["applied"]
    assert not redis_client.exists(pending_key(redis_prefix, "mark", ident))  # cleared by the worker
    after = api.client.get(f"/notifications/{ident}").json()
    assert (after["read"], after["status"]) == (True, "applied")


def queue_create_and_apply(
    api: RunningApi, apply_queued: Callable[[], list[str]], redis_client: redis.Redis, redis_prefix: str
) -> dict[str, Any]:
    """A creation queued with the breaker forced open (left open), then applied by the worker's steps,
    which clear its pending entry."""
    api.brownout.database.breaker.force_open()
    queued = queue_create(api)
    assert redis_client.exists(pending_key(redis_prefix, "item", queued["id"]))
    assert apply_queued() == ["applied"]
    assert not redis_client.exists(pending_key(redis_prefix, "item", queued["id"]))  # cleared by the worker
    return queued


def test_applied_create_supersedes_pending_item(
    api: RunningApi, apply_queued: Callable[[], list[str]], redis_client: redis.Redis, redis_prefix: str
) -> None:
    queued = queue_create_and_apply(api, apply_queued, redis_client, redis_prefix)
    api.brownout.database.breaker.reset()

    fetched = api.client.get(f"/notifications/{queued['id']}")
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["status"] == "applied" and fetched.json()["subject"] == ADA["subject"]
    status = api.client.get(f"/commands/{queued['command_id']}")
    assert status.status_code == 200, status.text
    assert (status.json()["status"], status.json()["path"]) == ("applied", "queued")


def test_an_item_the_worker_applied_is_cached_for_the_next_outage(
    api: RunningApi, apply_queued: Callable[[], list[str]], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The worker writes its row through: a read while the database is still (or again) down is answered."""
    queued = queue_create_and_apply(api, apply_queued, redis_client, redis_prefix)
    fetched = api.client.get(f"/notifications/{queued['id']}")  # the breaker is still open here
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["id"] == queued["id"] and fetched.json()["status"] == "applied"
    assert fetched.headers["cache-status"].startswith("Brownout; hit")


def test_a_duplicate_apply_does_not_write_its_older_result_through(
    api: RunningApi, api_settings: Callable[..., Settings], redis_client: redis.Redis, redis_prefix: str
) -> None:
    created = api.client.post("/notifications", json=ADA).json()
    assert api.client.post(f"/notifications/{created['id']}/read").json()["read"] is True
    item_key = f"{redis_prefix}cache:item:{created['id']}"
    redis_client.delete(item_key)  # evicted: nothing newer there to win the version compare
    tell_readers = AppliedElsewhere.from_settings(api_settings())
    assert tell_readers is not None
    try:
        first_result = created | {"read": False, "read_stamp": 1}  # what a duplicate of the creation returns
        tell_readers(first_result, current=False)
    finally:
        tell_readers.close()
    assert redis_client.get(item_key) is None  # invalidated, not overwritten with the older row
    assert api.client.get(f"/notifications/{created['id']}").json()["read"] is True


def test_pending_entries_expire(serve: Serve, redis_client: redis.Redis, redis_prefix: str) -> None:
    api = serve(pending_seconds=1)
    assert api.client.get("/users/42/notifications").json()["items"] == []  # cached while healthy
    api.brownout.database.breaker.force_open()
    queued = queue_create(api)
    assert [item["id"] for item in api.client.get("/users/42/notifications").json()["items"]] == [queued["id"]]
    assert api.client.get(f"/commands/{queued['command_id']}").json()["status"] == "queued"

    def gone() -> bool:  # each entry expires on its own, within milliseconds of the others
        listed = api.client.get("/users/42/notifications").json()["items"]
        return listed == [] and api.client.get(f"/commands/{queued['command_id']}").status_code == 503

    assert wait_until(gone, timeout=5)
    # Nothing left to answer from while the breaker is open: an honest 503, never a made-up 404.
    assert api.client.get(f"/notifications/{queued['id']}").status_code == 503
    assert list(redis_client.scan_iter(match=f"{redis_prefix}pending:*")) == []
    assert list(redis_client.scan_iter(match=f"{redis_prefix}command:*")) == []


def test_same_key_while_queued_gives_same_ids_and_other_body_is_422(
    api: RunningApi, apply_queued: Callable[[], list[str]], queue_name: str
) -> None:
    api.brownout.database.breaker.force_open()
    first = queue_create(api, key="queued-1")
    again = queue_create(api, key="queued-1")
    assert again == first
    assert first["id"] == str(entity_id_for(CREATE, caller_scope("user:42", "tests"), "queued-1"))  # the key's NAME in scope
    other = api.client.post("/notifications", json=ADA | {"subject": "Other"}, headers={"Idempotency-Key": "queued-1"})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    assert ready_count(queue_name) == 2  # the other body never reached the queue
    assert apply_queued() == ["applied", "duplicate"]


def test_rabbitmq_unreachable_is_503_and_nothing_pending(
    serve: Serve, redis_client: redis.Redis, redis_prefix: str, queue_name: str
) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5672) as proxy:
        api = serve(rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", publish_timeout_seconds=0.5)
        assert wait_until(lambda: api.brownout.dispatcher.publisher_state == "ready", timeout=10)
        assert api.client.get("/users/42/notifications").json()["items"] == []  # cached while healthy
        api.brownout.database.breaker.force_open()
        proxy.refuse()
        proxy.reset_existing()
        response = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "lost-1"})
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1 and "Idempotency-Key" in response.json()["detail"]
    command = command_id_for(CREATE, caller_scope("user:42", "tests"), "lost-1")
    assert api.client.get("/users/42/notifications").json()["items"] == []
    assert api.client.get(f"/commands/{command}").status_code == 503
    assert list(redis_client.scan_iter(match=f"{redis_prefix}pending:*")) == []
    assert not redis_client.exists(f"{redis_prefix}command:{command}")
    assert ready_count(queue_name) == 0


def test_direct_read_then_queued_unread_last_accepted_wins(
    api: RunningApi, apply_queued: Callable[[], list[str]], db: Database
) -> None:
    ident = api.client.post("/notifications", json=ADA).json()["id"]
    read = api.client.post(f"/notifications/{ident}/read")
    assert read.status_code == 200 and read.json()["read"] is True
    api.brownout.database.breaker.force_open()
    assert api.client.post(f"/notifications/{ident}/unread").status_code == 202
    assert api.client.get(f"/notifications/{ident}").json()["read"] is False

    assert apply_queued() == ["applied"]
    api.brownout.database.breaker.reset()
    with db.session() as session:
        row = session.execute(select(notifications.c.read).where(notifications.c.id == ident)).scalar_one()
    assert row is False
    assert api.client.get(f"/notifications/{ident}").json()["read"] is False


def test_a_failed_write_tells_its_caller_why_in_brownouts_words_not_the_drivers(api: RunningApi, db: Database) -> None:
    api.brownout.database.breaker.force_open()
    queued = queue_create(api, key="to-fail")
    api.brownout.database.breaker.reset()
    message = dramatiq.Message(
        queue_name="q", actor_name="apply", args=(), kwargs={}, options={}, message_id=queued["command_id"]
    )
    driver = (
        'CheckViolation: new row for relation "notifications" violates check constraint "c" at db.internal:5432'
        "\nDETAIL:  Failing row contains (1, ada@example.com, Welcome)."
    )
    with db.session() as session:
        store(session, message, f"permanent database error: {driver}")
    status = api.client.get(f"/commands/{queued['command_id']}").json()
    assert status["status"] == "failed" and status["reason"] == "permanent database error", status
    with db.session() as session:  # the operator keeps the whole story
        assert driver in session.execute(select(dead_letters.c.reason)).scalar_one()
