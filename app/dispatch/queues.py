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

`BrownoutRabbitmqBroker` is Dramatiq's broker with these arguments, and with
``confirm_delivery=True``: without confirms a publish to a full queue is dropped
silently (RabbitMQ's reject-publish only tells publishers that asked for
confirms). Nothing here connects or reads the environment at import.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.common import dq_name, xq_name

OVERFLOW = "reject-publish"


def max_length_arguments(*, max_length: int) -> dict[str, Any]:
    """The arguments Brownout adds to Dramatiq's: a bound, and what happens at it."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    return {"x-max-length": max_length, "x-overflow": OVERFLOW}


def queue_arguments(queue_name: str, *, max_length: int) -> dict[str, Any]:
    """Arguments of the queue *queue_name* and of its delay queue, exactly as every party declares them."""
    return {
        # Dramatiq's RabbitmqBroker._build_queue_arguments (without max_priority).
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": xq_name(queue_name),
        **max_length_arguments(max_length=max_length),
    }


@dataclasses.dataclass(frozen=True)
class QueueDeclaration:
    """One ``queue.declare``: Dramatiq never sets exclusive or auto_delete, so neither do we."""

    name: str
    arguments: dict[str, Any]
    durable: bool = True


def queue_declarations(queue_name: str, *, max_length: int) -> tuple[QueueDeclaration, ...]:
    """``Q``, ``Q.DQ`` and ``Q.XQ``, in the order Dramatiq declares them (`_ensure_queue`)."""
    arguments = queue_arguments(queue_name, max_length=max_length)
    return (
        QueueDeclaration(queue_name, arguments),
        QueueDeclaration(dq_name(queue_name), dict(arguments)),
        QueueDeclaration(xq_name(queue_name), {"x-message-ttl": DEAD_MESSAGE_TTL}),
    )


class BrownoutRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker declaring the same bounded queues as the publisher.

    Always ``confirm_delivery=True`` (the worker's republishes must not vanish at
    a full queue: pika raises ``NackError``, which Dramatiq retries and then
    raises as ``ConnectionClosed``). ``max_priority`` is refused: it would add
    ``x-max-priority`` on the worker's side only, and RabbitMQ would refuse the
    other declarations.
    """

    def __init__(self, *, max_length: int, **kwargs: Any) -> None:
        if kwargs.get("max_priority") is not None:
            raise ValueError("max_priority is not supported: every declarer must use queue_arguments()")
        if kwargs.get("confirm_delivery") is False:
            raise ValueError("confirm_delivery must stay on: a full queue would drop republishes silently")
        kwargs["confirm_delivery"] = True
        self.max_length_arguments = max_length_arguments(max_length=max_length)
        super().__init__(**kwargs)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
        arguments.update(self.max_length_arguments)
        return arguments
