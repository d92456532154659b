"""One durable publisher per process: a confirm channel, heartbeats, reconnects, deadlines.

Dramatiq's ``RabbitmqBroker`` opens a ``BlockingConnection`` per thread that
nobody services between enqueues: it dies of missed heartbeats, so the first
enqueue after a quiet spell fails, and its waits have no deadline (about 16 s
against a refusing RabbitMQ, 83 s against a silent one). `Publisher` instead
owns one connection on one I/O thread, and `publish` returns only once
RabbitMQ confirmed the message (persistent, durable queue, ``mandatory``), or
raises `PublishRejected` within the caller's deadline, whatever RabbitMQ does.

Errors::

    BrownoutDispatchError
     └── PublishRejected(reason, retry_after)   reason: see `RejectReason`

Why a ``SelectConnection`` on a dedicated thread (and not a ``BlockingConnection``
driven by ``process_data_events``): pika is not thread-safe, so one thread owns
the connection and callers hand it requests (a deque plus
``IOLoop.add_callback_threadsafe``) and wait on a ``Future`` with their own
deadline. Confirms are asynchronous on a ``SelectConnection``: many publishes
are in flight on one channel and each future is resolved by its own ack, nack
or return. ``BlockingChannel.basic_publish`` in confirm mode waits for each
confirm in turn with no deadline, so a silent broker would wedge the I/O
thread inside it; here the loop never blocks, and its timers drive the
heartbeats while idle, the connect watchdog, the reconnect backoff and the
liveness probe.


The connection's life (states, reconnects, the liveness probe) is told in
``brownout._dispatch.publisher_link``, which runs it; what a publish can end in is
defined in ``brownout._dispatch.publish_outcomes``. Both are re-exported here: import
the public names from this module.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq
import pika
from pika.adapters.select_connection import IOLoop

from brownout._dispatch.publish_outcomes import BrownoutDispatchError, PublishRejected, PublishRequest, RejectReason
from brownout._dispatch.publisher_link import (
    CLOSE_GRACE_SECONDS,
    ON_DEMAND_SPACING,
    RECONNECT_BASE_SECONDS,
    RECONNECT_CAP_SECONDS,
    PublisherLink,
    PublisherState,
    reconnect_delay,
)
from brownout._dispatch.queues import DEFAULT_DELIVERY_LIMIT, QueueType, queue_declarations
from brownout._dispatch.rabbitmq_nodes import NodeRing

__all__ = [
    "BLOCKED_CONNECTION_SECONDS",
    "CLOSE_GRACE_SECONDS",
    "DEFAULT_CONFIRM_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "ON_DEMAND_SPACING",
    "RECONNECT_BASE_SECONDS",
    "RECONNECT_CAP_SECONDS",
    "BrownoutDispatchError",
    "PublishRejected",
    "Publisher",
    "PublisherState",
    "RejectReason",
    "reconnect_delay",
]

log = logging.getLogger(__name__)

DEFAULT_CONFIRM_TIMEOUT = 2.0
DEFAULT_HEARTBEAT = 30
# A connection blocked this long by a RabbitMQ alarm is rebuilt: "blocked" cannot outlive
# the alarm by more than this even if connection.unblocked is lost, and messages stuck
# unconfirmed on it are failed instead of lingering.
BLOCKED_CONNECTION_SECONDS = 30.0


class Publisher:
    """Publishes Dramatiq messages to one bounded, durable queue with confirms; thread-safe.

    Build one per process at the entry point, ``start()`` it, and ``close()`` it on the way out.
    *max_length*, *queue_type* and *delivery_limit* say how the queues are declared
    (``brownout._dispatch.queues``) and must be the worker's: give all three from the settings.
    *url* is one node's URL or a cluster's (a list, or ``;``-separated: the settings' ``rabbitmq_urls``);
    each connect attempt goes to one node, the next round a ring shuffled with *rng*
    (``brownout._dispatch.rabbitmq_nodes``).
    """

    def __init__(
        self,
        *,
        url: str | Sequence[str],
        queue_name: str,
        max_length: int,
        queue_type: QueueType = "classic",
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        heartbeat: int = DEFAULT_HEARTBEAT,
        connect_timeout: float | None = None,
        reconnect_base: float = RECONNECT_BASE_SECONDS,
        reconnect_cap: float = RECONNECT_CAP_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        if confirm_timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise ValueError("confirm_timeout and connect_timeout must be positive")
        if heartbeat < 1:
            raise ValueError("heartbeat must be at least 1 s: without heartbeats a dead link is never noticed")
        self._queue_name = queue_name
        self._confirm_timeout = confirm_timeout
        connect_timeout = confirm_timeout if connect_timeout is None else connect_timeout
        rng = rng or random.Random()  # noqa: S311 - node order and reconnect backoff jitter, not a secret

        def configure(parameters: Any) -> None:
            # Our own heartbeat, not the server's proposal (60 s): the I/O loop sends one every
            # heartbeat/2 s while idle, and pika drops a link that sent nothing for heartbeat + 5 s.
            parameters.heartbeat = heartbeat
            # TCP connect (pika: 10 s) and the whole TCP+AMQP bring-up (pika: 15 s) each fail
            # within connect_timeout: a black-holed SYN and a peer that accepts and never answers.
            parameters.socket_timeout = connect_timeout
            parameters.stack_timeout = connect_timeout
            # One try per attempt: pika's own retries would sleep retry_delay (2 s) past every
            # caller's deadline; reconnecting is ours, jittered.
            parameters.connection_attempts = 1
            parameters.blocked_connection_timeout = BLOCKED_CONNECTION_SECONDS
            parameters.client_properties = {"connection_name": f"brownout-publisher {queue_name}"}

        nodes = NodeRing(url, rng=rng, configure=configure)

        # Shared with callers, under _lock (with the link's incoming and ioloop).
        self._lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.restarts = 0
        """Times the I/O thread was found dead and started again (`brownout_publisher_restarts_total`)."""
        self.on_restart: Callable[[], None] | None = None
        declarations = queue_declarations(queue_name, max_length=max_length, queue_type=queue_type, delivery_limit=delivery_limit)

        def new_link() -> PublisherLink:
            return PublisherLink(
                nodes=nodes,
                queue_name=queue_name,
                declarations=declarations,
                confirm_timeout=confirm_timeout,
                connect_timeout=connect_timeout,
                reconnect_base=reconnect_base,
                reconnect_cap=reconnect_cap,
                rng=rng,
            )

        self._new_link = new_link
        # The I/O thread's side; callers only read its state.
        self._link = new_link()

    # Caller side ---------------------------------------------------------

    @property
    def state(self) -> PublisherState:
        """The connection's state, for readiness reporting (a dead I/O thread is restarted on the way)."""
        with self._lock:
            self._restart_if_dead()
        return self._link.state

    def start(self) -> Publisher:
        """Start the I/O thread, which connects in the background; returns self at once."""
        with self._lock:
            if self._thread is not None or self._closing:
                raise RuntimeError("a Publisher is started once, before close()")
            self._start_thread()
        return self

    def _start_thread(self) -> None:
        self._link.ioloop = IOLoop()
        self._thread = threading.Thread(target=self._link.run, name=f"brownout-publisher-{self._queue_name}", daemon=True)
        self._thread.start()

    def _restart_if_dead(self) -> bool:
        """Under _lock: when the I/O thread died (a bug in pika or in the link's recovery), start a new one on a
        fresh link and return True. Its requests were resolved as it exited; nothing would serve new ones,
        and a callback handed to its closed loop is accepted silently: each write would wait out its timeout."""
        thread = self._thread
        if thread is None or thread.is_alive() or self._closing:
            return False
        self.restarts += 1
        log.error("RabbitMQ publisher I/O thread died; starting a new one (restart %d)", self.restarts)
        self._link = self._new_link()
        self._start_thread()
        if self.on_restart is not None:
            self.on_restart()
        return True

    def close(self) -> None:
        """Stop publishing and disconnect, within about CLOSE_GRACE_SECONDS; safe to call twice."""
        with self._lock:
            first = not self._closing
            self._closing = True
            thread, ioloop = self._thread, self._link.ioloop
        if thread is None or ioloop is None:
            self._link.state = PublisherState.CLOSED
            return
        if first:
            ioloop.add_callback_threadsafe(self._link.shutdown)
        thread.join(CLOSE_GRACE_SECONDS + 1.0)
        if thread.is_alive():
            log.warning("RabbitMQ publisher thread still running %.1fs after close()", CLOSE_GRACE_SECONDS + 1.0)

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def publish(self, message: dramatiq.Message[Any], *, timeout: float | None = None) -> None:
        """Return once RabbitMQ confirmed *message* (persistent, in the durable queue).

        Waits at most *timeout* seconds (default: ``confirm_timeout``). Raises `PublishRejected`
        otherwise, and ValueError for a message addressed to another queue.
        """
        if message.queue_name != self._queue_name:
            raise ValueError(f"message for queue {message.queue_name!r} given to the publisher of {self._queue_name!r}")
        timeout = self._confirm_timeout if timeout is None else timeout
        properties = pika.BasicProperties(delivery_mode=2, priority=message.options.get("broker_priority"))
        request = PublishRequest(body=message.encode(), properties=properties, deadline=time.monotonic() + timeout)
        with self._lock:
            if self._closing or self._link.ioloop is None:
                raise self._link.rejection(RejectReason.CLOSED)
            if self._restart_if_dead():  # rejected at once: the new thread is still connecting
                raise self._link.rejection(RejectReason.UNREACHABLE, "publisher restarting")
            self._link.incoming.append(request)
            self._link.ioloop.add_callback_threadsafe(self._link.take_incoming)
        try:
            request.future.result(timeout=max(timeout, 0.0))
            return
        except TimeoutError:
            pass
        if request.future.cancel():  # never handed to RabbitMQ
            if self._closing:
                raise self._link.rejection(RejectReason.CLOSED)
            connected = self._link.state in (PublisherState.READY, PublisherState.BLOCKED)
            raise self._link.rejection(RejectReason.TIMEOUT if connected else RejectReason.UNREACHABLE, "no connection in time")
        if request.future.done():  # settled as the deadline passed
            request.future.result()
            return
        with self._lock:  # sent, not confirmed: is RabbitMQ still answering at all?
            if not self._closing and self._link.ioloop is not None:
                self._link.ioloop.add_callback_threadsafe(self._link.on_confirm_overdue)
        raise self._link.rejection(RejectReason.TIMEOUT, f"no confirm within {timeout:.1f}s")
