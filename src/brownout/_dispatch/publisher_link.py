"""The I/O thread of a `Publisher`: one ``SelectConnection``, its confirms, its life and death.

Everything here runs on the publisher's I/O thread (pika is not thread-safe),
except what `Publisher` (``brownout._dispatch.publisher``) calls under its own lock:
it appends to `PublisherLink.incoming` and schedules `take_incoming`,
`on_confirm_overdue` or `shutdown` with ``IOLoop.add_callback_threadsafe``,
and reads `PublisherLink.state` and `PublisherLink.rejection`.

Connection life (state `PublisherState`, changed and logged in `_set_state`):
CONNECTING (TCP, AMQP, channel, ``confirm.select``, the three queue
declarations, all within ``connect_timeout``) -> READY <-> BLOCKED (RabbitMQ's
``connection.blocked``: publishes fail fast) -> DISCONNECTED on any loss. A
message sent on a lost connection and not confirmed is sent again on the next
one while its caller still waits (at least once: the worker applies a command
once, by its id); else its caller gets "unreachable" or "timeout", the outcome
unknown either way, and a retry with the same idempotency key is safe.
Reconnects run in the background
with capped, jittered backoff; meanwhile callers are rejected at once, except
after a failure that cost RabbitMQ nothing (a lost connection, a refused or
reset connect): then a publish asks for an attempt on demand, at most one per
`ON_DEMAND_SPACING`, and waits for it within its own deadline, so the first
publish after a RabbitMQ restart succeeds. A publish that times out after it
was sent makes the I/O thread open a probe channel; no answer within
``confirm_timeout`` drops the connection (a silent link would otherwise live
until the heartbeat check, up to 2 x (heartbeat + 5) s).

A cluster (``RABBITMQ_URL`` naming several nodes): each attempt goes to one
node, the next round the publisher's shuffled `NodeRing`, so a lost connection
is followed by an attempt on another node. While some node has not been tried
since the last connection, a failed attempt (whatever its cause) fails no
publish: the publishes waiting for it go on to the next node on demand, and
"unreachable" means every node failed in turn. A node that refuses or resets
costs milliseconds; a silent one costs ``connect_timeout``, once per round.
A refused connect is never taken for a missing queue: that is only RabbitMQ
returning a message (``mandatory``), on a connection that is up.

A nack is answered "queue full" (``x-max-length`` with reject-publish), and the
channel is then reopened on the same connection, at most once per
`NACK_REOPEN_SPACING`: a channel opened on a survivor while a quorum queue
elects a new leader is nacked for as long as it lives (seen with RabbitMQ 3.10),
while a new one is acked once the election is over. The reopen waits for the
old channel's confirms (publishes meanwhile wait, as for a connect), so no
message is sent twice and none is left unanswered; a full queue costs one
channel a second.
"""

from __future__ import annotations

import collections
import enum
import functools
import logging
import random
import time
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from brownout._dispatch.publish_outcomes import RETRY_AFTER, PublishRejected, PublishRequest, RejectReason, resolve
from brownout._dispatch.queues import QueueDeclaration
from brownout._dispatch.rabbitmq_nodes import NodeRing
from brownout._redaction import mask_secrets

# The publisher's logger, as before the I/O thread had its own module: one name to configure.
log = logging.getLogger("brownout._dispatch.publisher")

RECONNECT_BASE_SECONDS = 0.5
RECONNECT_CAP_SECONDS = 5.0
ON_DEMAND_SPACING = 0.2  # at most 5 on-demand connects a second while RabbitMQ refuses
NACK_REOPEN_SPACING = 1.0  # at most one channel reopen a second after nacks (see the module docstring)
CLOSE_GRACE_SECONDS = 1.0  # close(): confirms still due and AMQP close-ok, then the socket is cut


class PublisherState(enum.Enum):
    """Where the publisher's connection is; see the module docstring."""

    NEW = "new"
    CONNECTING = "connecting"
    READY = "ready"
    BLOCKED = "blocked"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


def reconnect_delay(
    failures: int, *, rng: random.Random, base: float = RECONNECT_BASE_SECONDS, cap: float = RECONNECT_CAP_SECONDS
) -> float:
    """Seconds before the next connect after *failures* failed attempts in a row (0: the
    connection was just lost): doubling from *base* up to *cap*, jittered into its upper half
    so a fleet that lost RabbitMQ together does not come back in lockstep."""
    ceiling = min(cap, base * 2 ** min(failures, 32))
    return rng.uniform(ceiling / 2, ceiling)


