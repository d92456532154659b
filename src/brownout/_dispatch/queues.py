"""The one place that says how the write queue is declared in RabbitMQ.

RabbitMQ answers `PRECONDITION_FAILED` (and closes the channel) when a queue is
declared again with other arguments, and everyone declares it: the web
process's publisher, the worker's Dramatiq consumer on every (re)start, and the
worker's own republishes (retries, delays). So the arguments are built here
only, from Dramatiq's own recipe plus a maximum length:

- ``Q`` (the queue): durable; Dramatiq's dead-letter arguments (to ``Q.XQ``),
  plus ``x-max-length`` with ``x-overflow: reject-publish``, so a long outage
  fills it to a known bound and then nacks publishes (a 503) instead of growing
  until RabbitMQ's disk alarm blocks every publisher on the node.
- ``Q.DQ`` (Dramatiq's delay queue): declared by Dramatiq with the same
  arguments as ``Q``, so it is bounded too.
- ``Q.XQ`` (dead letters): only Dramatiq's ``x-message-ttl``.

``queue_type="quorum"`` (``BROWNOUT_QUEUE_TYPE``; RabbitMQ 3.10 or later)
declares all three as replicated quorum queues; see `quorum_arguments` and
`dead_letter_queue_arguments` for what that adds and why. The default,
``"classic"``, declares exactly what Brownout always declared: a queue that
exists keeps working. The type of an existing queue cannot change: RabbitMQ
refuses the other declaration (`PRECONDITION_FAILED`), so switching means
draining the queues, deleting them and letting the new release declare them.

`BrownoutRabbitmqBroker` is Dramatiq's broker with these arguments, its
consumers settling only deliveries of their own channel (`TagSafeConsumer`), and with
``confirm_delivery=True``: without confirms a publish to a full queue is dropped
silently (RabbitMQ's reject-publish only tells publishers that asked for
confirms). It reaches a cluster's nodes through a `NodeRing`
(``brownout._dispatch.rabbitmq_nodes``): each connection it or a consumer opens
tries every node, starting one further round its shuffled ring. Nothing here
connects or reads the environment at import.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from dramatiq import Consumer
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker, _RabbitmqConsumer
from dramatiq.common import dq_name, xq_name

from brownout._dispatch.rabbitmq_nodes import NodeRing

OVERFLOW = "reject-publish"

QueueType = Literal["classic", "quorum"]
QUEUE_TYPES: tuple[str, ...] = get_args(QueueType)
# Same default as Settings.queue_delivery_limit: far above anything a healthy worker spends
# (see quorum_arguments), and explicit, so RabbitMQ 4's implicit default of 20 never applies.
DEFAULT_DELIVERY_LIMIT = 1000
# Quorum queues only: dead letters (Dramatiq's nacks, the delivery limit) are moved to Q.XQ
# with publisher confirms, kept in Q until Q.XQ confirmed them (see quorum_arguments).
DEAD_LETTER_STRATEGY = "at-least-once"


def max_length_arguments(*, max_length: int) -> dict[str, Any]:
    """The arguments Brownout adds to Dramatiq's: a bound, and what happens at it."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    return {"x-max-length": max_length, "x-overflow": OVERFLOW}


def _check_queue_type(queue_type: str, delivery_limit: int) -> None:
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, got {queue_type!r}")
    if delivery_limit < 1:
        raise ValueError(f"delivery_limit must be at least 1, got {delivery_limit}")


def quorum_arguments(*, delivery_limit: int) -> dict[str, Any]:
    """What a quorum ``Q`` and ``Q.DQ`` add to the classic arguments, each one deliberate.

    - ``x-queue-type: quorum``: only a declaration can set it (no policy can), so
      every declarer sends it.
    - ``x-delivery-limit``: a quorum queue counts the returns of a delivery, and
      (before RabbitMQ 4.3; checked on 3.10) closing a channel with unacknowledged
      deliveries counts as one. The worker's health gate returns what it prefetched by
      closing its channel at each pause (src/brownout/_worker/health_gate.py), and Dramatiq holds
      delayed messages unacknowledged in ``Q.DQ`` across every pause and restart:
      a database outage spends deliveries of writes that did nothing wrong.
      RabbitMQ 4 applies a limit of 20 when none is given, which a flapping outage
      can exhaust; so the limit is always sent, high by default (1000), still
      finite, so that a message that crashes the worker process itself (the one
      case the actors cannot turn into a dead letter) ends in ``Q.XQ`` instead of
      cycling forever.
    - ``x-dead-letter-strategy: at-least-once``: quorum queues dead-letter at most
      once by default (a dead letter in transit to ``Q.XQ`` can be lost when a node
      fails). At least once keeps it in ``Q`` until ``Q.XQ`` confirmed it. It
      requires ``x-overflow: reject-publish``, which `max_length_arguments` always
      sets (and which quorum queues support; ``reject-publish-dlx`` they do not), so
      a full queue still nacks publishes (a 503). Dead letters in transit count
      towards ``x-max-length`` until ``Q.XQ`` takes them; ``Q.XQ`` has no bound, so
      that is short.

    Dramatiq's ``x-max-priority`` (refused by `BrownoutRabbitmqBroker`) is not
    supported by quorum queues in any case; quorum queues are always durable and
    never exclusive, which is how every declaration here is made already.
    """
    if delivery_limit < 1:
        raise ValueError(f"delivery_limit must be at least 1, got {delivery_limit}")
    return {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit, "x-dead-letter-strategy": DEAD_LETTER_STRATEGY}


