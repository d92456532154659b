"""The worker's apply actor, run by a real Dramatiq Worker on a real queue and database."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from dramatiq.common import xq_name
from dramatiq.middleware import CurrentMessage
from pydantic import Field
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, MARK_READ, CreateNotificationV1, build_registry
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch.dispatcher import Dispatcher, Queued
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands, dead_letters
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from tests.conftest import database_url
from tests.support.cli import dead_letters_cli_run
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, ready_count
from tests.support.worker_rig import WorkerRig

NOTE = {"user_id": 9, "email": "lin@example.com", "subject": "Queued", "body": "later"}


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


@pytest.fixture
def runtime(db: Database, make_database: Callable[..., Database]) -> ApplyRuntime:
    """The worker's own Database (its own breaker), as in its own dyno."""
    return ApplyRuntime(database=make_database(), registry=build_registry(), defer_base_seconds=0.05, defer_cap_seconds=0.2)


@pytest.fixture
def run_worker(runtime: ApplyRuntime, queue_name: str, make_worker_rig: Callable[..., WorkerRig]) -> Callable[[], None]:
    rig = make_worker_rig()
    declare_apply_actor(rig.broker, runtime, queue_name=queue_name)

    def start() -> None:
        rig.start({queue_name}, threads=2)

    return start


def queued(db: Database, publisher: Publisher, queue_name: str) -> Dispatcher:
    dispatcher = Dispatcher(
        database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=0.3
    )
    db.breaker.force_open()
    return dispatcher


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def read_of(db: Database, notification_id: Any) -> bool | None:
    with db.session() as s:
        return s.execute(select(notifications.c.read).where(notifications.c.id == notification_id)).scalar_one_or_none()


def test_the_worker_applies_queued_writes(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, run_worker: Callable[[], None]
) -> None:
    dispatcher = queued(db, make_publisher(), queue_name)
    created = dispatcher.submit(CREATE, NOTE, idempotency_key="c")
    read = dispatcher.submit(MARK_READ, {"notification_id": str(created.id)}, idempotency_key="r")  # type: ignore[union-attr]
    assert isinstance(created, Queued) and isinstance(read, Queued)
    run_worker()
    assert wait_until(lambda: read_of(db, created.id) is True)
    assert count(db, applied_commands) == 2


def test_a_message_delivered_twice_applies_once(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, run_worker: Callable[[], None]
) -> None:
    publisher = make_publisher()
    envelope = queued(db, publisher, queue_name).accept(CREATE, NOTE, idempotency_key="twice")
    for _ in range(2):
        publisher.publish(envelope.to_message(queue_name))
    run_worker()
    assert wait_until(lambda: count(db, applied_commands) == 1 and ready_count(queue_name) == 0, timeout=20)
    assert count(db, notifications) == 1


def test_a_write_waits_for_the_one_it_needs(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, run_worker: Callable[[], None]
) -> None:
    publisher = make_publisher()
    dispatcher = queued(db, publisher, queue_name)
    creation = dispatcher.accept(CREATE, NOTE, idempotency_key="c")
    mark = dispatcher.accept(MARK_READ, {"notification_id": str(creation.entity_id)}, idempotency_key="r")
    publisher.publish(mark.to_message(queue_name))  # the mark-read arrives first
    run_worker()
    assert wait_until(lambda: count(db, notifications) == 0, timeout=2)
    publisher.publish(creation.to_message(queue_name))
    assert wait_until(lambda: read_of(db, creation.entity_id) is True)
    assert ready_count(xq_name(queue_name)) == 0, "waiting must not dead-letter"


def test_an_unknown_version_is_deferred_until_a_release_knows_it(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    runtime: ApplyRuntime,
    run_worker: Callable[[], None],
) -> None:
    publisher = make_publisher()
    newer: Envelope = queued(db, publisher, queue_name).accept(CREATE, NOTE).model_copy(update={"version": 2})
    publisher.publish(newer.to_message(queue_name))
    run_worker()
    assert not wait_until(lambda: count(db, notifications) > 0, timeout=1.5)
    assert ready_count(xq_name(queue_name)) == 0, "a version from the future must not be dead-lettered"
    # the deploy arrives: this worker now knows version 2
    command = runtime.registry.commands[CREATE]
    runtime.registry.commands[CREATE] = dataclasses.replace(command, versions={1: CreateNotificationV1, 2: CreateNotificationV1})
    assert wait_until(lambda: count(db, notifications) == 1)