def _cheap_failure(exc: BaseException, elapsed: float, connect_timeout: float) -> bool:
    """A connect that failed fast at the transport (refused, reset): trying again on demand costs
    RabbitMQ nothing. Timeouts, authentication and broker refusals wait for the backoff."""
    refusals = (
        pika.exceptions.AuthenticationError,
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.ProbableAccessDeniedError,
        pika.exceptions.ConnectionClosedByBroker,
    )
    return (
        isinstance(exc, pika.exceptions.AMQPConnectionError) and not isinstance(exc, refusals) and elapsed < connect_timeout / 2
    )


def _describe(exc: BaseException) -> str:
    """One line for logs and errors, password masked. pika's repr carries the cause chain
    (``AMQPConnectionError: (... ConnectionRefusedError(111, ...))``); its str is often empty."""
    if isinstance(exc, pika.exceptions.AMQPError):
        return mask_secrets(repr(exc))
    return mask_secrets(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class PublisherLink:
    """The connection state machine of one `Publisher`, driven by its I/O loop.

    Built by `Publisher` (nothing connects until `run`); `ioloop` is set by `Publisher.start()`
    before the thread starts.
    """

    def __init__(
        self,
        *,
        nodes: NodeRing,
        queue_name: str,
        declarations: tuple[QueueDeclaration, ...],
        confirm_timeout: float,
        connect_timeout: float,
        reconnect_base: float,
        reconnect_cap: float,
        rng: random.Random,
    ) -> None:
        self._nodes = nodes
        self._queue_name = queue_name
        self._declarations = declarations
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._reconnect_base = reconnect_base
        self._reconnect_cap = reconnect_cap
        self._rng = rng
        self._where = nodes.where  # every node, passwords masked
        self._node = ""  # the node of the attempt or connection in progress, masked
        # Shared with callers: appended to and set under the Publisher's lock.
        self.incoming: collections.deque[PublishRequest] = collections.deque()
        self.ioloop: IOLoop | None = None
        # Everything below belongs to the I/O thread (callers only read state).
        self.state = PublisherState.NEW
        self._stopped = False
        self._generation = 0  # bumped whenever a connection is given up: its late callbacks are ignored
        self._connection: Any = None
        self._channel: Any = None
        self._waiting: collections.deque[PublishRequest] = collections.deque()  # for the connection in progress
        self._unconfirmed: collections.OrderedDict[int, PublishRequest] = collections.OrderedDict()
        self._next_tag = 1
        self._failures = 0
        self._on_demand = True
        self._attempt_started = 0.0
        self._attempt_ended = 0.0
        self._next_attempt_at = 0.0
        self._reconnect_timer: Any = None
        self._watchdog: Any = None
        self._probe_timer: Any = None
        self._outage_logged = False
        self._reopening = False  # CONNECTING on a live connection: a new channel after nacks

    # Both sides: what a caller is told --------------------------------------

    def rejection(self, reason: RejectReason, detail: str = "") -> PublishRejected:
        if reason is RejectReason.UNREACHABLE:
            retry_after = min(self._reconnect_cap, max(1.0, self._next_attempt_at - time.monotonic()))
        else:
            retry_after = RETRY_AFTER[reason]
        return PublishRejected(reason, retry_after, detail)

    # I/O thread: requests ---------------------------------------------------

    def run(self) -> None:
        assert self.ioloop is not None  # noqa: S101 - narrows the type for mypy: the publisher sets ioloop before the I/O thread starts
        self._connect()
        while not self._stopped:
            try:
                self.ioloop.start()
            except Exception:  # a bug here or in pika: never let the thread die with callers waiting
                log.exception("RabbitMQ publisher I/O loop failed; dropping the connection")
                self._recover()
        closed = self.rejection(RejectReason.CLOSED)
        for request in [*self._waiting, *self._unconfirmed.values(), *self.incoming]:
            resolve(request, closed)
        self.ioloop.close()

    def _recover(self) -> None:
        try:
            if self.state is PublisherState.CLOSED:
                self._finish_shutdown()
            else:
                self._lost(RuntimeError("I/O loop error"), abort=True)
        except Exception:
            log.exception("RabbitMQ publisher could not recover; closing it")
            self._stopped = True
            self._set_state(PublisherState.CLOSED)

    def take_incoming(self) -> None:
        while self.incoming:
            request = self.incoming.popleft()
            if request.future.cancelled():
                continue
            state = self.state
            if state is PublisherState.READY:
                self._publish(request)
            elif state is PublisherState.CONNECTING:
                self._waiting.append(request)
            elif state is PublisherState.DISCONNECTED and self._on_demand:
                self._waiting.append(request)
                self._connect_soon()
            elif state is PublisherState.DISCONNECTED:
                resolve(request, self.rejection(RejectReason.UNREACHABLE, "reconnecting"))
            elif state is PublisherState.BLOCKED:
                resolve(request, self.rejection(RejectReason.BLOCKED))
            else:
                resolve(request, self.rejection(RejectReason.CLOSED))

    def _publish(self, request: PublishRequest) -> None:
        if not request.sent and not request.future.set_running_or_notify_cancel():
            return  # its caller gave up before it was sent: never sent
        request.sent = True
        request.returned = False
        try:
            self._channel.basic_publish(
                exchange="",
                routing_key=self._queue_name,
                body=request.body,
                properties=request.properties,
                mandatory=True,
            )
        except Exception as exc:  # channel or connection closing: its close callback follows
            resolve(request, self.rejection(RejectReason.UNREACHABLE, _describe(exc)))
            return
        self._unconfirmed[self._next_tag] = request
        self._next_tag += 1

    def _on_confirm(self, generation: int, channel: Any, frame: Any) -> None:
        if generation != self._generation or channel is not self._channel:
            return
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        settled: list[PublishRequest] = []
        if not method.multiple:
            request = self._unconfirmed.pop(method.delivery_tag, None)
            settled = [] if request is None else [request]
        while method.multiple and self._unconfirmed and next(iter(self._unconfirmed)) <= method.delivery_tag:
            settled.append(self._unconfirmed.popitem(last=False)[1])
        for request in settled:
            if not acked:
                resolve(request, self.rejection(RejectReason.QUEUE_FULL, f"nack from RabbitMQ (x-max-length {self._max_length})"))
            elif request.returned:
                resolve(request, self.rejection(RejectReason.UNROUTABLE, f"queue {self._queue_name!r} missing"))
            else:
                resolve(request)
        if not acked and settled:
            self._reopen_after_nack()
        if self._reopening and not self._unconfirmed and self._channel is channel:
            self._open_channel()

    def _reopen_after_nack(self) -> None:
        """Publishes wait (CONNECTING) while the channel's confirms come in; then `_open_channel`."""
        if self.state is not PublisherState.READY or time.monotonic() - self._attempt_ended < NACK_REOPEN_SPACING:
            return
        assert self.ioloop is not None  # noqa: S101 - narrows the type for mypy: runs on the I/O thread, after ioloop is set
        log.debug("RabbitMQ nacked a publish on %s: reopening the channel", self._node)
        self._reopening = True
        self._set_state(PublisherState.CONNECTING)
        self._attempt_started = time.monotonic()
        self._watchdog = self.ioloop.call_later(self._connect_timeout, functools.partial(self._on_watchdog, self._generation))

    def _open_channel(self) -> None:
        old, self._channel = self._channel, None
        try:
            old.close()
            self._connection.channel(on_open_callback=functools.partial(self._on_channel_open, self._generation))
        except Exception as exc:  # the connection is going: its close callback may follow, or not
            self._lost(exc, abort=True)

    def _on_return(self, generation: int, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """Basic.Return precedes the ack of the same message; the body (a unique message id) pairs them."""
        if generation != self._generation or channel is not self._channel:
            return
        for request in self._unconfirmed.values():
            if not request.returned and request.body == body:
                request.returned = True
                break
        log.warning("RabbitMQ returned a message (%s): declaring queue %r again", method.reply_text, self._queue_name)
        for declaration in self._declarations:
            channel.queue_declare(queue=declaration.name, durable=declaration.durable, arguments=declaration.arguments)

    @property
    def _max_length(self) -> Any:
        return self._declarations[0].arguments["x-max-length"]

    # I/O thread: connection ----------------------------------------------------

    def _connect_soon(self) -> None:
        """Bring the next attempt forward to now (or ON_DEMAND_SPACING after the last one)."""
        at = max(time.monotonic(), self._attempt_ended + ON_DEMAND_SPACING)
        if self._reconnect_timer is not None and self._next_attempt_at <= at:
            return
        self._schedule_connect(at - time.monotonic())

    def _schedule_connect(self, delay: float) -> None:
        assert self.ioloop is not None  # noqa: S101 - narrows the type for mypy: runs on the I/O thread, after ioloop is set
        if self._reconnect_timer is not None:
            self.ioloop.remove_timeout(self._reconnect_timer)
        self._next_attempt_at = time.monotonic() + delay
        self._reconnect_timer = self.ioloop.call_later(max(delay, 0.0), self._on_reconnect_timer)

    def _on_reconnect_timer(self) -> None:
        self._reconnect_timer = None
        self._connect()

    def _connect(self) -> None:
        assert self.ioloop is not None  # noqa: S101 - narrows the type for mypy: runs on the I/O thread, after ioloop is set
        if self._reconnect_timer is not None:  # brought forward: the scheduled attempt is moot
            self.ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        if self._stopped or self.state not in (PublisherState.NEW, PublisherState.DISCONNECTED):
            return
        node = self._nodes.next_node()  # one node per attempt, the next round the ring
        self._node = node.where
        self._generation += 1
        generation = self._generation
        self._set_state(PublisherState.CONNECTING)
        self._attempt_started = time.monotonic()
        # pika bounds TCP and AMQP; this also bounds DNS (pika's getaddrinfo has no timeout),
        # the channel, confirm.select and the declarations.
        self._watchdog = self.ioloop.call_later(self._connect_timeout, functools.partial(self._on_watchdog, generation))
        try:
            self._connection = pika.SelectConnection(
                parameters=node.parameters,
                on_open_callback=functools.partial(self._on_connection_open, generation),
                on_open_error_callback=functools.partial(self._on_open_error, generation),
                on_close_callback=functools.partial(self._on_connection_closed, generation),
                custom_ioloop=self.ioloop,
            )
        except Exception as exc:
            self._attempt_failed(exc)

    def _on_connection_open(self, generation: int, connection: Any) -> None:
        if generation != self._generation or self.state is PublisherState.CLOSED:
            connection.close()  # an attempt given up (watchdog, close()) that opened late
            return
        connection.add_on_connection_blocked_callback(functools.partial(self._on_blocked, generation))
        connection.add_on_connection_unblocked_callback(functools.partial(self._on_unblocked, generation))
        connection.channel(on_open_callback=functools.partial(self._on_channel_open, generation))

    def _on_channel_open(self, generation: int, channel: Any) -> None:
        if generation != self._generation:
            return
        self._channel = channel
        channel.add_on_close_callback(functools.partial(self._on_channel_closed, generation))
        channel.add_on_return_callback(functools.partial(self._on_return, generation))
        channel.confirm_delivery(ack_nack_callback=functools.partial(self._on_confirm, generation, channel))
        # Sent in order on the channel; pika sends each after the previous reply.
        last = len(self._declarations) - 1
        for index, declaration in enumerate(self._declarations):
            done = functools.partial(self._on_ready, generation) if index == last else (lambda _frame: None)
            channel.queue_declare(
                queue=declaration.name, durable=declaration.durable, arguments=declaration.arguments, callback=done
            )

    def _on_ready(self, generation: int, _frame: Any) -> None:
        if generation != self._generation:
            return
        self._cancel_watchdog()
        self._next_tag = 1  # delivery tags count per channel
        self._failures = 0
        self._on_demand = True
        self._attempt_ended = time.monotonic()
        self._outage_logged = False
        self._set_state(PublisherState.READY)
        self._reopening = False
        while self._waiting:
            self._publish(self._waiting.popleft())

    def _on_watchdog(self, generation: int) -> None:
        if generation != self._generation or self.state is not PublisherState.CONNECTING:
            return
        self._watchdog = None
        self._give_up(TimeoutError(f"no connection within {self._connect_timeout:.1f}s"), abort=True)

    def _on_open_error(self, generation: int, connection: Any, exc: BaseException) -> None:
        if self.state is PublisherState.CLOSED and connection is self._connection:
            self._finish_shutdown()
        elif generation == self._generation:
            self._attempt_failed(exc)

    def _on_connection_closed(self, generation: int, _connection: Any, exc: BaseException) -> None:
        if self.state is PublisherState.CLOSED and _connection is self._connection:
            self._finish_shutdown()
        elif generation != self._generation:
            return
        elif self.state is PublisherState.CONNECTING:  # closed by RabbitMQ while declaring
            self._give_up(exc, abort=False)
        else:
            self._lost(exc, abort=False)

    def _on_channel_closed(self, generation: int, channel: Any, exc: BaseException) -> None:
        if generation != self._generation or self.state is PublisherState.CLOSED or channel is not self._channel:
            return  # (a channel closed after a nack is no longer ours)
        if self.state is PublisherState.CONNECTING:  # e.g. PRECONDITION_FAILED on a declaration
            self._give_up(exc, abort=True)
        else:
            self._lost(exc, abort=True)

    def _on_blocked(self, generation: int, _connection: Any, frame: Any) -> None:
        if generation == self._generation and self.state is PublisherState.READY:
            log.warning("RabbitMQ blocked publishing (%s): publishes fail fast until it unblocks", frame.method.reason)
            self._set_state(PublisherState.BLOCKED)

    def _on_unblocked(self, generation: int, _connection: Any, _frame: Any) -> None:
        if generation == self._generation and self.state is PublisherState.BLOCKED:
            self._set_state(PublisherState.READY)

    def _give_up(self, exc: BaseException, *, abort: bool) -> None:
        """The attempt in progress failed: a connect's, or a channel's reopening on a live connection (lost)."""
        if self._reopening:
            self._lost(exc, abort=True)
            return
        if abort:
            self._abort()
        self._attempt_failed(exc)

    def _attempt_failed(self, exc: BaseException) -> None:
        self._generation += 1
        self._cancel_watchdog()
        self._connection = self._channel = None
        now = time.monotonic()
        self._attempt_ended = now
        delay = reconnect_delay(self._failures, rng=self._rng, base=self._reconnect_base, cap=self._reconnect_cap)
        self._failures += 1
        # Failures in a row count attempts on successive nodes: fewer than the nodes, and some node is untried.
        untried = self._failures % len(self._nodes) != 0
        self._on_demand = untried or _cheap_failure(exc, now - self._attempt_started, self._connect_timeout)
        self._schedule_connect(delay)
        self._set_state(PublisherState.DISCONNECTED)
        rejected = self.rejection(RejectReason.UNREACHABLE, _describe(exc))
        if untried and self._waiting:
            self._keep_waiting(rejected)
            self._connect_soon()  # the next node, for the publishes that wait
        else:
            self._fail_pending(rejected)
        if not self._outage_logged:
            self._outage_logged = True
            log.warning(
                "RabbitMQ at %s unreachable (%s); %s with backoff up to %.0fs",
                self._node,
                _describe(exc),
                f"trying the other nodes of {self._where}" if len(self._nodes) > 1 else "reconnecting",
                self._reconnect_cap,
            )
        else:
            log.debug(
                "RabbitMQ connect attempt %d failed at %s (%s); next in %.2fs", self._failures, self._node, _describe(exc), delay
            )

    def _lost(self, exc: BaseException, *, abort: bool) -> None:
        """An established connection is gone (or given up): reconnect, and send again what it
        carried unconfirmed while its callers still wait (at least once: the consumer applies a
        command once, by its id); fail the rest."""
        if abort:
            self._abort()
        self._generation += 1
        self._cancel_watchdog()
        self._cancel_probe()
        self._connection = self._channel = None
        self._failures = 0
        self._on_demand = True
        self._reopening = False
        log.warning("RabbitMQ connection to %s lost (%s); reconnecting", self._node, _describe(exc))
        self._schedule_connect(reconnect_delay(0, rng=self._rng, base=self._reconnect_base, cap=self._reconnect_cap))
        self._set_state(PublisherState.DISCONNECTED)
        now = time.monotonic()
        unconfirmed = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        error = self.rejection(RejectReason.UNREACHABLE, _describe(exc))
        for request in unconfirmed:
            if request.deadline <= now:
                resolve(request, error)
        self._waiting.extendleft(reversed([request for request in unconfirmed if request.deadline > now]))
        if self._waiting:
            self._connect_soon()

    def _keep_waiting(self, error: PublishRejected) -> None:
        """Keep the publishes waiting for the next attempt, failing those whose callers' deadline has passed."""
        now = time.monotonic()
        for request in [request for request in self._waiting if request.deadline <= now]:
            self._waiting.remove(request)
            resolve(request, error)

    def _fail_pending(self, error: PublishRejected) -> None:
        pending = [*self._waiting, *self._unconfirmed.values()]
        self._waiting.clear()
        self._unconfirmed.clear()
        for request in pending:
            resolve(request, error)

    def _abort(self) -> None:
        """Cut the current connection's socket now, without the AMQP close handshake that a
        silent peer never answers. pika has no public abort; `_terminate_stream` is what its own
        heartbeat checker calls (pika is pinned).

        A connection still opening is left alone: pika 1.4.4's ``close()`` during its connection
        workflow fails an assertion inside the I/O loop, and its own socket_timeout and
        stack_timeout (both connect_timeout) end the attempt anyway; its late callbacks are
        ignored (generation), and a late open is closed in `_on_connection_open`."""
        connection = self._connection
        if connection is None or connection.is_closed or not (connection.is_open or connection.is_closing):
            return
        try:
            connection._terminate_stream(pika.exceptions.ConnectionClosedByClient(320, "abandoned by publisher"))
        except Exception:
            log.debug("aborting a RabbitMQ connection failed", exc_info=True)

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None and self.ioloop is not None:
            self.ioloop.remove_timeout(self._watchdog)
        self._watchdog = None

    # I/O thread: liveness probe -----------------------------------------------

    def on_confirm_overdue(self) -> None:
        """A caller timed out on a sent message: open a channel; no answer means a dead link."""
        if self.state is not PublisherState.READY or self._probe_timer is not None or self.ioloop is None:
            return
        generation = self._generation
        self._probe_timer = self.ioloop.call_later(self._confirm_timeout, functools.partial(self._on_probe_timeout, generation))
        try:
            self._connection.channel(on_open_callback=functools.partial(self._on_probe_answer, generation))
        except Exception:
            self._cancel_probe()

    def _on_probe_answer(self, generation: int, channel: Any) -> None:
        if generation == self._generation:
            self._cancel_probe()
        if channel.is_open:
            channel.close()

    def _on_probe_timeout(self, generation: int) -> None:
        self._probe_timer = None
        if generation == self._generation and self.state is PublisherState.READY:
            self._lost(TimeoutError(f"no answer from RabbitMQ within {self._confirm_timeout:.1f}s"), abort=True)

    def _cancel_probe(self) -> None:
        if self._probe_timer is not None and self.ioloop is not None:
            self.ioloop.remove_timeout(self._probe_timer)
        self._probe_timer = None

    # I/O thread: state and shutdown ----------------------------------------------

    def _set_state(self, state: PublisherState) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        if state is PublisherState.READY and self._reopening:  # once a second while a queue stays full: not for INFO
            log.debug("RabbitMQ publisher's channel reopened on %s", self._node)
        elif state is PublisherState.READY and previous is PublisherState.CONNECTING:
            log.info("RabbitMQ publisher connected to %s (queue %r)", self._node, self._queue_name)
        elif state is PublisherState.READY:
            log.info("RabbitMQ unblocked publishing")
        elif state is PublisherState.CONNECTING and previous is PublisherState.DISCONNECTED:
            log.debug("RabbitMQ publisher reconnecting to %s", self._node)

    def shutdown(self) -> None:
        assert self.ioloop is not None  # noqa: S101 - narrows the type for mypy: runs on the I/O thread, after ioloop is set
        if self._reconnect_timer is not None:
            self.ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        self._cancel_watchdog()
        self._cancel_probe()
        self._set_state(PublisherState.CLOSED)
        closed = self.rejection(RejectReason.CLOSED)
        while self._waiting:
            resolve(self._waiting.popleft(), closed)
        connection = self._connection
        if connection is None or connection.is_closed:
            self._finish_shutdown()
            return
        if connection.is_open:
            connection.close()  # graceful: confirms already due arrive before close-ok
        # Still opening or closing: pika reports either end (_on_open_error, _on_connection_closed).
        self.ioloop.call_later(CLOSE_GRACE_SECONDS, self._finish_shutdown)

    def _finish_shutdown(self) -> None:
        if self._stopped or self.ioloop is None:
            return
        self._abort()
        self._generation += 1
        self._fail_pending(self.rejection(RejectReason.CLOSED))
        self._connection = self._channel = None
        self._stopped = True
        # Callbacks added now run next iteration, after the transport's own (which closes the socket).
        self.ioloop.add_callback_threadsafe(self.ioloop.stop)
        log.info("RabbitMQ publisher closed")
