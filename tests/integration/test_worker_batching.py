"""Batched deliveries on a real queue and database: one write's fate stays its own, acks follow commits.

- The apply actor given one batch holding a write the database refuses (a
  constraint), a reused key and a write whose prerequisite is not applied
  yet: the others commit, the first two are dead-lettered with their reasons,
  the third is deferred and applies once its prerequisite arrives.
- The consumer (src/brownout/_worker/batched_delivery.py) on a real queue: deliveries come
  out as batches of at most `max_batch`; a batch's ack never covers an older
  batch still in flight (RabbitMQ takes the unsettled one back when the channel
  closes); a body Dramatiq cannot decode goes to ``Q.XQ``.
- A real Worker drains a backlog in batches and leaves nothing unacknowledged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from dramatiq.common import dq_name, xq_name
from pydantic import BaseModel, field_validator
from sqlalchemy import func, select, text

from app.dispatch.notifications import CREATE, MARK_READ, build_registry
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch.commands import Command
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.publisher import Publisher
from brownout._dispatch.queues import BrownoutRabbitmqBroker
from brownout._schema import applied_commands, command_conflicts, dead_letters
from brownout._worker import batched_delivery
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from brownout._worker.batched_delivery import BatchedDelivery, DeliveryBatch
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import admin_connection, ready_count, take_all
from tests.support.worker_rig import WorkerRig

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
def rig(make_worker_rig: Callable[..., WorkerRig]) -> WorkerRig:
    return make_worker_rig()


@pytest.fixture
def broker(rig: WorkerRig) -> BrownoutRabbitmqBroker:
    return rig.broker


@pytest.fixture
def runtime(make_database: Callable[..., Database]) -> ApplyRuntime:
    return ApplyRuntime(database=make_database(), registry=build_registry(), defer_base_seconds=0.05, defer_cap_seconds=0.2)


@pytest.fixture
def publisher(make_publisher: Callable[..., Publisher]) -> Publisher:
    return make_publisher()


@pytest.fixture
def dispatcher(db: Database, publisher: Publisher, queue_name: str) -> Dispatcher:
    return Dispatcher(database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=2.0)


@pytest.fixture
def run_worker(rig: WorkerRig, queue_name: str) -> Callable[[], None]:
    def start() -> None:
        rig.start({queue_name}, threads=THREADS)

    return start


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_poison_a_conflict_and_a_waiting_write_do_not_hold_back_their_batch(
    db: Database,
    publisher: Publisher,
    dispatcher: Dispatcher,
    broker: BrownoutRabbitmqBroker,
    runtime: ApplyRuntime,
    queue_name: str,
    run_worker: Callable[[], None],
) -> None:
    first = dispatcher.submit(CREATE, NOTE, idempotency_key="reused")  # applied now, directly
    later = dispatcher.accept(CREATE, NOTE, idempotency_key="later")
    good: list[Envelope] = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(5)]
    poison = dispatcher.accept(CREATE, NOTE | {"subject": "poison"})
    conflict = dispatcher.accept(CREATE, NOTE | {"subject": "another body"}, idempotency_key="reused")
    waiting = dispatcher.accept(MARK_READ, {"notification_id": str(later.entity_id)})
    outcomes: list[str] = []
    runtime.observe = lambda outcome, seconds: outcomes.append(outcome)
    actor = declare_apply_actor(broker, runtime, queue_name=queue_name)

    actor.fn([envelope.to_message(queue_name) for envelope in (*good, poison, conflict, waiting)])  # one batch

    assert sorted(outcomes) == sorted(["applied"] * 5 + ["dead_lettered"] * 2 + ["deferred"])
    with db.session() as s:
        reasons = {row.message["message_id"]: row.reason for row in s.execute(select(dead_letters))}
        subjects = set(s.execute(select(notifications.c.subject)).scalars())
    assert reasons.keys() == {str(poison.command_id), str(conflict.command_id)}
    assert "permanent database error" in reasons[str(poison.command_id)]
    assert "idempotency key already used" in reasons[str(conflict.command_id)]
    assert count(db, command_conflicts) == 1
    assert subjects == {NOTE["subject"], *(f"good {n}" for n in range(5))}, f"{first} and the good ones"
    assert ready_count(dq_name(queue_name)) == 1, "the waiting write is deferred through the delay queue"

    run_worker()  # moves the deferred write back when due (deferred again until its prerequisite is there)
    publisher.publish(later.to_message(queue_name))  # the prerequisite arrives: the deferred write applies
    assert wait_until(lambda: count(db, applied_commands) == 8, timeout=30)
    with db.session() as s:
        assert s.execute(select(notifications.c.read).where(notifications.c.id == later.entity_id)).scalar_one() is True
    assert count(db, dead_letters) == 2 and ready_count(xq_name(queue_name)) == 0


def test_a_write_holding_nul_is_kept_as_a_dead_letter_and_its_batch_goes_on(
    db: Database, dispatcher: Dispatcher, broker: BrownoutRabbitmqBroker, runtime: ApplyRuntime, queue_name: str
) -> None:
    """Queued before validation refused NUL (or published by hand): PostgreSQL refuses it in a row and in JSONB."""
    good = dispatcher.accept(CREATE, NOTE)
    bad = good.to_message(queue_name).asdict()
    bad["message_id"] = str(dispatcher.accept(CREATE, NOTE, idempotency_key="nul").command_id)
    bad["args"][0]["payload"] = NOTE | {"body": "a\x00b"}
    actor = declare_apply_actor(broker, runtime, queue_name=queue_name)

    actor.fn([good.to_message(queue_name), dramatiq.Message(**bad)])

    assert count(db, applied_commands) == 1
    with db.session() as s:
        (row,) = s.execute(select(dead_letters)).all()
    assert row.message_id == bad["message_id"] and "NUL" in row.reason
    assert row.message["args"][0]["payload"]["body"] == "a\\u0000b", "kept, with the NUL written out"


def test_a_write_whose_dead_letter_postgresql_refuses_is_kept_as_text_and_its_batch_goes_on(
    db: Database,
    publisher: Publisher,
    dispatcher: Dispatcher,
    broker: BrownoutRabbitmqBroker,
    runtime: ApplyRuntime,
    queue_name: str,
    run_worker: Callable[[], None],
) -> None:
    """A lone surrogate (published by hand): the driver cannot send it in a row, and JSONB refuses it (it used
    to go to Q.XQ, a queue with a 7-day expiry no command lists). Kept as a text-only dead letter instead."""
    good = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(6)]
    bad = good[0].to_message(queue_name).asdict()
    bad["message_id"] = str(dispatcher.accept(CREATE, NOTE, idempotency_key="surrogate").command_id)
    bad["args"][0]["payload"] = NOTE | {"body": "a\ud800b"}
    outcomes: list[str] = []
    runtime.observe = lambda outcome, seconds: outcomes.append(outcome)
    declare_apply_actor(broker, runtime, queue_name=queue_name)
    messages = [g.to_message(queue_name) for g in good]
    for message in (*messages[:3], dramatiq.Message(**bad), *messages[3:]):
        publisher.publish(message)

    run_worker()
    assert wait_until(lambda: count(db, dead_letters) == 1, timeout=30)
    assert wait_until(lambda: ready_count(queue_name) == 0 and count(db, applied_commands) == 6, timeout=10)
    assert ready_count(xq_name(queue_name)) == 0
    with db.session() as s:
        (row,) = s.execute(select(dead_letters)).mappings().all()
    assert row["message_id"] == bad["message_id"]
    assert "kept as text" in row["reason"], row["reason"]
    kept = json.loads(row["message"]["text"])
    assert kept["message_id"] == bad["message_id"] and kept["args"][0]["payload"]["body"] == "a\ud800b"
    assert sorted(outcomes) == sorted(["applied"] * 6 + ["dead_lettered"])


def test_a_backlog_is_drained_in_batches_and_nothing_is_left_unacknowledged(
    db: Database,
    publisher: Publisher,
    dispatcher: Dispatcher,
    broker: BrownoutRabbitmqBroker,
    runtime: ApplyRuntime,
    queue_name: str,
    run_worker: Callable[[], None],
    rig: WorkerRig,
) -> None:
    for n in range(300):
        publisher.publish(dispatcher.accept(CREATE, NOTE | {"subject": f"n{n}"}).to_message(queue_name))
    sizes: list[int] = []
    runtime.on_batch = sizes.append
    runtime.batch_max = 32
    declare_apply_actor(broker, runtime, queue_name=queue_name)
    run_worker()
    assert wait_until(lambda: count(db, applied_commands) == 300, timeout=30)
    assert sum(sizes) == 300 and max(sizes) <= 32, sizes
    assert len(sizes) < 300 / 2, f"deliveries share batches: {sizes}"
    assert count(db, notifications) == 300
    rig.stop_workers()  # closing the channel would put back anything left unacknowledged
    assert ready_count(queue_name) == 0, "every delivery was acknowledged"


def _consumer(broker: BrownoutRabbitmqBroker, queue_name: str, *, max_batch: int) -> BatchedDelivery:
    broker.declare_queue(queue_name, ensure=True)
    return BatchedDelivery(
        broker, queue_name, actor_name="apply_command_batch", max_batch=max_batch, prefetch=100, timeout_ms=500
    )


def _publish_bodies(broker: BrownoutRabbitmqBroker, queue_name: str, bodies: list[bytes]) -> None:
    connection = admin_connection()
    try:
        channel = connection.channel()
        for body in bodies:
            channel.basic_publish("", queue_name, body)
    finally:
        connection.close()


def _delivered(consumer: BatchedDelivery, n: int) -> None:
    """Wait until *n* deliveries reached the consumer, so batches are cut by max_batch alone."""
    assert wait_until(lambda: consumer.connection.process_data_events(time_limit=0.05) or len(consumer._buffer) >= n, timeout=5)


def _next_batch(consumer: BatchedDelivery) -> DeliveryBatch:
    for _ in range(20):
        batch = next(consumer)
        if batch is not None:
            assert isinstance(batch, DeliveryBatch)
            return batch
    raise AssertionError("no batch came")


def _bodies(n: int, queue_name: str) -> list[bytes]:
    return [
        dramatiq.Message(queue_name=queue_name, actor_name="apply_command", args=(i,), kwargs={}, options={}).encode()
        for i in range(n)
    ]


def test_a_later_batch_acknowledged_first_does_not_acknowledge_an_earlier_one(
    broker: BrownoutRabbitmqBroker, queue_name: str
) -> None:
    consumer = _consumer(broker, queue_name, max_batch=3)
    _publish_bodies(broker, queue_name, _bodies(6, queue_name))
    _delivered(consumer, 6)
    earlier = _next_batch(consumer)
    later = _next_batch(consumer)
    assert [m.args[0] for m in earlier.messages] == [0, 1, 2] and [m.args[0] for m in later.messages] == [3, 4, 5]

    consumer.ack(later)  # the later batch committed first; the earlier one is still in flight
    consumer.connection.process_data_events(time_limit=0.2)  # this test is the consumer thread: run the ack
    consumer.close()  # the earlier batch was never acknowledged: RabbitMQ takes it back
    assert sorted(json.loads(body)["args"][0] for _, body in take_all(queue_name)) == [0, 1, 2]


def test_a_batch_acknowledged_in_order_settles_everything_up_to_it(broker: BrownoutRabbitmqBroker, queue_name: str) -> None:
    consumer = _consumer(broker, queue_name, max_batch=3)
    _publish_bodies(broker, queue_name, _bodies(6, queue_name))
    _delivered(consumer, 6)
    earlier = _next_batch(consumer)
    later = _next_batch(consumer)
    consumer.ack(earlier)
    consumer.ack(later)
    consumer.connection.process_data_events(time_limit=0.2)
    consumer.close()
    assert take_all(queue_name) == []


def test_an_undecodable_body_goes_to_the_dead_letter_queue_and_a_held_batch_comes_back(
    broker: BrownoutRabbitmqBroker, queue_name: str
) -> None:
    consumer = _consumer(broker, queue_name, max_batch=10)
    _publish_bodies(broker, queue_name, [b"not json", *_bodies(2, queue_name)])
    _delivered(consumer, 3)
    batch = _next_batch(consumer)
    assert [m.args[0] for m in batch.messages] == [0, 1]
    consumer.known_tags.discard(batch._tag)  # as the health gate holds a batch
    consumer.nack(batch)  # Dramatiq's nack of a failed message: withdrawn, so nothing is sent
    consumer.connection.process_data_events(time_limit=0.2)
    consumer.close()
    assert [body for _, body in take_all(xq_name(queue_name))] == [b"not json"]
    assert len(take_all(queue_name)) == 2, "the held batch is back in its queue"


class _Anything(BaseModel):
    n: int


def _explode(session: Any, envelope: Envelope, payload: BaseModel) -> Any:
    raise RuntimeError("a bug in this command's apply")


def test_an_unexpected_error_in_one_writes_apply_dead_letters_that_write_alone(
    db: Database, publisher: Publisher, broker: BrownoutRabbitmqBroker, runtime: ApplyRuntime, queue_name: str
) -> None:
    """Not a database error: a bug in one command. That write is kept as a dead letter saying so (it was
    labelled a "permanent database error"), the writes beside it apply, nothing reaches Q.XQ."""
    registry = build_registry()
    registry.register(Command(name="test_explode", versions={1: _Anything}, scope=lambda payload: "test",
                              entity=lambda payload, derived: derived, apply=_explode))  # fmt: skip
    runtime.registry = registry
    dispatcher = Dispatcher(database=db, publisher=publisher, registry=registry, queue_name=queue_name, request_deadline=2.0)
    good = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(3)]
    broken = dispatcher.accept("test_explode", {"n": 1})
    outcomes: list[str] = []
    runtime.observe = lambda outcome, seconds: outcomes.append(outcome)
    actor = declare_apply_actor(broker, runtime, queue_name=queue_name)

    actor.fn([envelope.to_message(queue_name) for envelope in (good[0], broken, *good[1:])])  # one batch

    assert sorted(outcomes) == sorted(["applied"] * 3 + ["dead_lettered"])
    with db.session() as s:
        (row,) = s.execute(select(dead_letters)).mappings().all()
    assert row["message_id"] == str(broken.command_id)
    assert row["reason"].startswith("error while applying it: RuntimeError: a bug in this command's apply")
    assert count(db, applied_commands) == 3


class _Fussy(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _lookup(cls, n: int) -> int:
        return {1: 1}[n]  # a KeyError for any other n: pydantic lets it through, not a ValidationError


def test_an_unexpected_error_reading_one_write_dead_letters_that_write_alone(
    db: Database, publisher: Publisher, broker: BrownoutRabbitmqBroker, runtime: ApplyRuntime, queue_name: str
) -> None:
    """A payload model that raises something other than a validation error: the whole batch went to Q.XQ."""
    registry = build_registry()
    registry.register(Command(name="test_fussy", versions={1: _Fussy}, scope=lambda payload: "test",
                              entity=lambda payload, derived: derived, apply=_explode))  # fmt: skip
    runtime.registry = registry
    dispatcher = Dispatcher(database=db, publisher=publisher, registry=registry, queue_name=queue_name, request_deadline=2.0)
    good = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(3)]
    fussy = dispatcher.accept("test_fussy", {"n": 1}).model_copy(update={"payload": {"n": 2}})
    outcomes: list[str] = []
    runtime.observe = lambda outcome, seconds: outcomes.append(outcome)
    actor = declare_apply_actor(broker, runtime, queue_name=queue_name)

    actor.fn([envelope.to_message(queue_name) for envelope in (good[0], fussy, *good[1:])])  # one batch

    assert sorted(outcomes) == sorted(["applied"] * 3 + ["dead_lettered"])
    with db.session() as s:
        (row,) = s.execute(select(dead_letters)).mappings().all()
    assert row["message_id"] == str(fussy.command_id)
    assert row["reason"].startswith("error while reading it: KeyError"), row["reason"]
    assert count(db, applied_commands) == 3


def test_a_failed_batch_is_held_then_comes_back_one_delivery_per_batch(
    broker: BrownoutRabbitmqBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What escapes the actor (nothing to pin it on) no longer sends the batch to Q.XQ: it is held, and each
    of its deliveries comes back alone, so the one that fails again is the one to blame."""
    monkeypatch.setattr(batched_delivery, "HOLD_SECONDS", 0.2)
    consumer = _consumer(broker, queue_name, max_batch=10)
    _publish_bodies(broker, queue_name, _bodies(4, queue_name))
    _delivered(consumer, 4)
    failed = _next_batch(consumer)
    assert [m.args[0] for m in failed.messages] == [0, 1, 2, 3]
    consumer.nack(failed)  # Dramatiq's nack: the actor raised
    _delivered(consumer, 4)  # given back after the hold, delivered again
    again = [_next_batch(consumer) for _ in range(4)]
    assert [[m.args[0] for m in batch.messages] for batch in again] == [[0], [1], [2], [3]]
    for batch in again:
        consumer.ack(batch)
    consumer.connection.process_data_events(time_limit=0.2)
    consumer.close()
    assert take_all(queue_name) == [] and take_all(xq_name(queue_name)) == []


def test_an_invalid_payload_is_dead_lettered_naming_its_fields_not_their_values(
    db: Database, dispatcher: Dispatcher, broker: BrownoutRabbitmqBroker, runtime: ApplyRuntime, queue_name: str
) -> None:
    """pydantic's own text quotes the input it refuses (here a subject and a body) into the reason, which goes to the
    log and the dead_letters table."""
    envelope = dispatcher.accept(CREATE, NOTE)
    secret = {"user_id": 5, "subject": "Private subject", "body": "Private body"}  # no email: the whole input quoted
    broken = envelope.model_copy(update={"payload": secret})
    declare_apply_actor(broker, runtime, queue_name=queue_name).fn([broken.to_message(queue_name)])
    with db.session() as s:
        reason = s.execute(select(dead_letters.c.reason)).scalar_one()
    assert reason.startswith(f"invalid {CREATE} v1 payload: ValidationError"), reason
    assert "email" in reason and "Private" not in reason, reason
