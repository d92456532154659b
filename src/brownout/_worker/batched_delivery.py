"""Batched deliveries: the command queue reaches the apply actor as batches, not one message per call.

Why: Dramatiq hands each message to a worker thread and runs every middleware
hook, an actor call and an ack (a wake-up of the consumer's I/O loop) for it.
That per-message machinery cost more CPU than the write itself: a backlog
drained at about a third of Dramatiq's no-op consume rate, bound by the GIL,
however the database calls were grouped (see README, "Worker drain"). Here
the consumer thread takes every delivery already received, up to
`max_batch`, and hands them to one actor call as a `DeliveryBatch`: the
middleware (health gate, adaptive drain, time limit, metrics) runs once per
batch, the actor applies the batch in one transaction, and the whole batch is
acknowledged in one callback, with one `basic.ack multiple` when nothing
older is still unsettled.

What is unchanged: a delivery is acknowledged only after the COMMIT holding
its write (the batch is acknowledged once its actor returns); a batch held by
the health gate (the database unreachable) is not acknowledged, and the
pause that follows closes this consumer's channel, which returns every
unsettled delivery to RabbitMQ in its place; a body Dramatiq cannot decode is
rejected to ``Q.XQ`` as Dramatiq's own consumer does, and that is all
``Q.XQ`` receives. A batch that fails as a whole with nothing to pin the
failure on (anything escaping the actor: Dramatiq's nack) is held once, and
each of its deliveries comes back in a batch of its own (`DeliveryBatch.one_by_one`),
so a failure that repeats is pinned on one write. The delay queue
(``Q.DQ``, deferrals) keeps Dramatiq's consumer: due messages come back to
``Q`` and join a batch there.

Written by hand because Dramatiq has no batch consumption (its ``Consumer``
interface yields one message at a time), but kept to that interface, so the
Worker, its pause, resume and shutdown, and every middleware work unchanged.
pika's channel is not thread-safe: worker threads never touch it, their acks
are passed to this consumer's thread with `add_callback_threadsafe`, as
Dramatiq does.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import dramatiq
import pika
import pika.exceptions
from dramatiq import Consumer, MessageProxy
from dramatiq.errors import ConnectionClosed, DecodeError

log = logging.getLogger(__name__)

_AMQP_ERRORS = (AssertionError, pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)
_batch_tags = itertools.count(1)  # a batch's own tag: unique in the process, never a delivery tag
HOLD_SECONDS = 5.0
SUSPECTS_KEPT = 10_000
"""How long a held delivery stays with this consumer before it goes back to RabbitMQ (requeued in place). On a
quorum queue each return counts towards ``x-delivery-limit`` (1000 by default: about 80 minutes of holds)."""


class DeliveryBatch(MessageProxy):
    """Deliveries handed to one actor call: ``args`` is ``(messages,)``, the decoded Dramatiq messages."""

    def __init__(
        self, *, queue_name: str, actor_name: str, messages: Sequence[dramatiq.Message[Any]], delivery_tags: Sequence[int]
    ):
        super().__init__(
            dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=(list(messages),), kwargs={}, options={})
        )
        self._tag = next(_batch_tags)
        self.messages = list(messages)
        self.delivery_tags = tuple(delivery_tags)
        self.redelivered = False
        self.withdrawn = False
        self.held: set[int] = set()
        """Indexes of deliveries to give back to RabbitMQ a while later instead of acknowledging (see `hold`)."""
        self.split = False
        """True: the held deliveries come back one per batch (see `one_by_one`)."""
        self.consumer: BatchedDelivery | None = None

    def hold(self, index: int) -> None:
        """Give delivery *index* back to RabbitMQ, in its place, `HOLD_SECONDS` after the batch is settled, the
        others being acknowledged: one write that cannot be kept now (RabbitMQ refused its deferral) waits
        without holding back its batch, and without spinning through the queue."""
        self.held.add(index)

    def one_by_one(self) -> None:
        """Hold every delivery, and have each come back in a batch of its own: the batch failed as a whole
        and no write can be blamed; alone, the write that fails again is the one to blame, and the others go on."""
        self.held.update(range(len(self.delivery_tags)))
        self.split = True

    def withdraw(self) -> None:
        """Leave this batch unsettled (not started: the worker is stopping); closing the channel returns it."""
        if self.consumer is not None:
            self.consumer.withdraw(self)

    log_safe_repr = True
    """Its repr and str name the batch, never its deliveries' arguments (src/brownout/_observability/log_masking.py)."""

    def __repr__(self) -> str:
        return f"<DeliveryBatch {self._tag} of {len(self.delivery_tags)} on {self._message.queue_name}>"

    __str__ = __repr__  # MessageProxy's str is its message's: `apply_command_batch([Message(... args=(payload,) ...)])`


