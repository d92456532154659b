"""Every Dramatiq internal the worker relies on, checked against the installed Dramatiq.

The worker subclasses Dramatiq's RabbitMQ broker (src/brownout/_dispatch/queues.py), replaces its consumer for the
command queue (src/brownout/_worker/batched_delivery.py) and pauses the Worker's threads from a middleware
(src/brownout/_worker/health_gate.py, src/brownout/_worker/drain.py). None of that is public API, which is why pyproject.toml caps
Dramatiq below the next minor release. Raising that cap starts here: each assertion names what a new
release would have to keep, so a change fails this file loudly instead of a worker quietly mid-outage.

No broker connection is made: RabbitmqBroker connects lazily.
"""

from __future__ import annotations

import inspect
import queue
import threading
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name, xq_name
from dramatiq.worker import Worker, _ConsumerThread, _WorkerThread

from brownout._dispatch.queues import BrownoutRabbitmqBroker


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_installed_dramatiq_is_in_the_range_pyproject_allows() -> None:
    major, minor = (int(part) for part in dramatiq.__version__.split(".")[:2])
    assert (major, minor) == (2, 2), f"Dramatiq {dramatiq.__version__}: check this file's internals, then the cap"


def test_the_rabbitmq_broker_hooks_the_subclass_overrides() -> None:
    # BrownoutRabbitmqBroker.consume: the Worker's consumer thread calls it with these keywords.
    assert parameters(RabbitmqBroker.consume) == ["self", "queue_name", "prefetch", "timeout"]
    # _build_queue_arguments(queue_name) -> dict, used for Q and Q.DQ; _declare_xq_queue(queue_name) for Q.XQ.
    assert parameters(RabbitmqBroker._build_queue_arguments) == ["self", "queue_name"]
    assert parameters(RabbitmqBroker._declare_xq_queue) == ["self", "queue_name"]
    assert "ensure" in parameters(RabbitmqBroker.declare_queue)
    assert isinstance(inspect.getattr_static(RabbitmqBroker, "channel"), property)
    assert isinstance(DEAD_MESSAGE_TTL, int) and DEAD_MESSAGE_TTL > 0
    assert (dq_name("q"), xq_name("q")) == ("q.DQ", "q.XQ")


def test_the_broker_builds_the_arguments_every_declarer_shares_without_connecting() -> None:
    broker = BrownoutRabbitmqBroker(url="amqp://guest:guest@127.0.0.1:1/%2F", max_length=10)
    try:
        arguments = broker._build_queue_arguments("q")
        # Dramatiq's own dead-letter routing, which src/brownout/_dispatch/queues.queue_arguments repeats for the publisher.
        assert arguments["x-dead-letter-exchange"] == ""
        assert arguments["x-dead-letter-routing-key"] == "q.XQ"
        assert arguments["x-max-length"] == 10
        # BatchedDelivery opens its own pika connection with these.
        assert broker.parameters
    finally:
        broker.close()


def test_the_consumer_interface_the_batched_consumer_implements() -> None:
    for method in ("__next__", "ack", "nack", "requeue", "close"):
        assert callable(getattr(dramatiq.Consumer, method, None)), method
    assert parameters(dramatiq.MessageProxy.__init__) == ["self", "message"]
    assert callable(dramatiq.Message.decode)


def test_the_worker_attributes_the_health_gate_and_the_drain_drive() -> None:
    worker = Worker(StubBroker(), worker_threads=1)
    assert worker.consumers == {}
    assert worker.workers == []
    assert isinstance(worker.work_queue, queue.Queue)
    assert callable(worker.pause) and callable(worker.resume)


@pytest.mark.parametrize("thread_class", [_ConsumerThread, _WorkerThread])
def test_worker_threads_pause_and_say_so(thread_class: type[Any]) -> None:
    options: dict[str, Any] = {"broker": StubBroker(), "work_queue": queue.PriorityQueue(), "worker_timeout": 100}
    if thread_class is _ConsumerThread:
        options.update(queue_name="q", prefetch=1)
    else:
        options.update(consumers={})
    thread = thread_class(**options)
    assert isinstance(thread.paused_event, threading.Event)
    assert thread.paused is False
    assert callable(thread.pause) and callable(thread.resume)
    if thread_class is _ConsumerThread:
        assert thread.consumer is None  # the health gate reads the thread's current consumer