def queue_arguments(
    queue_name: str, *, max_length: int, queue_type: QueueType = "classic", delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> dict[str, Any]:
    """Arguments of the queue *queue_name* and of its delay queue, exactly as every party declares them.

    *delivery_limit* applies to quorum queues only; classic queues have no such limit.
    """
    _check_queue_type(queue_type, delivery_limit)
    arguments = {
        # Dramatiq's RabbitmqBroker._build_queue_arguments (without max_priority).
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": xq_name(queue_name),
        **max_length_arguments(max_length=max_length),
    }
    if queue_type == "quorum":
        arguments.update(quorum_arguments(delivery_limit=delivery_limit))
    return arguments


def dead_letter_queue_arguments(
    *, queue_type: QueueType = "classic", delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> dict[str, Any]:
    """Arguments of ``Q.XQ``: Dramatiq's ``x-message-ttl`` (7 days), and for quorum, quorum too.

    A quorum ``Q.XQ`` is replicated like the queue it serves (a classic one would hold the
    dead letters of a replicated queue on one node) and supports ``x-message-ttl`` since
    RabbitMQ 3.10. It gets the same explicit ``x-delivery-limit``: nothing consumes it, but
    an operator looking at it with requeueing gets/nacks spends deliveries, and RabbitMQ 4's
    implicit 20 would then drop the dead letters (``Q.XQ`` has no dead-letter exchange). No
    ``x-max-length``: a bound here would make the at-least-once dead-lettering of ``Q`` stall.
    """
    _check_queue_type(queue_type, delivery_limit)
    arguments: dict[str, Any] = {"x-message-ttl": DEAD_MESSAGE_TTL}
    if queue_type == "quorum":
        arguments.update({"x-queue-type": "quorum", "x-delivery-limit": delivery_limit})
    return arguments


@dataclasses.dataclass(frozen=True)
class QueueDeclaration:
    """One ``queue.declare``: Dramatiq never sets exclusive or auto_delete, so neither do we."""

    name: str
    arguments: dict[str, Any]
    durable: bool = True


def queue_declarations(
    queue_name: str, *, max_length: int, queue_type: QueueType = "classic", delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> tuple[QueueDeclaration, ...]:
    """``Q``, ``Q.DQ`` and ``Q.XQ``, in the order Dramatiq declares them (`_ensure_queue`)."""
    arguments = queue_arguments(queue_name, max_length=max_length, queue_type=queue_type, delivery_limit=delivery_limit)
    return (
        QueueDeclaration(queue_name, arguments),
        QueueDeclaration(dq_name(queue_name), dict(arguments)),
        QueueDeclaration(xq_name(queue_name), dead_letter_queue_arguments(queue_type=queue_type, delivery_limit=delivery_limit)),
    )


ConsumerFactory = Callable[["BrownoutRabbitmqBroker", str, int, int], Consumer]

PUBLISH_DEADLINE_SECONDS = 10.0
"""How long one of the worker's own publishes (a deferral, a retry) may wait on a RabbitMQ that blocks
publishers (a memory or disk alarm) or does not answer, per attempt (Dramatiq makes up to 3)."""


def bound_waits(parameters: Any, seconds: float) -> None:
    """Give a Dramatiq (pika BlockingConnection) connection deadlines of its own: pika waits without one for
    a blocked connection (a resource alarm: a deferral's publish then waited until Dramatiq's TimeLimit,
    10 minutes, killed the whole batch) and 10 to 15 s for a connect."""
    parameters.blocked_connection_timeout = seconds
    parameters.socket_timeout = seconds
    parameters.stack_timeout = seconds


class TagSafeConsumer(_RabbitmqConsumer):
    """Dramatiq's one-message RabbitMQ consumer, settling only deliveries of its own channel.

    A delivery tag means something only on the channel that delivered it, and tags restart at 1 on every
    channel. Dramatiq's Worker settles a message through its consumer thread's *current* consumer: a job
    still in the work queue when the connection was lost (and the consumer rebuilt) would be acknowledged
    by its old tag on the new channel, acknowledging another job there, one that has not run, which RabbitMQ
    then drops. Here such a settle is skipped: the closed channel already gave the job back to RabbitMQ,
    which delivers it again (its handling is idempotent: the email's send record).
    """

    def __next__(self) -> Any:
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None:
            message._brownout_consumer = self
        return message

    def ack(self, message: Any) -> None:
        if self._delivered_here(message, "ack"):
            super().ack(message)  # type: ignore[no-untyped-call]

    def nack(self, message: Any) -> None:
        if self._delivered_here(message, "nack"):
            super().nack(message)  # type: ignore[no-untyped-call]

    def _delivered_here(self, message: Any, what: str) -> bool:
        if getattr(message, "_brownout_consumer", None) is self:
            return True
        self.logger.warning(
            "not settling (%s) message %s: delivered on a closed channel, RabbitMQ delivers it again",
            what,
            getattr(message, "message_id", "?"),
        )
        return False


class BrownoutRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker declaring the same bounded queues as the publisher.

    Always ``confirm_delivery=True`` (the worker's republishes must not vanish at
    a full queue: pika raises ``NackError``, which Dramatiq retries and then
    raises as ``ConnectionClosed``). ``max_priority`` is refused: it would add
    ``x-max-priority`` on the worker's side only, and RabbitMQ would refuse the
    other declarations. *queue_type* and *delivery_limit* must be the publishers'
    (both come from the same settings). *url* is one node's URL or a cluster's (a list,
    or ``;``-separated as Dramatiq takes it); *rng* shuffles the nodes.
    """

    def __init__(
        self,
        *,
        url: str | Sequence[str],
        max_length: int,
        queue_type: QueueType = "classic",
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        publish_deadline: float = PUBLISH_DEADLINE_SECONDS,
        rng: random.Random | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("max_priority") is not None:
            raise ValueError("max_priority is not supported: every declarer must use queue_arguments()")
        if kwargs.get("confirm_delivery") is False:
            raise ValueError("confirm_delivery must stay on: a full queue would drop republishes silently")
        kwargs["confirm_delivery"] = True
        self.max_length_arguments = max_length_arguments(max_length=max_length)
        self.queue_type: QueueType = queue_type
        self.delivery_limit = delivery_limit
        self.dead_letter_queue_arguments = dead_letter_queue_arguments(queue_type=queue_type, delivery_limit=delivery_limit)
        self._type_arguments = quorum_arguments(delivery_limit=delivery_limit) if queue_type == "quorum" else {}
        self._consumers: dict[str, ConsumerFactory] = {}
        self._nodes = NodeRing(url, rng=rng, configure=lambda parameters: bound_waits(parameters, publish_deadline))
        super().__init__(url=list(self._nodes.urls), **kwargs)
        self.publish_deadline = publish_deadline

    @property
    def parameters(self) -> list[Any]:
        """Every node, for one new connection (Dramatiq's per thread, a consumer's): pika tries them in order,
        starting one node further round this broker's shuffled ring than the last connection."""
        return self._nodes.next_order()

    @parameters.setter
    def parameters(self, _value: Any) -> None:
        """Dramatiq's __init__ sets its own from the same URLs: the ring stands in for them."""

    consumer_class = TagSafeConsumer

    def consume_with(self, queue_name: str, factory: ConsumerFactory) -> None:
        """Consume *queue_name* (not its delay queue) with ``factory(broker, queue_name, prefetch, timeout_ms)``
        instead of Dramatiq's one-message consumer (the worker's batched deliveries)."""
        self._consumers[queue_name] = factory

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        factory = self._consumers.get(queue_name)
        if factory is None:
            return super().consume(queue_name, prefetch, timeout)
        self.declare_queue(queue_name, ensure=True)
        return factory(self, queue_name, prefetch, timeout)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        """``Q`` and ``Q.DQ`` (Dramatiq passes the canonical name for both)."""
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
        arguments.update(self.max_length_arguments)
        arguments.update(self._type_arguments)
        return arguments

    def _declare_xq_queue(self, queue_name: str) -> Any:
        """``Q.XQ``: Dramatiq's declaration hard-codes its arguments; these are `dead_letter_queue_arguments`."""
        return self.channel.queue_declare(
            queue=xq_name(queue_name), durable=True, arguments=dict(self.dead_letter_queue_arguments)
        )
