"""``BROWNOUT_QUEUE_TYPE=quorum`` against the machine's real RabbitMQ (3.10 or later).

Every declarer (the web's publisher, the worker's Dramatiq broker, the outbox relay's
and the dead-letter CLI's publishers) must declare ``Q``, ``Q.DQ`` and ``Q.XQ`` with
the same arguments, or RabbitMQ refuses the later declarations with
PRECONDITION_FAILED. Each test owns its queue set (the ``queue_name`` fixture deletes
it, quorum queues included). Queue types are read with ``rabbitmqctl``: a passive
declare does not tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pytest
from dramatiq.common import dq_name, xq_name
from dramatiq.errors import ConnectionClosed
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, build_registry
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch import dead_letters as dead_letter_store
from brownout._dispatch.dispatcher import Dispatcher, Queued
from brownout._dispatch.publisher import Publisher, PublisherState, PublishRejected, RejectReason
from brownout._dispatch.queues import BrownoutRabbitmqBroker, dead_letter_queue_arguments, queue_arguments, queue_declarations
from brownout._schema import applied_commands
from brownout._settings import Settings
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, admin_connection, queue_types, ready_count, take_all

NOTE = {"user_id": 9, "email": "lin@example.com", "subject": "Quorum", "body": "replicated"}
QUORUM: dict[str, Any] = {"queue_type": "quorum", "delivery_limit": 50}


def message(queue_name: str, *args: Any, actor_name: str = "apply_write") -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options={})


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def refusal_of(queue: str, arguments: dict[str, Any]) -> pika.exceptions.ChannelClosedByBroker:
    """Declare *queue* with *arguments* on a fresh channel; return RabbitMQ's refusal."""
    connection = admin_connection()
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().queue_declare(queue, durable=True, arguments=arguments)
        return refused.value
    finally:
        if connection.is_open:
            connection.close()


@pytest.fixture
def quorum_settings(make_settings: Callable[..., Settings], pg_database: str, queue_name: str) -> Settings:
    upgrade_database(database_url(pg_database))
    return make_settings(
        rabbitmq_url=RABBITMQ_URL,
        queue_name=queue_name,
        queue_max_length=100,
        queue_type="quorum",
        queue_delivery_limit=50,
    )


@pytest.fixture
def db(make_database: Callable[..., Database], quorum_settings: Settings) -> Database:
    return make_database()


@pytest.fixture
def worker_broker(quorum_settings: Settings, make_database: Callable[..., Database]) -> Iterator[BrownoutRabbitmqBroker]:
    """The production worker's broker (brownout._worker.assembly), built from quorum settings."""
    from brownout._worker.assembly import build_worker_broker

    broker = build_worker_broker(quorum_settings, make_database(), registry=build_registry())
    yield broker
    broker.close()


