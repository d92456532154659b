"""Admission control: how much work a web process takes on at once, and whose work it refuses first.

Each process bounds its requests in flight with a limit that follows the process's own delay, never
its dependencies' latency:

- **The signal** is the event loop's lag: a probe sleeps `tick` seconds and measures how late it wakes.
  Requests are parsed, admitted and answered on that loop, and the loop's thread competes for the GIL
  with the threads running routes, so its lag is the queueing delay every request pays inside the
  process (CPU starvation, the GIL, too many threads). A slow database does not show here (its waits
  release the GIL); the request deadlines and the breaker own that. A limit driven by end-to-end
  latency (as Netflix's concurrency-limits) would read a slow database as overload and shed critical
  writes that the queue could have accepted.
- **Decrease** (halve, floor `min_limit`) when even the *smallest* lag seen over `interval` is above
  `lag_target`: a standing delay, not one burst or one garbage collection (CoDel's rule: Nichols and
  Jacobson, "Controlling Queue Delay", 2012). At most once per `interval`.
- **Increase** by one per tick while requests met the limit (refused or sent to the cache) and the
  loop is not lagging: the limit grows only when there is demand for it.

Criticality decides who is turned away first: a request is admitted while the work in flight is below
its level's share of the limit (critical 1, sheddable 3/4, optional 1/2), so optional routes stop first,
then list-like reads, and writes and item reads last. A read whose route is served from the cache is
admitted past its share (up to `cache_headroom` above the limit) with its database work shed: a fresh
entry is served as usual, an older one marked stale, a miss is 503 (the brownout dimmer: under
overload, stale beats failed). Everything else is refused at once with 503 and Retry-After, before any
of its work (body, authentication, thread pool).

Pure logic on an injected clock; used from the event loop's thread only, so it needs no lock.
"""

from __future__ import annotations

import contextvars
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


class Criticality(enum.StrEnum):
    """How much a route matters when the process cannot serve everything."""

    CRITICAL = "critical"  # writes, item reads: refused last (the default)
    SHEDDABLE = "sheddable"  # list reads and the like: refused before critical work
    OPTIONAL = "optional"  # stats, suggestions: refused first
    EXEMPT = "exempt"  # health probes, metrics: never refused (keep them cheap)


SHARES = {Criticality.CRITICAL: 1.0, Criticality.SHEDDABLE: 0.75, Criticality.OPTIONAL: 0.5}


class Verdict(enum.Enum):
    ADMIT = "admit"
    CACHE_ONLY = "cache_only"  # admitted with its database work shed: served from the cache or 503
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    min_limit: int = 4
    max_limit: int = 32
    lag_target: float = 0.010  # seconds of standing event-loop delay
    interval: float = 0.1  # seconds over which the smallest lag is taken
    tick: float = 0.02  # seconds between lag probes
    cache_headroom: float = 0.5  # cache-served reads admitted up to limit x (1 + headroom)

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {self.min_limit} and {self.max_limit}")
        if self.lag_target <= 0 or self.interval <= 0 or self.tick <= 0 or self.cache_headroom < 0:
            raise ValueError("lag_target, interval and tick must be > 0, cache_headroom >= 0")


class AdmissionControl:
    """The limit, the work in flight, and the verdict for each request."""

    def __init__(self, settings: AdmissionSettings | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings = settings or AdmissionSettings()
        self._clock = clock
        self.limit = settings.max_limit  # start open: a healthy process serves its first burst
        self.in_flight = 0
        self.lag = 0.0  # the smallest lag of the last full interval
        self.on_change: Callable[[int, str], None] | None = None  # (new limit, why): logs and metrics
        self._saturated = False
        self._interval_started = clock()
        self._interval_min = math.inf
        self._last_decrease = -math.inf

    def admit(self, criticality: Criticality, *, cached: bool = False) -> Verdict:
        """The verdict for one request; ADMIT and CACHE_ONLY count it in flight until `done()`."""
        if criticality is Criticality.EXEMPT:
            return Verdict.ADMIT
        if self.in_flight < self.limit * SHARES[criticality]:
            self.in_flight += 1
            return Verdict.ADMIT
        self._saturated = True
        if cached and self.in_flight < self.limit * (1 + self.settings.cache_headroom):
            self.in_flight += 1
            return Verdict.CACHE_ONLY
        return Verdict.REFUSE

    def done(self) -> None:
        self.in_flight -= 1

    def observe_lag(self, lag: float) -> int:
        """One probe's lag (seconds late); returns the limit."""
        now = self._clock()
        self._interval_min = min(self._interval_min, max(0.0, lag))
        if now - self._interval_started >= self.settings.interval:
            self.lag = self._interval_min
            self._interval_started, self._interval_min = now, math.inf
            if self.lag > self.settings.lag_target and now - self._last_decrease >= self.settings.interval:
                self._last_decrease = now
                self._saturated = False
                self._set(max(self.settings.min_limit, self.limit // 2), f"event loop {self.lag * 1000:.0f} ms late")
                return self.limit
        if self._saturated and lag <= self.settings.lag_target:
            self._set(min(self.settings.max_limit, self.limit + 1), "demand above the limit")
        self._saturated = False
        return self.limit

    def _set(self, limit: int, why: str) -> None:
        if limit != self.limit:
            self.limit = limit
            if self.on_change is not None:
                self.on_change(limit, why)


# Set by the admission gate for a request admitted with its database work shed (Verdict.CACHE_ONLY);
# read by the stale reads, which then answer from the cache alone. Copied into the thread pool with
# the request's context.
_database_shed: contextvars.ContextVar[bool] = contextvars.ContextVar("brownout_database_shed", default=False)


def database_shed() -> bool:
    """True inside a request admitted on condition that it asks nothing of the database."""
    return _database_shed.get()


def shed_database_work() -> contextvars.Token[bool]:
    return _database_shed.set(True)


def restore(token: contextvars.Token[bool]) -> None:
    _database_shed.reset(token)
