"""The operator's fleet-wide records reach the worker: while the breaker is forced "open", or while the
service is read-only, queued writes wait in RabbitMQ.

The production worker broker (brownout._worker.assembly) runs in-process on this test's queue, database and Redis
prefix; the operator's action is recorded as `POST /admin/breaker` and `POST /admin/mode` record it, by another
process's BreakerOverride or OverrideRecord. Nothing here is faked: the worker learns of them through Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import Middleware
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, build_registry
from app.schema import notifications
from brownout._cache.redis_link import build_redis_link
from brownout._db import BreakerState, CircuitBreaker, Database
from brownout._dispatch.dispatcher import Dispatcher, Queued
from brownout._fleet.breaker_override import Action, BreakerOverride
from brownout._fleet.override_record import OverrideRecord
from brownout._settings import Settings
from brownout._worker.assembly import build_worker_broker
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count


@pytest.fixture
def settings(api_settings: Callable[..., Settings]) -> Settings:
    return api_settings(override_poll_seconds=0.1, worker_gate_base_seconds=0.2, worker_gate_cap_seconds=1.0)


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    database = Database.from_settings(settings)
    yield database
    database.close()


def operator(settings: Settings, action: Action) -> None:
    """What `POST /admin/breaker` does in a web process: record the action for the fleet."""
    link = build_redis_link(settings)
    assert link is not None
    BreakerOverride(link, CircuitBreaker(), poll_seconds=60).apply(action)


def operator_mode(settings: Settings, mode: str) -> None:
    """What `POST /admin/mode` does in a web process: record the mode for the fleet."""
    link = build_redis_link(settings)
    assert link is not None
    OverrideRecord(link, "mode", field="mode", poll_seconds=60, follow=lambda record: None).record(mode)


def count(database: Database) -> int:
    with database.session() as session:
        return int(session.execute(select(func.count()).select_from(notifications)).scalar_one())


def enqueue(settings: Settings, database: Database, key: str) -> None:
    dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
    try:
        body: dict[str, Any] = {"user_id": 5, "email": "ada@example.com", "subject": key, "body": "b"}
        assert isinstance(dispatcher.enqueue(dispatcher.accept(CREATE, body, idempotency_key=key)), Queued)
    finally:
        dispatcher.close()


def stays(predicate: Callable[[], bool], seconds: float) -> bool:
    """*predicate* holds throughout *seconds* (several gate checks and override polls)."""
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if not predicate():
            return False
        time.sleep(0.05)
    return True


class SeenByTheActor(Middleware):
    """The breaker's forced state when each batch reaches the actor (the last middleware before it)."""

    seen: list[BreakerState | None] = []

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        SeenByTheActor.seen = []

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:
        SeenByTheActor.seen.append(self.breaker.forced)