class BatchedDelivery(Consumer):
    """A Dramatiq consumer of one queue whose messages come out as `DeliveryBatch`es for *actor_name*.

    *prefetch* bounds the unacknowledged deliveries (all batches in flight
    together); *timeout_ms* is how long `__next__` waits for a first delivery
    before returning None (the consumer thread then looks at its pause and
    stop flags).
    """

    def __init__(
        self,
        broker: Any,
        queue_name: str,
        *,
        actor_name: str,
        max_batch: int,
        prefetch: int,
        timeout_ms: int,
    ) -> None:
        if max_batch < 1 or prefetch < max_batch:
            raise ValueError(f"need 1 <= max_batch <= prefetch, got {max_batch} and {prefetch}")
        self.queue_name = queue_name
        self.actor_name = actor_name
        self.max_batch = max_batch
        self.timeout_seconds = timeout_ms / 1000
        self.known_tags: set[int] = set()
        """Batches handed out and not settled; the health gate withdraws a held one (src/brownout/_worker/health_gate.py)."""
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._unsettled: set[int] = set()  # delivery tags neither acked nor rejected: this thread only
        # Message ids of a batch that failed as a whole: each comes back in a batch of its own (this thread only;
        # bounded, oldest forgotten first). Per process: another worker given one splits its batch in turn.
        self._suspects: OrderedDict[str, None] = OrderedDict()
        self._known_lock = threading.Lock()
        try:
            self.connection = pika.BlockingConnection(parameters=broker.parameters)
            self.channel = self.connection.channel()
            self.channel.basic_qos(prefetch_count=prefetch)
            self.channel.basic_consume(queue_name, self._on_delivery)
        except _AMQP_ERRORS as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    # -- the consumer thread ------------------------------------------------------

    def __iter__(self) -> BatchedDelivery:
        return self

    def __next__(self) -> DeliveryBatch | None:
        try:
            if not self._buffer:
                self.connection.process_data_events(time_limit=self.timeout_seconds)  # returns once one arrives
            if not self._buffer:
                return None
            self.connection.process_data_events(time_limit=0)  # whatever else is already on the socket
        except _AMQP_ERRORS as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        tags: list[int] = []
        messages: list[dramatiq.Message[Any]] = []
        while self._buffer and len(tags) < self.max_batch:
            tag, body = self._buffer[0]
            try:
                message = dramatiq.Message.decode(body)
            except DecodeError:
                self._buffer.popleft()
                log.exception("undecodable message %d on %s: rejected to its dead-letter queue", tag, self.queue_name)
                self._reject([tag])
                continue
            alone = message.message_id in self._suspects
            if alone and tags:
                break  # it starts the next batch, alone
            self._buffer.popleft()
            messages.append(message)
            tags.append(tag)
            if alone:
                break
        if not tags:
            return None
        batch = DeliveryBatch(queue_name=self.queue_name, actor_name=self.actor_name, messages=messages, delivery_tags=tags)
        batch.consumer = self
        with self._known_lock:
            self.known_tags.add(batch._tag)
        return batch

    def _on_delivery(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._unsettled.add(method.delivery_tag)
        self._buffer.append((method.delivery_tag, body))

    def _settle(
        self, tags: Sequence[int], held: Sequence[int] = (), suspects: Sequence[str] = (), cleared: Sequence[str] = ()
    ) -> None:
        """Ack *tags* (one batch) but *held*: one frame when no older delivery is unsettled, else one each.
        A held delivery stays unsettled and goes back to RabbitMQ `HOLD_SECONDS` later; *suspects* (message ids)
        will come back one per batch, *cleared* ones no longer need to."""
        for message_id in cleared:
            self._suspects.pop(message_id, None)
        for message_id in suspects:
            self._suspects[message_id] = None
            self._suspects.move_to_end(message_id)
        while len(self._suspects) > SUSPECTS_KEPT:
            self._suspects.popitem(last=False)
        self._unsettled.difference_update(tag for tag in tags if tag not in held)
        top = max(tags)
        if not held and (not self._unsettled or min(self._unsettled) > top):
            self.channel.basic_ack(top, multiple=True)
        else:
            for tag in tags:
                if tag not in held:
                    self.channel.basic_ack(tag)
        if held:
            self.connection.call_later(HOLD_SECONDS, partial(self._give_back, list(held)))

    def _give_back(self, tags: Sequence[int]) -> None:
        """Requeue held deliveries still unsettled on this channel (a closed channel returned them already)."""
        for tag in tags:
            if tag in self._unsettled and self.channel.is_open:
                self._unsettled.discard(tag)
                self.channel.basic_nack(tag, requeue=True)

    def _reject(self, tags: Iterable[int]) -> None:
        for tag in tags:
            self._unsettled.discard(tag)
            self.channel.basic_nack(tag, requeue=False)

    # -- worker threads -------------------------------------------------------------

    def ack(self, message: MessageProxy) -> None:
        if not isinstance(message, DeliveryBatch):
            self._post(message, self._settle, "ack")
            return
        held = [message.delivery_tags[index] for index in sorted(message.held)]
        ids = [m.message_id for m in message.messages]
        suspects = ids if message.split else ()
        cleared = ids if len(ids) == 1 and not message.held else ()
        self._post(message, partial(self._settle, held=held, suspects=suspects, cleared=cleared), "ack")

    def nack(self, message: MessageProxy) -> None:
        """Dramatiq's nack (something escaped the actor, nothing to pin it on): the batch is held, then each
        delivery comes back alone. Never ``Q.XQ``: that queue expires messages and no command lists it."""
        if isinstance(message, DeliveryBatch):
            with self._known_lock:
                settled_here = not message.withdrawn and message._tag in self.known_tags
            if settled_here:  # not a batch the health gate holds (that one goes back with the channel)
                log.warning("%r failed as a whole: held, its deliveries to come back one per batch", message)
                message.one_by_one()
        self.ack(message)

    def withdraw(self, batch: DeliveryBatch) -> None:
        """Neither ack nor nack *batch*: RabbitMQ takes its deliveries back when this consumer closes."""
        batch.withdrawn = True
        with self._known_lock:
            self.known_tags.discard(batch._tag)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Nothing to do: closing the channel returns every unsettled delivery (as Dramatiq's RabbitMQ consumer)."""

    def _post(self, message: MessageProxy, settle: Any, what: str) -> None:
        if not isinstance(message, DeliveryBatch):
            raise TypeError(f"{self.queue_name}: cannot {what} {message!r}, not a DeliveryBatch")
        with self._known_lock:
            if message.withdrawn:
                log.debug("%r withdrawn: left for RabbitMQ to take back", message)
                return
            if message._tag not in self.known_tags:
                log.warning("not settling %r (%s): not in known tags (held, or of a closed channel)", message, what)
                return
            self.known_tags.discard(message._tag)
        try:
            self.connection.add_callback_threadsafe(partial(settle, message.delivery_tags))
        except _AMQP_ERRORS as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    # -- both -----------------------------------------------------------------------

    def close(self) -> None:
        """Run the acks already posted, then close: RabbitMQ takes back every unsettled delivery."""
        try:
            flushed = threading.Event()
            self.connection.add_callback_threadsafe(flushed.set)
            while not flushed.is_set():
                self.connection.sleep(0)
        except pika.exceptions.ConnectionWrongStateError:
            log.debug("%s: connection already closed", self.queue_name)
        except Exception:
            log.exception("%s: could not run the posted acks before closing", self.queue_name)
        try:
            self.channel.close()
            self.connection.close()
        except _AMQP_ERRORS as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]


def batched(*, actor_name: str, max_batch: int) -> Any:
    """A `BrownoutRabbitmqBroker.consume_with` factory; prefetch: room for two full batches at least."""

    def factory(broker: Any, queue_name: str, prefetch: int, timeout_ms: int) -> BatchedDelivery:
        return BatchedDelivery(
            broker,
            queue_name,
            actor_name=actor_name,
            max_batch=max_batch,
            prefetch=max(prefetch, 2 * max_batch),
            timeout_ms=timeout_ms,
        )

    return factory
