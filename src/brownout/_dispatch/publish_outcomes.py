"""How one publish ends: confirmed, or `PublishRejected` with a `RejectReason`.

Shared by both sides of the `Publisher` (``brownout._dispatch.publisher``, which
re-exports the public names): the caller builds a `PublishRequest` and waits on
its future; the I/O thread (``brownout._dispatch.publisher_link``) settles it with
`resolve`.

Errors::

    BrownoutDispatchError
     └── PublishRejected(reason, retry_after)   reason: see `RejectReason`
"""

from __future__ import annotations

import dataclasses
import enum
from concurrent.futures import Future, InvalidStateError

import pika

from brownout._redaction import mask_secrets


class BrownoutDispatchError(Exception):
    """Raised when the write path cannot take a write; base of the dispatch errors."""


class RejectReason(enum.StrEnum):
    """Why a publish was not confirmed."""

    UNREACHABLE = "unreachable"  # refused, reset, DNS, auth, connection lost: not queued, or unknown if lost in flight
    TIMEOUT = "timeout"  # no confirm within the deadline: outcome unknown
    QUEUE_FULL = "queue full"  # nack: x-max-length with reject-publish
    UNROUTABLE = "unroutable"  # returned (mandatory): the queue is missing; it is declared again
    BLOCKED = "blocked"  # RabbitMQ's memory or disk alarm blocks publishers
    CLOSED = "closed"  # the publisher is closed


# Retry-After for every reason but UNREACHABLE, whose hint is the next connect attempt.
RETRY_AFTER = {
    RejectReason.TIMEOUT: 2.0,
    RejectReason.QUEUE_FULL: 5.0,
    RejectReason.UNROUTABLE: 1.0,
    RejectReason.BLOCKED: 5.0,
    RejectReason.CLOSED: 1.0,
}


class PublishRejected(BrownoutDispatchError):
    """Raised when RabbitMQ did not confirm a message: not queued, or (reason "timeout") not known to be."""

    def __init__(self, reason: str, retry_after: float, detail: str = "") -> None:
        super().__init__(f"publish rejected: {reason}" + (f" ({mask_secrets(detail)})" if detail else ""))
        self.reason = reason
        self.retry_after = retry_after


@dataclasses.dataclass(eq=False)
class PublishRequest:
    """One message on its way from a caller to RabbitMQ; its caller waits on *future*."""

    body: bytes
    properties: pika.BasicProperties
    deadline: float  # time.monotonic() when its caller stops waiting
    future: Future[None] = dataclasses.field(default_factory=Future)
    sent: bool = False
    returned: bool = False


def resolve(request: PublishRequest, error: PublishRejected | None = None) -> None:
    """Settle a request's future unless its caller already gave up on it."""
    try:
        if error is None:
            request.future.set_result(None)
        else:
            request.future.set_exception(error)
    except InvalidStateError:
        pass  # cancelled by its caller, or settled already
