"""A circuit breaker for the database: CLOSED -> OPEN -> HALF_OPEN -> CLOSED.

Why not pybreaker: it holds its lock for the whole guarded call (one slow
query blocks every thread), reads the wall clock and counts any exception.
Here the lock covers only state transitions, time comes from an injected
monotonic clock, and only transient failures (see `errors.classify`) count:
a permanent error (bad SQL, a constraint) neither opens nor resets it.

Protocol for a guarded call::

    permit = breaker.before_call()       # raises CircuitOpenError when refused
    try:
        result = fn()
    except Exception as exc:
        breaker.record_failure(permit, classify(exc))
        raise
    except BaseException:                # cancellation is never a failure
        breaker.release(permit)
        raise
    breaker.record_success(permit)

`permit` is 0 for an ordinary call and a positive id for the single HALF_OPEN
trial; a trial whose holder vanished is replaced after `open_seconds`, and the
late verdict of a replaced trial is ignored.

**Wary** (CLOSED, after a transient failure of this process's own): at most
one new call at a time goes to the database (its permit is negative) until a
call succeeds or the breaker opens; the others are refused at once, like an
OPEN breaker's refusals, so they take the degraded path. Without it, every
call a process starts between the database's failure and the breaker's
opening (locally, or as news from the fleet) reaches a dead database: with a
fleet breaker that was twice the threshold. The cost on a healthy database is
one round trip after a blip during which concurrent calls are refused.

An opening from CLOSED on this process's own failure is one Sentry event when
Sentry is on (src/brownout/_observability/incident_events.py); a failed trial
re-opening it is the same incident, and an operator's override none.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import TypeVar

from brownout._db.errors import CircuitOpenError, ErrorKind, classify
from brownout._observability import incident_events

log = logging.getLogger(__name__)
T = TypeVar("T")

NOT_TRIAL = 0
# What CircuitOpenError.retry_after says while another caller holds the trial (or the wary call).
_TRIAL_BUSY_RETRY_AFTER = 1.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerListener:
    """Hooks called after the fact, outside the breaker's lock. Override what you need."""

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        """Called after the state changed."""

    def on_failure(self, breaker: CircuitBreaker, kind: ErrorKind) -> None:
        """Called for each transient failure recorded."""

    def on_rejected(self, breaker: CircuitBreaker) -> None:
        """Called when a call is refused without touching the database."""


