"""The publisher against the machine's real RabbitMQ: confirmed, persistent, durable,
bounded, and consumable by a real Dramatiq worker declaring the same queues.

Each test owns its queue (``bo-test-<hex>``, with ``.DQ`` and ``.XQ``) and deletes it.
`BROWNOUT_TEST_RABBITMQ_URL` names the server; default: the local guest account.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pytest

from brownout._dispatch.publisher import Publisher, PublisherState, PublishRejected
from brownout._dispatch.queues import BrownoutRabbitmqBroker, queue_arguments, queue_declarations
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, admin_connection, take_all
from tests.support.tcp_proxy import FaultProxy


def message(queue_name: str, *args: Any, actor_name: str = "apply_write") -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options={})


def test_a_confirmed_message_is_persistent_in_a_durable_bounded_queue(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher(max_length=50)
    sent = message(queue_name, 42, "ada@example.com")

    publisher.publish(sent)

    [(properties, body)] = take_all(queue_name)
    assert properties.delivery_mode == 2
    received = dramatiq.Message.decode(body)
    assert (received.message_id, received.actor_name, received.args) == (sent.message_id, "apply_write", (42, "ada@example.com"))
    connection = admin_connection()
    try:
        channel = connection.channel()
        for declaration in queue_declarations(queue_name, max_length=50):  # Q, DQ, XQ: same args succeed
            channel.queue_declare(declaration.name, passive=True)
            channel.queue_declare(declaration.name, durable=True, arguments=declaration.arguments)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.queue_declare(queue_name, durable=True, arguments=queue_arguments(queue_name, max_length=51))
        assert refused.value.reply_code == 406  # PRECONDITION_FAILED: the queue has our arguments
    finally:
        connection.close()


def test_the_brownout_broker_declares_what_the_publisher_declares(queue_name: str) -> None:
    broker = BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=7)
    assert broker.confirm_delivery is True
    assert broker._build_queue_arguments(queue_name) == queue_arguments(queue_name, max_length=7)
    with pytest.raises(ValueError):
        BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=7, max_priority=5)


def test_a_dramatiq_worker_consumes_what_the_publisher_confirmed(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher(max_length=20)
    publisher.publish(message(queue_name, 1, "first", actor_name="record"))  # the publisher declared the queues first
    broker = BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=20)
    received: list[tuple[Any, ...]] = []
    done = threading.Event()

    def record(*args: Any) -> None:
        received.append(args)
        if len(received) == 2:
            done.set()

    dramatiq.actor(broker=broker, actor_name="record", queue_name=queue_name)(record)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        publisher.publish(message(queue_name, 2, "second", actor_name="record"))
        assert done.wait(20), f"the worker received {received}"
    finally:
        worker.stop(timeout=5000)
        broker.close()
    assert received == [(1, "first"), (2, "second")]


def test_the_dramatiq_consumer_decodes_the_message(make_publisher: Any, queue_name: str) -> None:
    broker = BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=20)
    consumer = broker.consume(queue_name, timeout=200)  # declares Q, DQ, XQ first this time
    try:
        publisher = make_publisher(max_length=20)
        sent = message(queue_name, {"user_id": 42}, actor_name="apply_write")
        publisher.publish(sent)
        deadline = time.monotonic() + 10
        proxy = None
        while proxy is None and time.monotonic() < deadline:
            proxy = next(consumer)
        assert proxy is not None
        assert (proxy.message_id, proxy.actor_name, proxy.args) == (sent.message_id, "apply_write", ({"user_id": 42},))
        consumer.ack(proxy)
    finally:
        consumer.close()
        broker.close()


def test_fifty_threads_publishing_at_once_all_get_confirms(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher()
    errors: list[BaseException] = []
    start = threading.Barrier(50)

    def send(i: int) -> None:
        start.wait()
        try:
            publisher.publish(message(queue_name, i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    bodies = [dramatiq.Message.decode(body).args[0] for _, body in take_all(queue_name)]
    assert sorted(bodies) == list(range(50))


def test_a_full_queue_rejects_fast_and_blocks_nobody(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher(max_length=3)
    for i in range(3):
        publisher.publish(message(queue_name, i))
    results: list[tuple[str, float]] = []

    def send_one() -> None:
        started = time.monotonic()
        try:
            publisher.publish(message(queue_name, "over"))
            results.append(("queued", time.monotonic() - started))
        except PublishRejected as rejected:
            results.append((rejected.reason, time.monotonic() - started))

    threads = [threading.Thread(target=send_one) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert not any(thread.is_alive() for thread in threads)
    assert [reason for reason, _ in results] == ["queue full"] * 5
    assert max(elapsed for _, elapsed in results) < 2.0
    assert len(take_all(queue_name)) == 3
    publisher.publish(message(queue_name, "room again"))  # drained: accepted again, same connection


def test_a_queue_full_for_seconds_answers_each_publish_once_and_confirms_none_twice(
    make_publisher: Any, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nacks make the publisher reopen its channel (at most once a second) while publishes keep coming:
    each is still answered, "queue full" or confirmed, and each confirmed one is in the queue once."""
    caplog.set_level(logging.DEBUG, logger="brownout._dispatch.publisher")
    publisher = make_publisher(max_length=3)
    confirmed: list[str] = []
    refused: list[str] = []
    stop_at = time.monotonic() + 3.5

    def keep_publishing(sender: int) -> None:
        number = 0
        while time.monotonic() < stop_at:
            body = f"{sender}-{number}"
            number += 1
            try:
                publisher.publish(message(queue_name, body))
                confirmed.append(body)
            except PublishRejected as rejected:
                refused.append(rejected.reason)
            time.sleep(0.02)

    threads = [threading.Thread(target=keep_publishing, args=(sender,)) for sender in range(3)]
    for thread in threads:
        thread.start()
    taken: list[str] = []
    connection = admin_connection()
    try:
        for _ in range(2):  # room for one more, twice, after a reopen
            time.sleep(1.5)
            method, _properties, body = connection.channel().basic_get(queue_name, auto_ack=True)
            assert method is not None
            taken.append(dramatiq.Message.decode(body).args[0])
    finally:
        connection.close()
    for thread in threads:
        thread.join(10)

    assert not any(thread.is_alive() for thread in threads)
    assert set(refused) == {"queue full"}
    assert any("reopening the channel" in record.getMessage() for record in caplog.records)
    assert sum("publisher connected" in record.getMessage() for record in caplog.records) == 1, "reopens log at DEBUG"
    remaining = [dramatiq.Message.decode(body).args[0] for _, body in take_all(queue_name)]
    assert len(remaining) == 3
    assert sorted(confirmed) == sorted(set(confirmed))
    assert sorted(confirmed) == sorted(remaining + taken)  # three, then one per room made
    assert publisher.state is PublisherState.READY


