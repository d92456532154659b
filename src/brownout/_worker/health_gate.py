"""The worker's health gate: while the database is down, consume nothing.

Invariant 5 (an outage does not poison the queue). Letting Dramatiq's
Retries middleware handle an outage would cycle every message through the
delay queue (a republish to ``Q.DQ`` and back to the tail: the backlog is
rewritten on every cycle and reordered under jitter), spend ``max_retries``
and finally dead-letter writes that did nothing wrong. Holding a delivered
message until the database is back is no better: RabbitMQ closes a channel
whose delivery stays unacked past ``consumer_timeout`` (30 min) and
Dramatiq's TimeLimit interrupts the actor after 10 min, spending a retry. So
the gate *pauses consumption* and the backlog waits where it is, in order.

How, with Dramatiq 2.2.1 (read from its ``worker.py`` and RabbitMQ broker):

- ``ConsumerThread.pause()`` makes the consumer leave its loop at the next
  idle tick, **close its AMQP connection** and sleep. Closing the channel is
  what returns every unacked delivery to RabbitMQ (the RabbitMQ consumer's
  ``requeue()`` is a no-op for that reason), put back at its original place
  in the queue. Nothing is nacked or republished.
- Prefetched messages already on the worker's in-memory ``work_queue`` stay
  there across a pause: after ``resume()`` they would be processed and acked
  with delivery tags of the closed channel (tags restart at 1 on the new one,
  so such an ack can hit another message). Once every consumer and worker
  thread is paused, the gate drains the work queue: those messages are back
  in RabbitMQ already, exactly as ``Worker.stop()`` treats them.
- ``Worker.pause()`` waits on every thread's ``paused_event`` without a
  timeout, so the gate pauses the children itself and waits on them in short
  steps: a SIGTERM (``before_worker_shutdown``) always gets through.

A message that fails because the database is unreachable raises
`DatabaseUnavailable` from the actor (see `unavailable_as_hold`), and the
actor declares ``throws=(DatabaseUnavailable,)``: Retries then neither spends
a retry nor schedules a delay, it marks the message failed. The gate then
(1) keeps Dramatiq from nacking it into the dead-letter queue (the delivery
tag is withdrawn from the consumer's ``known_tags``; Dramatiq logs "Failed to
nack message: not in known tags" and sends nothing), (2) wakes its thread,
which pauses the worker at once, without waiting for its own check. The held
delivery goes back to RabbitMQ when the pause closes the channel: it is
unacked for one pause (the idle tick plus Dramatiq's 3 s consumer restart
delay), never for the outage. Rejecting it with ``requeue=True`` at once was
the alternative; RabbitMQ would hand it straight back to this consumer, and
every worker thread would spin on the head of the queue until the pause.

The check is a ``SELECT 1`` on its own session with its own deadline
(`check_db_health`), never through the breaker: it is how the worker learns
the database is back. A passing check is also the breaker's recovery probe,
when the breaker is open or half-open and not forced:

- the worker's own breaker (``BROWNOUT_BREAKER_BACKEND=local``) is closed:
  otherwise every resumed message would meet CircuitOpenError until the
  breaker's own timer ran out and pause the worker again;
- the fleet's breaker (``redis``) is only told the probe passed
  (`SharedBreaker.on_health`: OPEN -> HALF_OPEN when probe-gated). Its trials
  and success threshold close it, for every process: one worker's passing
  ``SELECT 1`` must not close, for the whole fleet, a breaker the web opened
  on a database that answers ``SELECT 1`` but fails real work. A refusal while
  the fleet is HALF_OPEN (another process holds the trial) holds the batch and
  pauses, but is no strike: it says nothing about the database.

A breaker forced open by an operator keeps the gate closed, and so does read-only mode (*hold*): while it
stands the gate pauses without checking the database or counting strikes, and `check_now()` (told by the
mode's change) makes it resume at once when it ends.

Timing: while healthy, one check every ``base_seconds``. While paused, wait
before check n drawn uniformly from [nominal/2, nominal], nominal =
min(cap, base * 2**(n-1)): capped exponential with "equal jitter", never
zero, so a fleet of workers that lost the database together does not probe
it together. The count of strikes (failed checks and trips) is reset only by
a message processed without DatabaseUnavailable, so a message that fails
transiently while ``SELECT 1`` passes backs the gate off up to the cap
instead of pausing and resuming in a tight loop.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from brownout._db import CircuitBreaker, CircuitOpenError, Database, DeadlineExceeded, check_db_health, classify, describe
from brownout._db.circuit_breaker import BreakerState
from brownout._db.health_check import DEFAULT_TIMEOUT_SECONDS, invalidate_pool
from brownout._fleet.shared_breaker import SharedBreaker

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1  # how often a pause in progress looks at the stop flag


class DatabaseUnavailable(Exception):
    """Raised by an actor when its write failed because the database cannot be reached; the gate holds it."""


def is_unavailability(exc: BaseException) -> bool:
    """True when *exc* says the database is unreachable, not that the write is wrong.

    The breaker's refusal, a spent deadline, or any transient failure left
    after `execute_with_retry`'s schedule.
    """
    if isinstance(exc, (DatabaseUnavailable, CircuitOpenError, DeadlineExceeded)):
        return True
    return isinstance(exc, Exception) and classify(exc).is_transient


def _refused_by_a_trial_elsewhere(exc: BaseException) -> bool:
    """A HALF_OPEN breaker refused the call: another process holds the trial. Not news about the database."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CircuitOpenError):
            return seen.state == BreakerState.HALF_OPEN.value
        seen = seen.__cause__
    return False


