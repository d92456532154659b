"""Admission control: how much work a web process takes on at once, and whose work it refuses first.

Each process bounds its requests in flight with a limit that follows the process's own delay, never
its dependencies' latency:

- **Latency**: each admitted request's time in the process, from admission to its last byte sent. Past
  capacity, requests share one CPU and one GIL, so their time grows with their number: the queue the
  limit exists to bound. Every wait counts, the database's included, because a thread's database
  call is also where it waits for the GIL again (under overload a 2 ms query took 50 ms to be read).
- **Busy**: the process's CPU time over the interval. Latency counts against the limit only while the
  process uses at least `busy_cpu` of a core: a slow database with an idle process is not overload (the
  deadlines and the breaker own it), and the limit is not cut for it. A limit driven by latency alone
  (as Netflix's concurrency-limits) would read a slow database as overload and refuse writes the queue
  could have accepted.
- **Lag**: how late the event loop (and a plain thread) wakes from a short sleep. Requests are parsed,
  admitted and refused on that loop; a standing lag means even refusing costs time.
- **Decrease** (halve, floor `min_limit`) when the process is busy and an interval's median latency is
  above twice its baseline (the lowest median of the last `baseline_window`: the same requests with no
  queue, whatever they cost on this machine) and above `latency_floor`; or when even the interval's
  *smallest* lag is above `lag_target`: a standing delay, not one burst or one garbage collection
  (CoDel's rule: Nichols and Jacobson, "Controlling Queue Delay", 2012). A ratio to a measured baseline,
  as in TCP Vegas and Netflix's gradient limit, rather than a fixed time: a list read that costs 8 ms is
  not queueing at 8 ms. At most once per `interval`, judged only on requests admitted after the last
  decrease.
- **Increase** by one per tick while requests met the limit (refused or sent to the cache) and no
  signal is above its bound: the limit grows only when there is demand for it.

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
from collections import deque
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
    latency_floor: float = 0.002  # seconds: an interval's median latency below this is never queueing
    baseline_window: float = 10.0  # seconds over which the lowest median latency is the no-queue baseline
    busy_cpu: float = 0.5  # cores: below this CPU use over an interval the process is not overloaded
    lag_target: float = 0.005  # seconds of standing event-loop (or thread wake-up) delay
    interval: float = 0.1  # seconds: one verdict on the signals per interval
    tick: float = 0.02  # seconds between lag probes
    cache_headroom: float = 0.5  # cache-served reads admitted up to limit x (1 + headroom)
    min_samples: int = 5  # requests of an interval below which its own-time p90 is not judged

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {self.min_limit} and {self.max_limit}")
        if min(self.latency_floor, self.lag_target, self.interval, self.tick, self.baseline_window, self.busy_cpu) <= 0:
            raise ValueError("latency_floor, lag_target, interval, tick, baseline_window and busy_cpu must be > 0")
        if self.cache_headroom < 0:
            raise ValueError("cache_headroom must be >= 0")


class AdmissionControl:
    """The limit, the work in flight, and the verdict for each request."""

    def __init__(
        self,
        settings: AdmissionSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        """*cpu_clock*: this process's CPU seconds, all threads (tests inject one)."""
        self.settings = settings = settings or AdmissionSettings()
        self.clock = clock
        self._cpu_clock = cpu_clock
        self._interval_cpu = cpu_clock()
        self.limit = settings.max_limit  # start open: a healthy process serves its first burst
        self.in_flight = 0
        self.lag = 0.0  # the smallest lag of the last full interval
        self.latency = 0.0  # median time in the process of the requests of the last judged interval
        self.baseline = math.inf  # the lowest such median over the baseline window: their time with no queue
        self.cpu = 0.0  # cores the process used over the last interval
        self.on_change: Callable[[int, str], None] | None = None  # (new limit, why): logs and metrics
        self._saturated = False
        self._interval_started = clock()
        self._interval_min = math.inf
        self._latencies: list[float] = []
        self._medians: deque[tuple[float, float]] = deque()  # (when, median latency) of judged intervals
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

    def done(self, admitted_at: float | None = None) -> None:
        """A request admitted at *admitted_at* (this clock) is answered. Requests admitted before the last
        decrease are no evidence against the new limit (the burst that caused it) and are not judged."""
        self.in_flight -= 1
        if admitted_at is not None and admitted_at >= self._last_decrease:
            self._latencies.append(self.clock() - admitted_at)

    def observe_lag(self, lag: float) -> int:
        """One probe's lag (seconds late), once per tick: the verdict of an interval when one has passed."""
        now = self.clock()
        self._interval_min = min(self._interval_min, max(0.0, lag))
        if now - self._interval_started >= self.settings.interval:
            cpu = self._cpu_clock()
            self.cpu = (cpu - self._interval_cpu) / (now - self._interval_started)
            self.lag = self._interval_min
            judged = self._judge_latencies(now)
            self._interval_started, self._interval_min, self._latencies, self._interval_cpu = now, math.inf, [], cpu
            why = None
            if self.lag > self.settings.lag_target:
                why = f"event loop {self.lag * 1000:.0f} ms late"
            elif judged and self._queueing():
                why = f"busy ({self.cpu:.2f} cores) and requests take {self.latency / self.baseline:.1f}x their baseline"
            if why is not None and now - self._last_decrease >= self.settings.interval:
                self._last_decrease = now
                self._saturated = False
                self._set(max(self.settings.min_limit, self.limit // 2), why)
                return self.limit
        if self._saturated and lag <= self.settings.lag_target and not self._queueing():
            self._set(min(self.settings.max_limit, self.limit + 1), "demand above the limit")
        self._saturated = False
        return self.limit

    def threshold(self) -> float:
        """Median latency above which requests are queueing: twice the baseline, and at least the floor."""
        return max(self.settings.latency_floor, 2 * self.baseline)

    def _queueing(self) -> bool:
        return self.cpu >= self.settings.busy_cpu and self.latency > self.threshold()

    def _judge_latencies(self, now: float) -> bool:
        latencies = self._latencies
        if len(latencies) < self.settings.min_samples:
            return False
        self.latency = sorted(latencies)[len(latencies) // 2]
        medians = self._medians
        medians.append((now, self.latency))
        while medians and medians[0][0] < now - self.settings.baseline_window:
            medians.popleft()
        self.baseline = min(median for _, median in medians)
        return True

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
