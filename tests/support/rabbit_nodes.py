"""A RabbitMQ "cluster" on one machine for tests: the real local node listed beside nodes that are gone.

No second RabbitMQ node runs here: a gone node is a port nothing listens on (connection refused) or a
`FaultProxy` that accepts and resets (connection reset), which also counts the attempts it was given.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pika

from tests.support.rabbit import RABBITMQ_URL
from tests.support.tcp_proxy import FaultProxy
from tests.support.throwaway_rabbit import free_port


class InOrder(random.Random):
    """A random source whose shuffle leaves the list as it is: a client tries the nodes in the order
    listed, so a test decides which node comes first. Everything else is a seeded Random's."""

    def __init__(self) -> None:
        super().__init__(7)

    def shuffle(self, x: Any) -> None:
        return None


def node_url(port: int) -> str:
    """The suite's RabbitMQ URL (credentials, vhost) with 127.0.0.1:*port* as its node."""
    parameters = pika.URLParameters(RABBITMQ_URL)
    return RABBITMQ_URL.replace(f"{parameters.host}:{parameters.port}", f"127.0.0.1:{port}")


def refusing_node_url() -> str:
    """A node whose port nothing listens on: every connect is refused."""
    return node_url(free_port())


def resetting_node() -> Iterator[FaultProxy]:
    """A node that accepts each connection and resets it at once (a fixture's body: yields the proxy)."""
    parameters = pika.URLParameters(RABBITMQ_URL)
    with FaultProxy(upstream_host=parameters.host, upstream_port=parameters.port) as proxy:
        proxy.reset()
        yield proxy


def with_dead_node(dead_url: str, position: str) -> list[str]:
    """The live node and *dead_url*, the dead one *position* ("first" or "last")."""
    return [dead_url, RABBITMQ_URL] if position == "first" else [RABBITMQ_URL, dead_url]