def test_the_publisher_declares_quorum_queues_and_publishes_with_confirms(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher(max_length=20, **QUORUM)
    sent = message(queue_name, 42)

    publisher.publish(sent)  # returns once RabbitMQ confirmed it (a quorum queue: once replicated)

    [(properties, body)] = take_all(queue_name)
    assert dramatiq.Message.decode(body).message_id == sent.message_id
    assert properties.delivery_mode == 2
    found = queue_types([queue_name, dq_name(queue_name), xq_name(queue_name)])
    assert {name: kind for name, (kind, _arguments) in found.items()} == {
        queue_name: "quorum",
        dq_name(queue_name): "quorum",
        xq_name(queue_name): "quorum",
    }
    expected = queue_arguments(queue_name, max_length=20, **QUORUM)
    assert found[queue_name][1] == expected
    assert found[dq_name(queue_name)][1] == expected
    assert found[xq_name(queue_name)][1] == dead_letter_queue_arguments(**QUORUM)
    for declaration in queue_declarations(queue_name, max_length=20, **QUORUM):
        connection = admin_connection()  # the same declarations again: accepted
        try:
            connection.channel().queue_declare(declaration.name, durable=True, arguments=declaration.arguments)
        finally:
            connection.close()


def test_the_worker_declares_the_same_quorum_queues_and_applies_what_the_web_queued(
    quorum_settings: Settings, db: Database, worker_broker: BrownoutRabbitmqBroker, queue_name: str
) -> None:
    dispatcher = Dispatcher.from_settings(
        quorum_settings, db, registry=build_registry()
    )  # the web's publisher, from the same settings
    try:
        db.breaker.force_open()
        queued = dispatcher.submit(CREATE, NOTE, idempotency_key="quorum-1")
        assert isinstance(queued, Queued)
    finally:
        dispatcher.close()
    db.breaker.reset()
    assert queue_types([queue_name])[queue_name][0] == "quorum"

    worker_broker.declare_queue(queue_name, ensure=True)  # Q, Q.DQ, Q.XQ again: a 406 would raise here
    worker = dramatiq.Worker(worker_broker, queues={queue_name}, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        assert wait_until(lambda: count(db, notifications) == 1 and count(db, applied_commands) == 1)
        assert wait_until(lambda: ready_count(queue_name) == 0)
    finally:
        worker.stop(timeout=10_000)
    assert ready_count(xq_name(queue_name)) == 0


def test_a_classic_declaration_of_a_quorum_queue_is_refused(make_publisher: Any, queue_name: str) -> None:
    make_publisher(max_length=20, **QUORUM).publish(message(queue_name, 1))  # the quorum queues exist

    refused = refusal_of(queue_name, queue_arguments(queue_name, max_length=20))
    assert refused.reply_code == 406 and "PRECONDITION_FAILED" in refused.reply_text
    # Another delivery limit is refused too: the setting cannot change under an existing queue.
    other_limit = queue_arguments(queue_name, max_length=20, queue_type="quorum", delivery_limit=51)
    assert refusal_of(queue_name, other_limit).reply_code == 406
    assert refusal_of(xq_name(queue_name), dead_letter_queue_arguments()).reply_code == 406

    # A worker left on classic cannot consume it ...
    classic_broker = BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=20)
    try:
        with pytest.raises(ConnectionClosed, match="PRECONDITION_FAILED"):
            classic_broker.declare_queue(queue_name, ensure=True)
    finally:
        classic_broker.close()
    # ... and a web process left on classic cannot publish to it (its connect attempt fails).
    classic = make_publisher(max_length=20)
    with pytest.raises(PublishRejected) as rejected:
        classic.publish(message(queue_name, 2))
    assert rejected.value.reason == RejectReason.UNREACHABLE
    assert "PRECONDITION_FAILED" in str(rejected.value)
    assert ready_count(queue_name) == 1  # only the quorum publisher's message


def test_a_quorum_declaration_of_a_classic_queue_is_refused(make_publisher: Any, queue_name: str) -> None:
    make_publisher(max_length=20).publish(message(queue_name, 1))  # classic, as before the switch

    refused = refusal_of(queue_name, queue_arguments(queue_name, max_length=20, **QUORUM))
    assert refused.reply_code == 406 and "x-queue-type" in refused.reply_text
    assert queue_types([queue_name])[queue_name][0] == "classic"  # unchanged: delete and recreate to switch


def test_a_full_quorum_queue_rejects_publishes_and_takes_them_again_once_drained(make_publisher: Any, queue_name: str) -> None:
    max_length = 3
    publisher = make_publisher(max_length=max_length, **QUORUM)
    accepted = 0
    with pytest.raises(PublishRejected) as rejected:
        for index in range(max_length + 10):
            publisher.publish(message(queue_name, index))
            accepted += 1

    assert rejected.value.reason == RejectReason.QUEUE_FULL  # a nack: the API answers 503
    # A quorum queue's reject-publish may overshoot the bound by the publishes in flight
    # (RabbitMQ's documentation); one at a time, by one at most.
    assert max_length <= accepted <= max_length + 1
    assert ready_count(queue_name) == accepted
    assert publisher.state is PublisherState.READY  # a full queue is not a broken connection

    assert len(take_all(queue_name)) == accepted
    assert wait_until(lambda: _publishes(publisher, queue_name), timeout=10)  # room again: accepted again


def _publishes(publisher: Publisher, queue_name: str) -> bool:
    try:
        publisher.publish(message(queue_name, "after"))
        return True
    except PublishRejected:
        return False


def test_a_message_past_its_delivery_limit_is_dead_lettered_at_least_once(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher(max_length=20, queue_type="quorum", delivery_limit=2)
    sent = message(queue_name, "poison")
    publisher.publish(sent)

    connection = admin_connection()
    try:
        channel = connection.channel()
        returns = 0
        while returns < 5:  # redelivered until the limit, then gone from Q
            method, _properties, _body = channel.basic_get(queue_name, auto_ack=False)
            if method is None:
                break
            channel.basic_nack(method.delivery_tag, requeue=True)
            returns += 1
        assert returns == 3  # the first delivery and two returns within the limit
        assert wait_until(lambda: ready_count(xq_name(queue_name)) == 1, timeout=10)
        method, properties, body = channel.basic_get(xq_name(queue_name), auto_ack=True)
        assert method is not None and dramatiq.Message.decode(body).message_id == sent.message_id
        assert properties.headers["x-first-death-reason"] == "delivery_limit"
    finally:
        connection.close()
    assert ready_count(queue_name) == 0


def test_the_dead_letter_replay_declares_quorum_queues_too(
    quorum_settings: Settings, db: Database, make_publisher: Any, queue_name: str
) -> None:
    import argparse

    from brownout import _dead_letters_cli as dead_letters_cli

    make_publisher(max_length=100, **QUORUM).publish(message(queue_name, "declares the quorum queues"))
    kept = message(queue_name, {"user_id": 1}, actor_name="apply_write")
    with db.session() as s:
        dead_letter_id = dead_letter_store.store(s, kept, "a reason")
    parser = argparse.ArgumentParser()
    dead_letters_cli.add_parser(parser.add_subparsers(dest="command"))

    assert dead_letters_cli.run(parser.parse_args(["dead-letters", "replay", str(dead_letter_id)]), quorum_settings, db) == 0

    ids = [dramatiq.Message.decode(body).message_id for _properties, body in take_all(queue_name)]
    assert kept.message_id in ids