def test_a_poison_write_is_kept_as_a_dead_letter_and_replayed_once_fixed(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    runtime: ApplyRuntime,
    run_worker: Callable[[], None],
    make_settings: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    publisher = make_publisher()
    dispatcher = queued(db, publisher, queue_name)
    before = dispatcher.accept(CREATE, NOTE, idempotency_key="before")
    poison = dispatcher.accept(CREATE, NOTE, idempotency_key="poison").model_copy(
        update={"payload": NOTE | {"subject": "x" * 500}}  # too long for v1: this release refuses it
    )
    after = dispatcher.accept(CREATE, NOTE, idempotency_key="after")
    for envelope in (before, poison, after):
        publisher.publish(envelope.to_message(queue_name))
    run_worker()
    assert wait_until(lambda: count(db, dead_letters) == 1 and count(db, notifications) == 2)
    assert ready_count(xq_name(queue_name)) == 0
    with db.session() as s:
        reason, message = s.execute(select(dead_letters.c.reason, dead_letters.c.message)).one()
    assert "subject" in reason and "invalid create_notification v1 payload" in reason
    assert message["message_id"] == str(poison.command_id)

    # the fix ships (v1 accepts longer subjects), then the operator replays it
    class LongerSubjects(CreateNotificationV1):
        subject: str = Field(min_length=1, max_length=1000)

    command = runtime.registry.commands[CREATE]
    runtime.registry.commands[CREATE] = dataclasses.replace(command, versions={1: LongerSubjects})
    settings = make_settings(rabbitmq_url=RABBITMQ_URL, queue_name=queue_name, queue_max_length=1000)
    with db.session() as s:
        dead_letter_id = s.execute(select(dead_letters.c.id)).scalar_one()
    assert dead_letters_cli_run(settings, db, ["dead-letters", "list"]) == 0
    assert f"#{dead_letter_id}" in capsys.readouterr().out
    assert dead_letters_cli_run(settings, db, ["dead-letters", "replay", str(dead_letter_id)]) == 0
    assert wait_until(lambda: count(db, notifications) == 3)
    with db.session() as s:
        assert s.execute(select(dead_letters.c.replayed_at)).scalar_one() is not None


def test_the_worker_broker_runs_only_the_middleware_it_uses(
    make_settings: Callable[..., Any], make_database: Callable[..., Database], queue_name: str
) -> None:
    """Every middleware's hooks run for every message: Dramatiq's defaults for options nobody sets are left out."""
    from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

    from brownout._worker.assembly import build_worker_broker
    from brownout._worker.drain import AdaptiveDrain
    from brownout._worker.health_gate import HealthGate

    settings = make_settings(rabbitmq_url=RABBITMQ_URL, queue_name=queue_name)
    broker = build_worker_broker(settings, make_database(), registry=build_registry())
    try:
        kinds = {type(middleware) for middleware in broker.middleware}
        assert {TimeLimit, Retries, CurrentMessage, HealthGate, AdaptiveDrain} <= kinds
        assert not kinds & {AgeLimit, Callbacks, Pipelines, ShutdownNotifications}
        assert broker.get_actor("apply_command_batch").options["throws"]  # Retries' options still accepted
    finally:
        broker.close()


def test_the_production_worker_tells_the_registry_s_after_apply_hook(
    make_settings: Callable[..., Any],
    make_database: Callable[..., Database],
    make_publisher: Callable[..., Publisher],
    db: Database,
    queue_name: str,
) -> None:
    """A service's read side hears of writes the worker applied through its registry's hook (the notification
    service's cache is told so); a service without one is told nothing and loses nothing."""
    import dramatiq

    from brownout._worker.assembly import build_worker_broker

    told: list[list[tuple[dict[str, Any], bool]]] = []
    registry = build_registry()
    registry.after_apply = lambda settings: told.append
    settings = make_settings(rabbitmq_url=RABBITMQ_URL, queue_name=queue_name, redis_url=None, queue_max_length=1000)
    broker = build_worker_broker(settings, make_database(), registry=registry)
    worker = dramatiq.Worker(broker, queues={queue_name}, worker_threads=1, worker_timeout=100)
    try:
        created = queued(db, make_publisher(), queue_name).submit(CREATE, NOTE, idempotency_key="told")
        assert isinstance(created, Queued)
        worker.start()
        assert wait_until(lambda: len(told) == 1, timeout=20)
        ((result, current),) = told[0]
        assert result["id"] == str(created.id) and current is True
    finally:
        worker.stop(timeout=10_000)
        broker.close()
