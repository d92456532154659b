"""A RabbitMQ node lost under a connected publisher: it goes on with the next node of RABBITMQ_URL's list.

The "node" is a TCP proxy in front of the machine's RabbitMQ (never touched itself); the other node of the
list is that RabbitMQ directly. The proxy resets the publisher's connection and every new one, as a node
that died would; the next confirmed publish must reach RabbitMQ through the other URL within its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import dramatiq
import pika
import pytest

from brownout._dispatch.publisher import Publisher, PublisherState
from tests.integration.test_publisher import message
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, take_all
from tests.support.rabbit_nodes import InOrder, node_url
from tests.support.tcp_proxy import FaultProxy

PUBLISH_DEADLINE = 2.0


@pytest.fixture
def node() -> Iterator[FaultProxy]:
    parameters = pika.URLParameters(RABBITMQ_URL)
    with FaultProxy(upstream_host=parameters.host, upstream_port=parameters.port) as proxy:
        yield proxy


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
