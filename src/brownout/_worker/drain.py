"""Adaptive drain: replay a backlog as fast as the database allows, and no faster.

Dramatiq starts a fixed number of worker threads; `AdaptiveDrain` bounds how
many of them run a message at once with a `Limiter` whose limit an
`AimdController` moves (additive increase, multiplicative decrease, as TCP
congestion avoidance). For the command queue a "message" is a batch of
deliveries applied in one transaction (src/brownout/_worker/batched_delivery.py): the limit
is on batches in flight, and a batch's duration is its transaction's.

- **Increase** by 1 after a window of `window` successes whose p90 duration
  is within `latency_target`.
- **Halve** (floor `min_limit`) when a window's p90 exceeds the target, on a
  failed attempt (a transient failure the worker's breaker counts, reported
  through `AdaptiveDrain.breaker_listener`), or on a **stall**: a message in
  flight for longer than `stall_after` seconds. The stall is what reacts to a
  lock: nothing completes while every in-flight write waits, so completions
  alone would only tell after the lock is gone.
- **At most once per window**: only messages admitted after the last decrease
  are evidence against the new limit; outcomes of older ones (the burst that
  caused it) neither decrease nor count towards an increase. One lock or one
  failed burst halves once, it does not collapse the limit to the floor.
- **Slow start**: the limit starts at `min_limit` at boot, and falls back to
  it when a message meets DatabaseUnavailable (the health gate pauses) or
  the worker is paused; it then climbs again window by window.

What it cannot do: the retries of a message already in flight happen inside
`execute_with_retry` and are beyond admission control. A database that
refuses every statement (a `lock_timeout` shorter than a lock) fails each
in-flight write and each of its retries; with `in flight x attempts` at or
above the breaker's threshold, the breaker opens whatever the limit, and
rightly: every call is failing. The drain keeps its own load from pushing
latency into timeouts, and comes back slowly afterwards.

The controller is pure logic on an injected clock (not thread-safe: the
middleware calls it under its lock). Waiting for a permit is in slices and
ends at worker shutdown, when the message is let through: it must be
processed or left unacked, never skipped (a skipped message is acked).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from brownout._db import CircuitBreaker, Database
from brownout._db.circuit_breaker import BreakerListener
from brownout._db.errors import ErrorKind
from brownout._worker.health_gate import DatabaseUnavailable

log = logging.getLogger(__name__)

_WAIT_SLICE_SECONDS = 0.1  # how often a thread waiting for a permit looks at the stop flag


class AimdController:
    """The limit and its rules (see the module docstring); every method returns the limit."""

    def __init__(
        self,
        *,
        min_limit: int = 1,
        max_limit: int = 8,
        latency_target: float = 0.1,
        window: int = 20,
        stall_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        history_size: int = 10_000,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {min_limit} and {max_limit}")
        if latency_target <= 0 or window < 1:
            raise ValueError("latency_target must be > 0 and window >= 1")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.latency_target = latency_target
        self.window = window
        self.stall_after = 10 * latency_target if stall_after is None else stall_after
        self._clock = clock
        self.limit = min_limit
        self._durations: list[float] = []
        self._last_decrease = -math.inf
        self.history: deque[tuple[float, int]] = deque([(clock(), min_limit)], maxlen=history_size)

    def on_success(self, started: float) -> int:
        """A message admitted at *started* (a clock reading) completed now."""
        if started < self._last_decrease:
            return self.limit  # admitted under an older, larger limit
        self._durations.append(self._clock() - started)
        if len(self._durations) >= self.window:
            if p90(self._durations) > self.latency_target:
                return self._decrease("p90 latency above target")
            self._durations.clear()
            self._set(min(self.max_limit, self.limit + 1))
        return self.limit

    def on_failure(self, started: float) -> int:
        """A message admitted at *started* failed an attempt (a transient failure)."""
        if started < self._last_decrease:
            return self.limit
        return self._decrease("failure")

    def on_tick(self, in_flight: Iterable[float]) -> int:
        """Look at the admission times of the messages in flight: a stall decreases."""
        now = self._clock()
        eligible = [started for started in in_flight if started >= self._last_decrease]
        if eligible and now - min(eligible) > self.stall_after:
            return self._decrease("stall")
        return self.limit

    def restart(self) -> int:
        """Back to `min_limit` (slow start): the database went away or the worker paused."""
        self._last_decrease = self._clock()
        self._durations.clear()
        self._set(self.min_limit)
        return self.limit

    def _decrease(self, why: str) -> int:
        self._last_decrease = self._clock()
        self._durations.clear()
        if self._set(max(self.min_limit, self.limit // 2)):
            log.info("adaptive drain: limit down to %d (%s)", self.limit, why)
        return self.limit

    def _set(self, limit: int) -> bool:
        if limit == self.limit:
            return False
        self.limit = limit
        self.history.append((self._clock(), limit))
        return True


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


class Limiter:
    """A counting semaphore whose limit can change; `close()` releases every waiter."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._limit = limit
        self._in_use = 0
        self._closed = False
        self.peak = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    def set_limit(self, limit: int) -> None:
        with self._cond:
            grew = limit > self._limit
            self._limit = limit
            if grew:
                self._cond.notify_all()

    def acquire(self, *, timeout: float | None = None, slice_seconds: float = _WAIT_SLICE_SECONDS) -> bool:
        """Take a permit; False when closed or after *timeout* seconds. Waits in slices."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._in_use >= self._limit:
                if self._closed:
                    return False
                wait = slice_seconds
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                self._cond.wait(wait)
            self._in_use += 1
            self.peak = max(self.peak, self._in_use)
            return True

    def release(self) -> None:
        with self._cond:
            if self._in_use <= 0:
                raise RuntimeError("Limiter.release() without a permit")
            self._in_use -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False


class _AttemptFailures(BreakerListener):
    def __init__(self, drain: AdaptiveDrain) -> None:
        self._drain = drain

    def on_failure(self, breaker: CircuitBreaker, kind: ErrorKind) -> None:
        """Called in the thread whose attempt failed."""
        self._drain.attempt_failed()


class AdaptiveDrain(Middleware):
    """Bound the messages processed at once by an AIMD limit; see the module docstring.

    *actor_names*, when given, are the only actors limited (the database's;
    an email job's SMTP latency says nothing about the database).

    Add `breaker_listener` to the worker's breaker (`for_database` does) so
    failed attempts, retried or not, count as failures.
    """

    def __init__(
        self,
        *,
        min_concurrency: int = 1,
        max_concurrency: int = 8,
        latency_target: float = 0.1,
        window: int = 20,
        stall_after: float | None = None,
        tick_seconds: float = 0.05,
        actor_names: Iterable[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.actor_names = None if actor_names is None else frozenset(actor_names)
        self.controller = AimdController(
            min_limit=min_concurrency,
            max_limit=max_concurrency,
            latency_target=latency_target,
            window=window,
            stall_after=stall_after,
            clock=clock,
        )
        self.limiter = Limiter(self.controller.limit)
        self.breaker_listener: BreakerListener = _AttemptFailures(self)
        self.tick_seconds = tick_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[int, float] = {}  # thread id -> admission time
        self._local = threading.local()
        self.stopping = threading.Event()
        """Set at worker shutdown, before waiting threads are let through (the apply actor then starts no batch)."""
        self._thread: threading.Thread | None = None
        self._was_paused = False

    @classmethod
    def for_database(cls, database: Database, **options: Any) -> AdaptiveDrain:
        drain = cls(**options)
        database.breaker.add_listener(drain.breaker_listener)
        return drain

    @property
    def limit(self) -> int:
        return self.controller.limit

    @property
    def history(self) -> list[tuple[float, int]]:
        """(clock reading, limit) at boot and at every change."""
        with self._lock:
            return list(self.controller.history)

    # -- Dramatiq hooks ---------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Start the ticker (stall and pause detection)."""
        self.limiter.reopen()
        self.stopping.clear()
        self._thread = threading.Thread(target=self._run, args=(worker,), name="brownout-adaptive-drain", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Let every waiting thread through and stop the ticker."""
        self.stopping.set()
        self.limiter.close()
        if self._thread is not None:
            self._thread.join(5)

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        """Wait for a permit; at shutdown, go ahead without one."""
        self._local.started = None
        if self.actor_names is not None and message.actor_name not in self.actor_names:
            return
        if not self.limiter.acquire():
            return
        started = self._clock()
        self._local.started = started
        with self._lock:
            self._in_flight[threading.get_ident()] = started

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        """Release the permit and report the outcome."""
        started = self._release()
        if started is None:
            return
        with self._lock:
            if exception is None:
                limit = self.controller.on_success(started)
            elif isinstance(exception, DatabaseUnavailable):
                limit = self.controller.restart()
            else:
                limit = self.controller.on_failure(started)
            self.limiter.set_limit(limit)

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        """Release the permit; a skipped message says nothing about the database."""
        self._release()

    # -- signals from elsewhere ---------------------------------------------------

    def attempt_failed(self) -> None:
        """A transient failure in this thread: count it if the thread holds a permit."""
        started = getattr(self._local, "started", None)
        if started is None:
            return
        with self._lock:
            self.limiter.set_limit(self.controller.on_failure(started))

    def tick(self, worker: dramatiq.Worker | None = None) -> None:
        """Stall check, and slow start once a pause of *worker* is seen."""
        paused = worker is not None and any(consumer.paused for consumer in worker.consumers.values())
        with self._lock:
            if paused and not self._was_paused:
                limit = self.controller.restart()
            else:
                limit = self.controller.on_tick(self._in_flight.values())
            self._was_paused = paused
            self.limiter.set_limit(limit)

    # -- internals --------------------------------------------------------------

    def _release(self) -> float | None:
        started: float | None = getattr(self._local, "started", None)
        if started is None:
            return None
        self._local.started = None
        with self._lock:
            self._in_flight.pop(threading.get_ident(), None)
        self.limiter.release()
        return started

    def _run(self, worker: dramatiq.Worker) -> None:
        while not self.stopping.wait(self.tick_seconds):
            try:
                self.tick(worker)
            except Exception:  # pragma: no cover - a bug here must not stop the worker
                log.exception("adaptive drain: tick failed")