class SlowBoot(Middleware):
    """An `after_worker_boot` hook that takes a while (starting a metrics server, say): Dramatiq's consumers
    already run by then, so whatever another middleware does in that hook comes after the first deliveries."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        time.sleep(1.0)


@pytest.fixture
def start_worker(settings: Settings, make_database: Callable[..., Database]) -> Iterator[Callable[..., Database]]:
    started: list[tuple[dramatiq.Worker, Any]] = []

    def start(worker_settings: Settings | None = None) -> Database:
        worker_database = make_database()  # this test's database: the worker's own pool and breaker
        broker = build_worker_broker(worker_settings or settings, worker_database, registry=build_registry())
        broker.add_middleware(SeenByTheActor(worker_database.breaker))
        broker.add_middleware(SlowBoot())  # "after" hooks run last-added first: this one before the override's
        worker = dramatiq.Worker(broker, queues={settings.queue_name}, worker_threads=2, worker_timeout=100)
        worker.start()
        started.append((worker, broker))
        return worker_database

    yield start
    for worker, broker in started:
        worker.stop(timeout=10_000)
        broker.close()


def test_a_standing_open_override_keeps_queued_writes_in_rabbitmq_until_lifted(
    settings: Settings, database: Database, start_worker: Callable[[], Database]
) -> None:
    operator(settings, "open")
    enqueue(settings, database, "while-open")
    worker_database = start_worker()
    assert wait_until(lambda: worker_database.breaker.forced is BreakerState.OPEN, timeout=5)
    assert stays(lambda: count(database) == 0, 1.5), "the worker applied a write while the operator held it open"
    # From the first delivery on: the standing override is applied before Dramatiq starts consuming (it was
    # applied after, and a delivery already in RabbitMQ could reach the actor first and be applied).
    assert SeenByTheActor.seen and set(SeenByTheActor.seen) == {BreakerState.OPEN}, SeenByTheActor.seen
    operator(settings, "reset")
    assert wait_until(lambda: count(database) == 1, timeout=10)


def test_an_open_override_during_the_run_stops_the_worker_and_close_resumes_it(
    settings: Settings, database: Database, start_worker: Callable[[], Database]
) -> None:
    worker_database = start_worker()
    enqueue(settings, database, "before")
    assert wait_until(lambda: count(database) == 1, timeout=10)
    operator(settings, "open")
    assert wait_until(lambda: worker_database.breaker.forced is BreakerState.OPEN, timeout=5)
    enqueue(settings, database, "during")
    assert stays(lambda: count(database) == 1, 1.5), "the worker applied a write while the operator held it open"
    lifted = time.monotonic()
    operator(settings, "close")
    assert wait_until(lambda: count(database) == 2, timeout=10)
    assert time.monotonic() - lifted < 5  # the gate checked at once, not after its backoff


def test_a_standing_read_only_mode_keeps_queued_writes_in_rabbitmq_until_read_write(
    settings: Settings, database: Database, start_worker: Callable[..., Database]
) -> None:
    operator_mode(settings, "read-only")
    enqueue(settings, database, "accepted-before-the-switch")  # a write that passed the check before the switch
    start_worker()
    assert stays(lambda: count(database) == 0, 1.5), "the worker applied a write while the service was read-only"
    assert wait_until(lambda: ready_count(settings.queue_name) == 1, timeout=10)  # back in RabbitMQ, not lost
    lifted = time.monotonic()
    operator_mode(settings, "read-write")
    assert wait_until(lambda: count(database) == 1, timeout=10)
    assert time.monotonic() - lifted < 5  # the gate checked at once, not after a backoff


def test_read_only_during_the_run_holds_the_drain_within_a_poll_and_read_write_resumes_it(
    settings: Settings, database: Database, start_worker: Callable[..., Database], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="brownout")
    start_worker()
    enqueue(settings, database, "before")
    assert wait_until(lambda: count(database) == 1, timeout=10)
    switched = time.monotonic()
    operator_mode(settings, "read-only")
    assert wait_until(lambda: any("read-only mode; pausing consumption" in line for line in caplog.messages), timeout=5)
    assert time.monotonic() - switched < 1.0  # poll interval 0.1 s: held within a few of them
    assert sum(line.startswith("read-only mode entered") for line in caplog.messages) == 1
    enqueue(settings, database, "during")
    assert stays(lambda: count(database) == 1, 1.5), "the worker applied a write while the service was read-only"
    assert wait_until(lambda: ready_count(settings.queue_name) == 1, timeout=10)
    lifted = time.monotonic()
    operator_mode(settings, "read-write")
    assert wait_until(lambda: count(database) == 2, timeout=10)
    assert time.monotonic() - lifted < 5
    assert sum(line.startswith("read-only mode left") for line in caplog.messages) == 1


def test_the_read_only_setting_holds_the_worker_whatever_the_fleet_says(
    settings: Settings, database: Database, start_worker: Callable[..., Database]
) -> None:
    enqueue(settings, database, "queued")
    operator_mode(settings, "read-write")
    start_worker(settings.model_copy(update={"read_only": True}))
    assert stays(lambda: count(database) == 0, 2.0), "BROWNOUT_READ_ONLY=true: the worker must apply nothing"
    assert wait_until(lambda: ready_count(settings.queue_name) == 1, timeout=10)
