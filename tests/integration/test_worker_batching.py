"""The apply actor with group commit, in a real Worker: one write's fate stays its own.

A batch holding a write the database refuses (a constraint), a reused key and
a write whose prerequisite is not applied yet: the others commit, the first two
are dead-lettered with their reasons, the third is deferred and applies once
its prerequisite arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.common import xq_name
from dramatiq.middleware import CurrentMessage
from sqlalchemy import func, select, text

from app.db import Database
from app.dispatch.dispatcher import Dispatcher
from app.dispatch.envelope import APPLY_ACTOR, Envelope
from app.dispatch.notifications import CREATE, MARK_READ, build_registry
from app.dispatch.publisher import Publisher
from app.dispatch.queues import BrownoutRabbitmqBroker
from app.schema import applied_commands, command_conflicts, dead_letters, notifications, upgrade_database
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, ready_count
from worker.actors import ApplyRuntime, declare_apply_actor
from worker.drain import AdaptiveDrain

NOTE = {"user_id": 5, "email": "grace@example.com", "subject": "Grouped", "body": "together"}
THREADS = 8


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    database = make_database()
    with database.session() as s:
        s.execute(text("ALTER TABLE notifications ADD CONSTRAINT test_no_poison CHECK (subject <> 'poison')"))
        s.commit()
    return database


@pytest.fixture
def runtime(make_database: Callable[..., Database]) -> ApplyRuntime:
    return ApplyRuntime(database=make_database(), registry=build_registry(), defer_base_seconds=0.05, defer_cap_seconds=0.2)


@pytest.fixture
def run_worker(runtime: ApplyRuntime, queue_name: str) -> Iterator[Callable[[], list[int]]]:
    """A Worker whose drain starts at full concurrency, so the first messages share a batch."""
    broker = BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=1000)
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(AdaptiveDrain(min_concurrency=THREADS, max_concurrency=THREADS, actor_names={APPLY_ACTOR}))
    declare_apply_actor(broker, runtime, queue_name=queue_name)
    assert runtime.group is not None and runtime.group.capacity is not None, "sized by the drain's limit"
    runtime.group.linger_seconds = 0.5  # plenty for the 8 messages to reach the batch
    sizes: list[int] = []
    runtime.group.on_batch = sizes.append
    workers: list[dramatiq.Worker] = []

    def start() -> list[int]:
        worker = dramatiq.Worker(broker, queues={queue_name}, worker_threads=THREADS, worker_timeout=100)
        worker.start()
        workers.append(worker)
        return sizes

    yield start
    for worker in workers:
        worker.stop(timeout=10_000)
    broker.close()


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_poison_a_conflict_and_a_waiting_write_do_not_hold_back_their_batch(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, run_worker: Callable[[], list[int]]
) -> None:
    publisher = make_publisher()
    dispatcher = Dispatcher(
        database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=2.0
    )
    first = dispatcher.submit(CREATE, NOTE, idempotency_key="reused")  # applied now, directly
    later = dispatcher.accept(CREATE, NOTE, idempotency_key="later")
    batch: list[Envelope] = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(5)]
    poison = dispatcher.accept(CREATE, NOTE | {"subject": "poison"})
    conflict = dispatcher.accept(CREATE, NOTE | {"subject": "another body"}, idempotency_key="reused")
    waiting = dispatcher.accept(MARK_READ, {"notification_id": str(later.entity_id)})
    for envelope in (*batch, poison, conflict, waiting):
        publisher.publish(envelope.to_message(queue_name))

    sizes = run_worker()
    assert wait_until(lambda: count(db, dead_letters) == 2 and count(db, applied_commands) == 6, timeout=30)
    assert sizes and sizes[0] == 8, f"the eight messages shared the first batch: {sizes}"
    with db.session() as s:
        reasons = {row.message["message_id"]: row.reason for row in s.execute(select(dead_letters))}
        subjects = set(s.execute(select(notifications.c.subject)).scalars())
    assert reasons.keys() == {str(poison.command_id), str(conflict.command_id)}
    assert "permanent database error" in reasons[str(poison.command_id)]
    assert "idempotency key already used" in reasons[str(conflict.command_id)]
    assert count(db, command_conflicts) == 1
    assert subjects == {NOTE["subject"], *(f"good {n}" for n in range(5))}, f"{first} and the good ones"

    publisher.publish(later.to_message(queue_name))  # the prerequisite arrives: the deferred write applies
    assert wait_until(lambda: count(db, applied_commands) == 8, timeout=30)
    with db.session() as s:
        assert s.execute(select(notifications.c.read).where(notifications.c.id == later.entity_id)).scalar_one() is True
    assert count(db, dead_letters) == 2 and ready_count(xq_name(queue_name)) == 0


def test_batch_max_one_is_the_single_write_path(db: Database) -> None:
    runtime = ApplyRuntime(database=db, registry=build_registry(), batch_max=1)
    assert runtime.group is None
    dispatcher = Dispatcher(database=db, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=2.0)
    envelope = dispatcher.accept(CREATE, NOTE)
    assert runtime.write(envelope).duplicate is False
    assert runtime.write(envelope).duplicate is True
    assert count(db, notifications) == count(db, applied_commands) == 1