@contextmanager
def unavailable_as_hold() -> Iterator[None]:
    """Raise DatabaseUnavailable (cause: the original) for every unavailability escaping the block."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if is_unavailability(exc):
            raise DatabaseUnavailable(describe(exc)) from exc
        raise


def select_one(database: Database, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Callable[[], bool]:
    """A check: `SELECT 1` on a session of *database*, within *timeout*; a failure invalidates the pool."""

    def check() -> bool:
        with database.session() as db:
            result = check_db_health(db, timeout=timeout)
        if not result["healthy"]:
            log.warning("health gate: database check failed (%s): %s", result["error_kind"], result["error"])
            invalidate_pool(database.engine)
        return bool(result["healthy"])

    return check


class HealthGate(Middleware):
    """Pause the worker while *check* fails; see the module docstring.

    *check* returns True when the database answers (it may raise: that counts
    as False). *breaker*, when given, is the worker's own: closed after a
    passing check, and when forced OPEN it keeps the gate closed. *hold*,
    when given, is asked before each check: True keeps the gate closed
    (read-only mode) with no check and no strike.
    """

    def __init__(
        self,
        check: Callable[[], bool],
        *,
        breaker: CircuitBreaker | None = None,
        hold: Callable[[], bool] | None = None,
        base_seconds: float = 1.0,
        cap_seconds: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < base_seconds <= cap_seconds:
            raise ValueError(f"need 0 < base_seconds <= cap_seconds, got {base_seconds} and {cap_seconds}")
        self._check = check
        self._breaker = breaker
        self._hold = hold
        self._held_last = False
        self.base_seconds = base_seconds
        self.cap_seconds = cap_seconds
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not a secret
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._tripped = threading.Event()
        self._strike_trip = True
        self._held = threading.local()
        self._worker: dramatiq.Worker | None = None
        self._thread: threading.Thread | None = None
        self.paused = False
        self.strikes = 0
        self.pauses = 0
        self.held = 0

    @classmethod
    def for_database(
        cls,
        database: Database,
        *,
        base_seconds: float = 1.0,
        cap_seconds: float = 60.0,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        rng: random.Random | None = None,
        hold: Callable[[], bool] | None = None,
    ) -> HealthGate:
        return cls(
            select_one(database, timeout=timeout),
            breaker=database.breaker,
            hold=hold,
            base_seconds=base_seconds,
            cap_seconds=cap_seconds,
            rng=rng,
        )

    @property
    def running(self) -> bool:
        """True while the gate thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wait_before_check(self, strike: int) -> float:
        """Seconds to wait before the check that follows strike number *strike* (1-based)."""
        nominal = min(self.cap_seconds, self.base_seconds * 2.0 ** (strike - 1))
        return self._rng.uniform(nominal / 2, nominal)

    def check_now(self) -> None:
        """Run the next check at once (the operator lifted an override or changed the mode: no need to wait
        out the backoff)."""
        self._wake.set()

    def trip(self, *, strike: bool = True) -> None:
        """Pause now: an actor found the database unreachable (*strike*: count it towards the backoff)."""
        self._strike_trip = strike
        self._tripped.set()
        self._wake.set()

    # -- Dramatiq hooks ---------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Start the gate thread; its first check runs at once."""
        self._worker = worker
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, args=(worker,), name="brownout-health-gate", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop the gate thread: it returns within one check's deadline."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(DEFAULT_TIMEOUT_SECONDS + 5)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        """Hold a message that met DatabaseUnavailable and trip the gate; a success clears the strikes."""
        if isinstance(exception, DatabaseUnavailable):
            throws = message.options.get("throws") or broker.get_actor(message.actor_name).options.get("throws")
            if not (isinstance(throws, (type, tuple)) and issubclass(DatabaseUnavailable, throws)):
                log.error("actor %s must declare throws=(DatabaseUnavailable,): Retries spends a retry", message.actor_name)
            self._held.message = message
            self.held += 1
            log.info("message %s held: the database is unavailable (%s)", message.message_id, exception)
            self.trip(strike=not _refused_by_a_trial_elsewhere(exception))
        elif exception is None:
            self.strikes = 0

    def before_nack(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        """Keep a held message out of the dead-letter queue: the pause returns it to the queue."""
        if getattr(self._held, "message", None) is not message:
            return
        self._held.message = None
        consumer = self._consumer_of(message)
        known_tags = getattr(consumer, "known_tags", None)
        if isinstance(known_tags, set):
            known_tags.discard(getattr(message, "_tag", None))
        else:  # pragma: no cover - a broker other than RabbitMQ
            log.error("health gate cannot hold message %s on %r: it will be dead-lettered", message.message_id, consumer)

    # -- the gate thread --------------------------------------------------------

    def _run(self, worker: dramatiq.Worker) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            tripped = self._tripped.is_set()
            self._tripped.clear()
            strike = True
            held = self._hold is not None and self._hold()
            if held:  # read-only mode: nothing to learn from the database, nothing to count against it
                healthy, strike = False, False
            elif tripped and not self.paused:
                healthy, strike = False, self._strike_trip
            else:
                healthy = self.probe()
            if self._stopping.is_set():
                return
            if healthy:
                if self.paused:
                    worker.resume()
                    self.paused = False
                    log.warning("health gate: %s; consuming again", "writes allowed" if self._held_last else "database is back")
                self._held_last = False
                delay = self.base_seconds
            else:
                if strike:
                    self.strikes += 1
                self._held_last = held
                if not self.paused:
                    if held:
                        log.warning("health gate: read-only mode; pausing consumption, queued writes wait in RabbitMQ")
                    else:
                        log.warning("health gate: database unavailable; pausing consumption")
                    if not self._pause(worker):
                        return
                delay = self.base_seconds if held else self.wait_before_check(max(1, self.strikes))
            self._wake.wait(delay)

    def probe(self) -> bool:
        """Run the check once; True when the database answers. A pass is the breaker's recovery probe."""
        breaker = self._breaker
        if breaker is not None and breaker.forced is BreakerState.OPEN:
            return False
        try:
            healthy = self._check()
        except Exception:
            log.exception("health gate: the check itself failed")
            return False
        if healthy and breaker is not None and breaker.forced is None and breaker.state is not BreakerState.CLOSED:
            if isinstance(breaker, SharedBreaker) and breaker.shared:
                breaker.on_health({"healthy": True})  # the fleet's trials decide, not this SELECT 1
            else:
                breaker.reset()
        return healthy

    def _pause(self, worker: dramatiq.Worker) -> bool:
        """Worker.pause(), interruptible, then drop the prefetched messages. False when stopping."""
        children: list[Any] = [*worker.consumers.values(), *worker.workers]
        for child in children:
            child.pause()
        self.paused = True
        for child in children:
            while not child.paused_event.wait(_POLL_SECONDS):
                if self._stopping.is_set():
                    return False
                if not child.is_alive():
                    break
        dropped = 0
        while True:  # as Worker.stop() does; the closed channels returned these to RabbitMQ
            try:
                worker.work_queue.get_nowait()
            except queue.Empty:
                break
            worker.work_queue.task_done()
            dropped += 1
        self.pauses += 1
        log.info("health gate: paused; %d prefetched message(s) returned to RabbitMQ", dropped)
        return True

    def _consumer_of(self, message: dramatiq.MessageProxy) -> object:
        worker = self._worker
        thread = worker.consumers.get(message.queue_name) if worker is not None else None
        return getattr(thread, "consumer", None)
