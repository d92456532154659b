"""No Dramatiq message's arguments reach a log line, however the message reaches the record: alone, as the
worker's batch, in a list, already formatted into the text, or as what an actor says it received (DEBUG, dev profile)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from brownout._observability.logs import configure_logging
from brownout._settings import Settings
from brownout._worker.batched_delivery import BatchedDelivery, DeliveryBatch
from brownout._worker.email import EmailRuntime, declare_email_actor

CUSTOMER = {"customer_id": 3, "email": "cy@x.io", "name": "Cynthia Oddname"}
PERSONAL = ("Cynthia", "Oddname", "cy@", "customer_id", "payload")


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """The process's logging as `configure_logging` sets it (dev profile: brownout.* at DEBUG), into a string."""
    factory = logging.getLogRecordFactory()
    root = logging.getLogger()
    handlers = root.handlers[:]
    levels = {name: logging.getLogger(name).level for name in ("", "brownout", "pika")}
    stream = io.StringIO()
    configure_logging(Settings(database_url="postgresql://u@localhost/db", log_profile="dev"), stream=stream)
    yield stream
    logging.setLogRecordFactory(factory)
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def assert_nothing_personal(text: str) -> None:
    for personal in PERSONAL:
        at = text.find(personal)
        assert at < 0, text[max(0, at - 300) : at + 100]


def write(number: int) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name="q",
        actor_name="apply_command",
        args=({"command": "create", "payload": CUSTOMER | {"n": number}},),
        kwargs={},
        options={},
    )


def test_a_message_failing_in_a_real_worker_is_named_by_actor_and_id(log_text: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.DEBUG)  # a library user's process at DEBUG: Dramatiq's lines and the actor's
    broker = StubBroker()
    broker.emit_after("process_boot")
    failed = threading.Event()

    def send_email(data: dict[str, Any]) -> None:
        failed.set()
        raise RuntimeError("the backend said no")

    actor = dramatiq.actor(send_email, broker=broker, actor_name="send_email", max_retries=0)
    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        sent = actor.send({"to": "cy@x.io", "subject": "Cynthia Oddname's results", "body": "Dear Cynthia Oddname"})
        broker.join(actor.queue_name, fail_fast=False)
    finally:
        worker.stop()
    text = log_text.getvalue()
    assert failed.is_set() and f"Failed to process message send_email(message {sent.message_id})" in text, text
    assert "Received args=*** kwargs=***." in text
    assert_nothing_personal(text)


def test_the_workers_batch_is_named_by_its_repr_whatever_logs_it(log_text: io.StringIO) -> None:
    batch = DeliveryBatch(queue_name="q", actor_name="apply_command_batch", messages=[write(1), write(2)], delivery_tags=[7, 8])
    consumer = BatchedDelivery.__new__(BatchedDelivery)  # no connection: `_post` logs before it would use one
    consumer.queue_name, consumer.known_tags, consumer._known_lock = "q", set(), threading.Lock()
    consumer.ack(batch)  # not a known batch: "not settling %r"
    dramatiq_log = logging.getLogger("dramatiq.worker.WorkerThread")
    dramatiq_log.info("Failed to process message %s with expected exception %s.", batch, "DatabaseUnavailable")
    dramatiq_log.debug("Received message %s with id %r.", batch, batch.message_id)
    logging.getLogger("brownout.test").warning("left: %s", [write(3), batch])
    logging.getLogger("brownout.test").warning("proxies: %r", (dramatiq.MessageProxy(write(4)),))
    logging.getLogger("brownout.test").warning(f"formatted already: {[write(5)]!r}")
    text = log_text.getvalue()
    assert f"not settling {batch!r} (ack)" in text and f"Failed to process message {batch!r} with expected" in text, text
    assert "apply_command(message " in text and "args=***" in text
    assert_nothing_personal(text)


def test_an_actor_says_what_it_received_in_dev_without_the_values(log_text: io.StringIO) -> None:
    class Backend:
        name = "smtp"

    runtime = EmailRuntime(database=None, backend=Backend(), sender="x@localhost")  # type: ignore[arg-type]
    actor = declare_email_actor(StubBroker(), runtime, queue_name="q")
    job = {
        "outbox_id": "0" * 32,
        "notification_id": "1" * 32,
        "to": "cy@x.io",
        "subject": "secret for Cynthia",
        "body": "Dear Oddname",
    }
    with pytest.raises(AttributeError):  # no database: the call ends right after saying what it received
        actor(job)
    text = log_text.getvalue()
    assert "DEBUG brownout._worker.email.send_email Received args=*** kwargs=***." in text, text
    assert_nothing_personal(text)
    assert "secret" not in text
