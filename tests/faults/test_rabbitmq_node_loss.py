"""A RabbitMQ node lost under a connected client: it goes on with the next node of RABBITMQ_URL's list.

The "node" is a TCP proxy in front of the machine's RabbitMQ (never touched itself); the other node of the
list is that RabbitMQ directly, or a second proxy. The proxy resets the client's connections and every new
one, as a node that died would; the publisher's next confirmed publish must reach RabbitMQ through the other
URL within its deadline, and the worker must go on consuming there after Dramatiq's consumer restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pika
import pytest

from brownout._dispatch.publisher import Publisher, PublisherState
from brownout._worker.batched_delivery import batched
from tests.integration.test_publisher import message
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, take_all
from tests.support.rabbit_nodes import InOrder, node_url
from tests.support.tcp_proxy import FaultProxy
from tests.support.worker_rig import WorkerRig

PUBLISH_DEADLINE = 2.0


def proxied_node() -> Iterator[FaultProxy]:
    parameters = pika.URLParameters(RABBITMQ_URL)
    with FaultProxy(upstream_host=parameters.host, upstream_port=parameters.port) as proxy:
        yield proxy


@pytest.fixture
def node() -> Iterator[FaultProxy]:
    yield from proxied_node()


@pytest.fixture
def other_node() -> Iterator[FaultProxy]:
    yield from proxied_node()


def bodies(queue_name: str) -> list[tuple[object, ...]]:
    return [tuple(dramatiq.Message.decode(body).args) for _, body in take_all(queue_name)]


@pytest.mark.parametrize("lost", ["reset", "refused"])
def test_a_publisher_whose_node_dies_publishes_through_the_other_within_the_deadline(
    lost: str, node: FaultProxy, make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    publisher = make_publisher(url=[node_url(node.port), RABBITMQ_URL], rng=InOrder(), confirm_timeout=PUBLISH_DEADLINE)
    publisher.publish(message(queue_name, "before"))
    assert node.open_connections == 1, "connected through the proxied node first"

    if lost == "reset":  # new connections: reset, or refused
        node.reset()
    else:
        node.refuse()
    node.reset_existing()  # the publisher's own: RST, as from a node that died
    started = time.monotonic()
    publisher.publish(message(queue_name, "after"), timeout=PUBLISH_DEADLINE)
    elapsed = time.monotonic() - started

    assert elapsed < PUBLISH_DEADLINE
    assert bodies(queue_name) == [("before",), ("after",)]
    assert publisher.state is PublisherState.READY
    assert node.open_connections == 0, "the publisher stays on the other node"


def test_a_publisher_back_on_a_surviving_node_stays_there_and_keeps_publishing(
    node: FaultProxy, make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    publisher = make_publisher(url=[node_url(node.port), RABBITMQ_URL], rng=InOrder(), confirm_timeout=PUBLISH_DEADLINE)
    publisher.publish(message(queue_name, 0))
    node.reset()
    node.reset_existing()
    assert wait_until(lambda: publisher.state is PublisherState.READY and node.open_connections == 0, timeout=5)
    accepted_before = node.connection_count

    for number in range(1, 20):
        publisher.publish(message(queue_name, number), timeout=PUBLISH_DEADLINE)

    assert bodies(queue_name) == [(number,) for number in range(20)]
    assert node.connection_count == accepted_before, "no further attempt on the dead node while the other serves"


def test_a_silent_node_costs_one_connect_deadline_then_the_next_node_serves(
    node: FaultProxy, make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    """A node that accepts and never answers: the attempt on it ends at the connect deadline (the publish
    waiting on it with it), and the next attempt goes to the other node."""
    from brownout._dispatch.publisher import PublishRejected

    node.silence()
    deadline = 1.0
    started = time.monotonic()
    publisher = make_publisher(url=[node_url(node.port), RABBITMQ_URL], rng=InOrder(), confirm_timeout=deadline)
    with pytest.raises(PublishRejected):
        publisher.publish(message(queue_name, "lost to the silent node"))
    assert time.monotonic() - started < deadline + 0.5

    assert wait_until(lambda: publisher.state is PublisherState.READY, timeout=3)
    ready_after = time.monotonic() - started
    publisher.publish(message(queue_name, "through the other"))

    assert deadline <= ready_after < deadline + 1.5  # the silent attempt, the backoff (at most 0.5 s), a connect
    assert bodies(queue_name) == [("through the other",)]
    assert node.connection_count == 1, "the silent node was tried once"


def test_a_worker_whose_node_dies_goes_on_consuming_from_the_other(
    node: FaultProxy,
    other_node: FaultProxy,
    make_worker_rig: Callable[..., WorkerRig],
    make_publisher: Callable[..., Publisher],
    queue_name: str,
) -> None:
    """Every worker connection starts on *node* (the other refuses at first); *node* then dies under them."""
    other_node.refuse()
    rig = make_worker_rig(url=[node_url(node.port), node_url(other_node.port)])  # shuffled: either may be tried first
    received: list[int] = []
    lock = threading.Lock()

    def record_batch(messages: list[dramatiq.Message[Any]]) -> None:
        with lock:
            received.extend(m.args[0] for m in messages)

    dramatiq.actor(record_batch, broker=rig.broker, queue_name=queue_name, actor_name="record_batch", max_retries=0)
    rig.broker.consume_with(queue_name, batched(actor_name="record_batch", max_batch=4))
    publisher = make_publisher()  # straight to RabbitMQ: only the worker's links go through the nodes
    for number in range(3):
        publisher.publish(message(queue_name, number, actor_name="record_batch"))
    rig.start({queue_name}, threads=2)
    assert wait_until(lambda: len(received) == 3, timeout=15)
    assert node.open_connections >= 2 and other_node.open_connections == 0  # the queue's and the delay queue's consumers

    other_node.pass_through()
    node.reset()
    node.reset_existing()
    lost_at = time.monotonic()
    for number in range(3, 6):
        publisher.publish(message(queue_name, number, actor_name="record_batch"))

    # Dramatiq restarts a consumer 3 s after its connection failed; the new one starts a node further round the ring.
    assert wait_until(lambda: len(received) == 6, timeout=15)
    assert sorted(received) == list(range(6))
    assert time.monotonic() - lost_at < 10
    assert wait_until(lambda: other_node.open_connections >= 2, timeout=10), "both consumers came back, on the other node"
    assert node.open_connections == 0
