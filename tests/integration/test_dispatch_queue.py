"""The dispatcher's queued path against the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, build_registry
from app.schema import notifications, upgrade_database
from brownout._cache.redis_link import build_redis_link
from brownout._db import Database
from brownout._dispatch.apply import KeyConflict
from brownout._dispatch.dispatcher import Applied, Dispatcher, Queued, Rejected
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.key_claims import KeyClaims
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands, command_conflicts
from brownout._settings import Settings
from brownout.fastapi import Brownout
from tests.conftest import database_url
from tests.support.rabbit import apply_backlog, take_all
from tests.support.tcp_proxy import FaultProxy

NOTE = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


def dispatcher_for(db: Database, publisher: Publisher, queue_name: str) -> Dispatcher:
    return Dispatcher(database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=0.3)


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def test_breaker_open_queues_within_milliseconds_persistently(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    dispatcher = dispatcher_for(db, make_publisher(), queue_name)
    dispatcher.submit(CREATE, NOTE)  # warm the publisher's connection
    db.breaker.force_open()
    take_all(queue_name)
    start = time.monotonic()
    outcome = dispatcher.submit(CREATE, NOTE, idempotency_key="k")
    elapsed = time.monotonic() - start
    assert isinstance(outcome, Queued)
    assert elapsed < 0.5  # milliseconds in practice (bench/write_path.py); wide margin on a shared machine
    [(properties, body)] = take_all(queue_name)
    assert properties.delivery_mode == 2
    envelope = Envelope.from_message(dramatiq.Message.decode(body))
    assert (envelope.command_id, envelope.entity_id) == (outcome.command_id, outcome.id)


def test_same_key_while_down_and_healthy_takes_effect_once(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    dispatcher = dispatcher_for(db, make_publisher(), queue_name)
    db.breaker.force_open()
    first = dispatcher.submit(CREATE, NOTE, idempotency_key="same")
    second = dispatcher.submit(CREATE, NOTE, idempotency_key="same")
    other_body = dispatcher.submit(CREATE, NOTE | {"subject": "Changed"}, idempotency_key="same")
    assert isinstance(first, Queued) and isinstance(second, Queued) and isinstance(other_body, Queued)
    assert (first.id, first.command_id) == (second.id, second.command_id) == (other_body.id, other_body.command_id)
    db.breaker.reset()
    healthy = dispatcher.submit(CREATE, NOTE, idempotency_key="same")  # applied directly, before the backlog
    assert isinstance(healthy, Applied) and healthy.id == first.id and not healthy.duplicate

    assert apply_backlog(queue_name, db) == ["duplicate", "duplicate", "conflict"]
    assert count(db, notifications) == 1
    assert count(db, applied_commands) == 1
    assert count(db, command_conflicts) == 1


@pytest.mark.parametrize("fault", ["refuse", "silence"])
def test_rabbitmq_down_is_rejected_within_the_publish_deadline(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, fault: str
) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5672) as proxy:
        publisher = make_publisher(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
        dispatcher = dispatcher_for(db, publisher, queue_name)
        db.breaker.force_open()
        assert isinstance(dispatcher.submit(CREATE, NOTE), Queued)
        getattr(proxy, fault)()
        proxy.reset_existing()
        start = time.monotonic()
        outcome = dispatcher.submit(CREATE, NOTE, idempotency_key="k")
        elapsed = time.monotonic() - start
    assert isinstance(outcome, Rejected) and outcome.retry_after > 0
    assert elapsed < 3.0  # the publish deadline is 2 s


def test_full_queue_is_rejected_and_blocks_nothing(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    dispatcher = dispatcher_for(db, make_publisher(max_length=2), queue_name)
    db.breaker.force_open()
    assert [type(dispatcher.submit(CREATE, NOTE)).__name__ for _ in range(2)] == ["Queued", "Queued"]
    start = time.monotonic()
    outcome = dispatcher.submit(CREATE, NOTE)
    assert isinstance(outcome, Rejected) and outcome.reason == "queue full"
    assert time.monotonic() - start < 2.0


def test_with_redis_a_key_reused_with_another_body_is_refused_while_the_database_is_down(
    db: Database, api_settings: Callable[..., Settings], make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    """Without the claim the second body was queued too (202) and dead-lettered by the worker later."""
    link = build_redis_link(api_settings())
    assert link is not None
    dispatcher = Dispatcher(
        database=db,
        publisher=make_publisher(),
        registry=build_registry(),
        queue_name=queue_name,
        request_deadline=0.3,
        key_claims=KeyClaims(link, seconds=60),
    )
    try:
        db.breaker.force_open()
        first = dispatcher.submit(CREATE, NOTE, idempotency_key="claimed")
        again = dispatcher.submit(CREATE, NOTE, idempotency_key="claimed")
        with pytest.raises(KeyConflict):
            dispatcher.submit(CREATE, NOTE | {"subject": "Changed"}, idempotency_key="claimed")
        assert isinstance(first, Queued) and isinstance(again, Queued) and first.command_id == again.command_id
        assert len(take_all(queue_name)) == 2  # the same write twice (the worker applies it once); no third
    finally:
        db.breaker.reset()
        link.close()


def test_brownouts_dispatcher_claims_keys_in_redis(api_settings: Callable[..., Settings], queue_name: str) -> None:
    brownout = Brownout(api_settings(), registry=build_registry()).start()
    try:
        upgrade_database(brownout.settings.database_url)
        brownout.database.breaker.force_open()
        assert isinstance(brownout.dispatcher.submit(CREATE, NOTE, idempotency_key="k1"), Queued)
        with pytest.raises(KeyConflict):
            brownout.dispatcher.submit(CREATE, NOTE | {"body": "Other"}, idempotency_key="k1")
    finally:
        brownout.close()
