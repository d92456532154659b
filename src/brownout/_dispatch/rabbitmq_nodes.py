"""A RabbitMQ cluster as Brownout's AMQP clients see it: node URLs, tried round a shuffled ring.

``RABBITMQ_URL`` may name several nodes of one cluster, separated by ``;``
(Dramatiq's own convention: its ``RabbitmqBroker(url=...)`` splits on ``;``
and hands pika a list). Every client connects through a `NodeRing`, so the
rule is written once:

- **Shuffled, per client.** Each client (a publisher, the worker's broker,
  the queue-depth probe) shuffles the list once with its own random source, so
  a fleet spreads over the nodes instead of piling onto the first one.
- **One node further each connect.** `NodeRing.next_order` starts every new
  connection one node further round the ring and lists every node after it:
  pika's ``BlockingConnection`` tries such a list in order, each node with its
  own connect deadlines, and ends its attempt at the first name that does not
  resolve (a DNS failure ends pika's cycle), so a fixed order would let one bad
  node stop every connect. The publisher takes one node per attempt
  (`NodeRing.next_node`): a lost connection is followed by an attempt on the
  next node.
- **Each URL is complete.** Its own user, password, host, port, vhost and
  query options, read by pika as a single URL is; nothing is copied from the
  first. Checked here, as settings errors: no empty element, one scheme for
  all (``amqp`` and ``amqps`` mixed would send a password in clear to some
  nodes), one vhost for all (two vhosts are two sets of queues: writes
  published to one would never reach a worker consuming the other), and user
  info on every URL or on none (pika logs in as guest where a URL has none).
  A ``;`` in a password must be written ``%3B``.

Importing this module loads neither pika nor anything else heavy: the settings
validate ``RABBITMQ_URL`` with `split_node_urls`, which imports pika only when called.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from brownout._redaction import mask_secrets

NODE_SEPARATOR = ";"
SCHEMES = ("amqp", "amqps")


def split_node_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The node URLs of *value* (``;``-separated, or already a list), stripped and checked; raises ValueError.

    A single URL is a list of one. Error messages show URLs with their password masked."""
    parts = value.split(NODE_SEPARATOR) if isinstance(value, str) else list(value)
    urls = tuple(part.strip() for part in parts)
    count = len(urls)
    for index, url in enumerate(urls, 1):
        if not url:
            where = f"node URL {index} of {count}" if count > 1 else "the URL"
            raise ValueError(f"{where} is empty (two `;` in a row, or one at an end?): remove it")
    facts = [_node_facts(url, f"node URL {index} of {count}" if count > 1 else "the URL") for index, url in enumerate(urls, 1)]
    schemes = sorted({fact.scheme for fact in facts})
    if len(schemes) > 1:
        raise ValueError(
            "mixes amqp:// and amqps://: the password would travel in clear to some nodes; use one scheme for every node"
        )
    vhosts = sorted({fact.vhost for fact in facts})
    if len(vhosts) > 1:
        raise ValueError(
            f"names vhosts {', '.join(repr(vhost) for vhost in vhosts)}: the nodes of one cluster serve one vhost, "
            "and each URL carries its own: write the same vhost in every URL"
        )
    logins = [fact.has_login for fact in facts]
    if any(logins) and not all(logins):
        missing = ", ".join(str(index) for index, has in enumerate(logins, 1) if not has)
        raise ValueError(
            f"node URL {missing} has no user:password while another has: pika would log in there as guest "
            "(each URL carries its own credentials)"
        )
    return urls


@dataclasses.dataclass(frozen=True)
class _NodeFacts:
    scheme: str
    vhost: str
    has_login: bool


def _node_facts(url: str, label: str) -> _NodeFacts:
    import pika  # here: validating settings needs it, importing them does not

    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme {scheme + '://' if scheme else '(none)'} is not amqp:// or amqps://")
        parameters = pika.URLParameters(url)  # what pika refuses (a bad port, an unknown option) fails here, not at connect
    except ValueError as exc:
        raise ValueError(f"{label} ({mask_secrets(url)}): {mask_secrets(str(exc))}") from None
    return _NodeFacts(scheme=scheme, vhost=parameters.virtual_host, has_login=parts.username is not None)


@dataclasses.dataclass(frozen=True)
class Node:
    """One node's connection parameters (pika's ``URLParameters``, configured by the client) and its URL, masked, for logs."""

    parameters: Any
    where: str


class NodeRing:
    """The nodes of one client, in its own shuffled order; thread-safe.

    *configure* is called once on each node's ``pika.URLParameters`` (the client's deadlines,
    heartbeat, name). *rng* shuffles the ring; tests pass a seeded or in-order one."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        rng: random.Random | None = None,
        configure: Callable[[Any], None] | None = None,
    ) -> None:
        import pika

        self.urls = split_node_urls(urls)
        self.where = mask_secrets(NODE_SEPARATOR.join(self.urls))
        order = list(self.urls)
        (random.Random() if rng is None else rng).shuffle(order)  # noqa: S311 - spreading load, not a secret
        nodes = []
        for url in order:
            parameters = pika.URLParameters(url)
            if configure is not None:
                configure(parameters)
            nodes.append(Node(parameters=parameters, where=mask_secrets(url)))
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.nodes)

    def next_node(self) -> Node:
        """The node to try next (the publisher's one node per attempt); the ring moves one further."""
        return self._turn()[0]

    def next_order(self) -> list[Any]:
        """Every node's parameters, starting one node further than the last call: what a
        ``pika.BlockingConnection`` tries in order for one connection."""
        return [node.parameters for node in self._turn()]

    def _turn(self) -> tuple[Node, ...]:
        with self._lock:
            start = self._next
            self._next = (start + 1) % len(self.nodes)
        return self.nodes[start:] + self.nodes[:start]