def test_a_deleted_queue_is_returned_as_unroutable_then_declared_again(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher()
    publisher.publish(message(queue_name, 1))
    connection = admin_connection()
    try:
        connection.channel().queue_delete(queue_name)
    finally:
        connection.close()

    with pytest.raises(PublishRejected) as rejected:
        publisher.publish(message(queue_name, 2))
    assert rejected.value.reason == "unroutable"

    publisher.publish(message(queue_name, 3))
    assert [dramatiq.Message.decode(body).args for _, body in take_all(queue_name)] == [(3,)]


def test_a_publisher_idle_past_its_heartbeat_keeps_its_connection(queue_name: str) -> None:
    """RabbitMQ drops a connection that misses two heartbeats (4 s here): the I/O loop
    must have sent them, so the same connection publishes after 6 s of silence."""
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5672) as proxy:
        url = RABBITMQ_URL.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
        with Publisher(url=url, queue_name=queue_name, max_length=100, heartbeat=2) as publisher:
            publisher.publish(message(queue_name, "before"))
            threading.Event().wait(6.0)  # the inherent wait: idle past the heartbeat interval
            publisher.publish(message(queue_name, "after"))
            assert proxy.connection_count == 1, "the publisher had to reconnect: heartbeats were not serviced"
    assert len(take_all(queue_name)) == 2


def test_close_is_prompt_and_later_publishes_are_rejected_as_closed(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher()
    publisher.publish(message(queue_name, 1))
    started = time.monotonic()
    publisher.close()
    assert time.monotonic() - started < 0.5
    assert publisher.state is PublisherState.CLOSED
    publisher.close()  # idempotent
    with pytest.raises(PublishRejected) as rejected:
        publisher.publish(message(queue_name, 2))
    assert rejected.value.reason == "closed"


def test_the_first_publish_waits_for_the_connection_being_made(make_publisher: Any, queue_name: str) -> None:
    publisher = make_publisher()
    publisher.publish(message(queue_name, "right after start()"))  # no sleep: waits on the attempt in flight
    assert wait_until(lambda: publisher.state is PublisherState.READY, timeout=1)


def test_a_message_for_another_queue_is_a_programming_error(make_publisher: Any, queue_name: str) -> None:
    with pytest.raises(ValueError):
        make_publisher().publish(message(queue_name + "-other", 1))


def test_a_queue_declared_with_other_arguments_is_refused_not_retried_hot(make_publisher: Any, queue_name: str) -> None:
    connection = admin_connection()
    try:
        connection.channel().queue_declare(queue_name, durable=True, arguments=queue_arguments(queue_name, max_length=5))
    finally:
        connection.close()
    publisher = make_publisher(max_length=10)

    with pytest.raises(PublishRejected) as rejected:
        publisher.publish(message(queue_name, 1))

    assert rejected.value.reason == "unreachable"
    assert "PRECONDITION_FAILED" in str(rejected.value)
    started = time.monotonic()  # a configuration error: the next attempt waits for the backoff
    with pytest.raises(PublishRejected):
        publisher.publish(message(queue_name, 2))
    assert time.monotonic() - started < 0.1