class CircuitBreaker:
    """Thread-safe breaker; see the module docstring for the call protocol."""

    def __init__(
        self,
        *,
        name: str = "database",
        failure_threshold: int = 5,
        open_seconds: float = 60.0,
        success_threshold: int = 2,
        open_jitter: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        listeners: Iterable[BreakerListener] = (),
        wary: bool = True,
    ) -> None:
        if failure_threshold < 1 or success_threshold < 1:
            raise ValueError("failure_threshold and success_threshold must be >= 1")
        if open_seconds <= 0 or not 0 <= open_jitter <= 1:
            raise ValueError("open_seconds must be > 0 and open_jitter within [0, 1]")
        self.name = name
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.success_threshold = success_threshold
        self.open_jitter = open_jitter
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter of the open period, not a secret
        self._listeners = list(listeners)
        self._lock = threading.Lock()
        # Read without the lock on the hot path: a stale read at worst lets one
        # more call through or refuses one, exactly as if it had come a moment earlier.
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._open_until = 0.0
        self._trial_id = 0
        self._trial_started = 0.0
        self._trial_active = False
        self._forced: BreakerState | None = None
        self.wary_after_failure = wary
        self._wary = False  # CLOSED after a failure of this process's own: one call at a time
        self._wary_permit = NOT_TRIAL  # the wary call in flight (negative), or none
        self._wary_seq = 0
        self._wary_started = 0.0

    # -- inspection ---------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def wary(self) -> bool:
        """CLOSED, after a failure of this process's own: one call at a time (see the module docstring)."""
        return self._wary

    @property
    def forced(self) -> BreakerState | None:
        """OPEN or CLOSED while an operator override is in force, else None."""
        return self._forced

    def retry_after(self) -> float:
        """Seconds until a call may be let through (0 when CLOSED)."""
        if self._state is BreakerState.OPEN:
            if self._forced is BreakerState.OPEN:
                return self.open_seconds
            return max(0.0, self._open_until - self._clock())
        if self._state is BreakerState.HALF_OPEN and self._trial_active:
            return _TRIAL_BUSY_RETRY_AFTER
        if self._state is BreakerState.CLOSED and self._wary and self._wary_permit != NOT_TRIAL:
            return _TRIAL_BUSY_RETRY_AFTER
        return 0.0

    def snapshot(self) -> dict[str, object]:
        """A consistent view for health output and logs."""
        with self._lock:
            return {
                "name": self.name,
                "state": self._state.value,
                "forced": self._forced.value if self._forced else None,
                "consecutive_failures": self._failures,
                "half_open_successes": self._successes,
                "wary": self._wary,
                "retry_after_seconds": round(self.retry_after(), 3),
            }

    def add_listener(self, listener: BreakerListener) -> None:
        self._listeners.append(listener)

    # -- the call protocol --------------------------------------------------

    def before_call(self, *, casualty: bool = False) -> int:
        """Return a permit (0, a trial id in HALF_OPEN, a negative id while wary); raise CircuitOpenError if
        refused. *casualty*: the retry of a call lost to an incident already counted (src/brownout/_db/incidents.py: an
        SSL kill dropping the pool), which goes to a fresh connection whether or not the breaker is wary."""
        if self._state is BreakerState.CLOSED and (not self._wary or casualty):
            return NOT_TRIAL
        return self._before_call_slow(casualty)

    def refuse_now(self) -> CircuitOpenError | None:
        """The refusal a call would get now, counted as one (listeners told), without taking a
        permit; None when a call could go through (CLOSED, or a trial is due). For callers that
        have somewhere else to go (a queue, a stale copy) and should not even try."""
        if (self._state is BreakerState.CLOSED and not self._wary) or self.retry_after() == 0:
            return None
        with self._lock:
            refused = self._refusal(self._clock())
        for listener in self._listeners:
            self._safely(listener.on_rejected, self)
        return refused

    def record_success(self, permit: int) -> None:
        if permit <= NOT_TRIAL:  # an ordinary call, or the wary one: the database answers
            if (self._failures or self._wary) and self._forced is None:
                with self._lock:
                    if self._state is BreakerState.CLOSED:
                        self._failures = 0
                        self._end_wary()
            return
        transition = None
        with self._lock:
            if permit != self._trial_id or not self._trial_active:
                return  # a replaced trial's late verdict
            self._trial_active = False
            self._successes += 1
            if self._successes >= self.success_threshold:
                transition = self._move(BreakerState.CLOSED)
        self._notify_transition(transition)

    def record_failure(self, permit: int, kind: ErrorKind) -> None:
        """Count a failure if *kind* is transient; a permanent one only releases the permit."""
        if not kind.is_transient:
            self.release(permit)
            return
        transition = None
        with self._lock:
            if self._forced is None:
                if permit > NOT_TRIAL:
                    if permit == self._trial_id and self._trial_active:
                        self._trial_active = False
                        transition = self._open()
                elif self._state is BreakerState.CLOSED:
                    self._failures += 1
                    if self._failures >= self.failure_threshold:
                        transition = self._open()
                    else:
                        self._become_wary(permit)
        for listener in self._listeners:
            self._safely(listener.on_failure, self, kind)
        self._notify_transition(transition)
        if transition == (BreakerState.CLOSED, BreakerState.OPEN):
            self._report_opening(kind, scope="process")

    def release(self, permit: int) -> None:
        """End a call with no verdict (permanent error, cancellation): free the trial slot."""
        if permit == NOT_TRIAL:
            return
        with self._lock:
            if permit < NOT_TRIAL:
                if permit == self._wary_permit:
                    self._wary_permit = NOT_TRIAL
            elif permit == self._trial_id:
                self._trial_active = False

    def call(self, fn: Callable[[], T]) -> T:
        """Run *fn* under the breaker (no retry)."""
        permit = self.before_call()
        try:
            result = fn()
        except Exception as exc:
            self.record_failure(permit, classify(exc))
            raise
        except BaseException:
            self.release(permit)
            raise
        self.record_success(permit)
        return result

    # -- operator overrides -------------------------------------------------

    def force_open(self) -> None:
        """Refuse every call until reset(): for planned maintenance or a known outage."""
        with self._lock:
            self._forced = BreakerState.OPEN
            transition = self._move(BreakerState.OPEN)
        self._notify_transition(transition)

    def force_closed(self) -> None:
        """Let every call through and count nothing until reset()."""
        with self._lock:
            self._forced = BreakerState.CLOSED
            transition = self._move(BreakerState.CLOSED)
        self._notify_transition(transition)

    def reset(self) -> None:
        """Back to a normal CLOSED breaker with clean counters."""
        with self._lock:
            self._forced = None
            transition = self._move(BreakerState.CLOSED)
        self._notify_transition(transition)

    # -- internals (the only place transitions happen) ----------------------

    def _before_call_slow(self, casualty: bool = False) -> int:
        transition = None
        with self._lock:
            now = self._clock()
            state = self._state
            if state is BreakerState.CLOSED:
                if not self._wary or self._forced is not None or casualty:
                    return NOT_TRIAL
                # The one call allowed while wary; a holder that vanished is replaced, as a trial's is.
                if self._wary_permit == NOT_TRIAL or now - self._wary_started >= self.open_seconds:
                    self._wary_seq -= 1
                    self._wary_permit = self._wary_seq
                    self._wary_started = now
                    return self._wary_permit
                refused = self._refusal(now)
            elif self._forced is None:
                if state is BreakerState.OPEN and now >= self._open_until:
                    transition = self._move(BreakerState.HALF_OPEN)
                    state = BreakerState.HALF_OPEN
                if state is BreakerState.HALF_OPEN and (not self._trial_active or now - self._trial_started >= self.open_seconds):
                    self._trial_id += 1
                    self._trial_active = True
                    self._trial_started = now
                    permit = self._trial_id
                    refused = None
                else:
                    refused = self._refusal(now)
            else:
                refused = self._refusal(now)
        self._notify_transition(transition)
        if refused is not None:
            for listener in self._listeners:
                self._safely(listener.on_rejected, self)
            raise refused
        return permit

    def _refusal(self, now: float) -> CircuitOpenError:
        if self._state is BreakerState.OPEN and self._forced is None:
            wait = max(0.0, self._open_until - now)
        elif self._state is BreakerState.OPEN:
            wait = self.open_seconds
        else:
            wait = _TRIAL_BUSY_RETRY_AFTER
        state = "wary" if self._state is BreakerState.CLOSED else self._state.value  # closed, one call at a time
        return CircuitOpenError(self.name, wait, state)

    def _open(self) -> tuple[BreakerState, BreakerState] | None:
        stretch = 1.0 + self.open_jitter * self._rng.random()
        self._open_until = self._clock() + self.open_seconds * stretch
        return self._move(BreakerState.OPEN)

    def _become_wary(self, permit: int) -> None:
        """A failure in CLOSED that did not open the breaker: one call at a time from now (lock held)."""
        if permit == self._wary_permit:
            self._wary_permit = NOT_TRIAL  # its verdict is in: the next call may go
        if self.wary_after_failure:
            self._wary = True

    def _end_wary(self) -> None:
        self._wary = False
        self._wary_permit = NOT_TRIAL

    def _move(self, new: BreakerState) -> tuple[BreakerState, BreakerState] | None:
        old = self._state
        self._failures = 0
        self._successes = 0
        self._trial_active = False
        self._end_wary()
        self._state = new
        return None if old is new else (old, new)

    def _report_opening(self, kind: ErrorKind, *, scope: str) -> None:
        """One Sentry event per opening this process's failure caused (a failed trial re-opening it is the same
        incident; an override is no incident): a no-op without Sentry."""
        incident_events.breaker_opened(
            breaker=self.name,
            kind=kind.value,
            scope=scope,
            failure_threshold=self.failure_threshold,
            open_seconds=self.open_seconds,
        )

    def _notify_transition(self, transition: tuple[BreakerState, BreakerState] | None) -> None:
        if transition is None:
            return
        old, new = transition
        log.warning("circuit breaker %r: %s -> %s", self.name, old.value, new.value)
        for listener in self._listeners:
            self._safely(listener.on_transition, self, old, new)

    @staticmethod
    def _safely(hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:  # a broken metrics hook must not break database calls
            log.exception("circuit breaker listener %r failed", hook)
