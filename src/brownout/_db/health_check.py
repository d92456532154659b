"""`SELECT 1` health checks: one-off, rate-limited, and a background monitor.

The check never goes through the breaker: it is how we learn the database is
back, so it must run while the breaker refuses everything else. It has its
own deadline (the wait callback enforces it, connect included) and, when it
fails, the monitor invalidates the pool so no request inherits a connection
that died with the outage.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from brownout._db.deadline import deadline_scope
from brownout._db.errors import classify, describe
from brownout._db.retry import RESILIENCE_KEY

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 2.0


def pool_figures(engine: Engine) -> dict[str, int]:
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return {}
    figures = {
        "size": pool.size(),
        "checked_out": pool.checkedout(),
        "overflow": max(0, pool.overflow()),
        "checked_in": pool.checkedin(),
    }
    # The pool's limit above its size; QueuePool keeps it only privately, -1 when unbounded (pool_size 0).
    max_overflow = getattr(pool, "_max_overflow", -1)
    if max_overflow >= 0:
        figures["max_overflow"] = max_overflow
    return figures


def check_db_health(db: Session, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> dict[str, Any]:
    """Run `SELECT 1` within *timeout* seconds and describe the result.

    Returns `healthy`, `latency_ms`, `error` (password masked, None when
    healthy), `error_kind`, `breaker` (a snapshot, when the session has one)
    and `pool` figures. Never raises for a database failure.
    """
    start = time.monotonic()
    error: str | None = None
    kind: str | None = None
    try:
        with deadline_scope(start + timeout):
            db.execute(text("SELECT 1")).scalar_one()
        db.rollback()
    except Exception as exc:
        kind = classify(exc).value
        error = describe(exc)
        try:
            db.rollback()
        except Exception:
            db.close()
    latency_ms = round((time.monotonic() - start) * 1000, 2)
    resilience = db.info.get(RESILIENCE_KEY)
    return {
        "healthy": error is None,
        "latency_ms": latency_ms,
        "error": error,
        "error_kind": kind,
        "breaker": resilience.breaker.snapshot() if resilience is not None else None,
        "pool": pool_figures(engine_of(db)),
    }


def engine_of(db: Session) -> Engine:
    bind = db.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def invalidate_pool(engine: Engine) -> None:
    """Drop every idle connection now; checked-out ones are discarded when returned."""
    engine.dispose(close=True)


_last_checks: weakref.WeakKeyDictionary[Engine, tuple[float, dict[str, Any]]] = weakref.WeakKeyDictionary()
_last_checks_lock = threading.Lock()


def periodic_health_check(
    db: Session,
    interval_seconds: float = 30.0,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Check at most once per *interval_seconds* per engine, else the last result.

    Cheap enough to call from anywhere; a failed check invalidates the pool.
    For a check that runs on its own, use HealthMonitor.
    """
    engine = engine_of(db)
    now = clock()
    with _last_checks_lock:
        last = _last_checks.get(engine)
    if last is not None and now - last[0] < interval_seconds:
        return last[1]
    result = check_db_health(db, timeout=timeout)
    if not result["healthy"]:
        invalidate_pool(engine)
    with _last_checks_lock:
        _last_checks[engine] = (now, result)
    return result


class HealthMonitor:
    """A daemon thread running `SELECT 1` every *interval* seconds.

    `last_result` is the most recent check; `on_result` hooks (metrics, the
    breaker's recovery probe) receive every result. `stop()` returns within
    one check's timeout.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        *,
        interval: float = 30.0,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        probe_interval: float | None = None,
        degraded: Callable[[], bool] | None = None,
        claim_probe: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = session_factory
        self._clock = clock
        self._checking = threading.Lock()  # one check at a time for `recent`
        self.interval = interval
        # While degraded() (the breaker is not CLOSED), check every probe_interval instead:
        # with probe-gated recovery these checks are what ends an outage.
        self.probe_interval = probe_interval
        self._degraded = degraded
        # While degraded, a check runs only if claim_probe() says this process's turn (one
        # probe per interval for a whole fleet, instead of one per process).
        self._claim_probe = claim_probe
        self.timeout = timeout
        self._on_result = on_result
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: dict[str, Any] | None = None
        self.last_at: float | None = None  # on *clock*, when last_result was taken
        self.checks = 0

    def start(self) -> HealthMonitor:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="brownout-health", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.timeout + 5)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def recent(self, max_age: float) -> dict[str, Any] | None:
        """A result at most *max_age* seconds old: a check now when the last is older, unless one is under way
        (then the last, which that check replaces): readiness asked often never queues checks behind each other."""
        last_at = self.last_at
        if last_at is not None and self._clock() - last_at <= max_age:
            return self.last_result
        if not self._checking.acquire(blocking=False):
            return self.last_result
        if not self._my_turn():  # while degraded, the fleet's one probe per interval: not this process's turn
            self._checking.release()
            return self.last_result
        try:
            return self.check_now()
        except Exception:  # check_db_health never raises for the database; a hook or the pool might
            log.exception("health check on demand crashed")
            return self.last_result
        finally:
            self._checking.release()

    def check_now(self) -> dict[str, Any]:
        with self._sessions() as db:
            result = check_db_health(db, timeout=self.timeout)
            if not result["healthy"]:
                log.warning("health check failed (%s): %s; invalidating the pool", result["error_kind"], result["error"])
                invalidate_pool(engine_of(db))
        self.last_result, self.last_at = result, self._clock()
        self.checks += 1
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("health monitor hook failed")
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._my_turn():
                    with self._checking:  # never beside a check on demand (`recent`)
                        self.check_now()
            except Exception:  # never let the monitor die silently
                log.exception("health check crashed")
            self._wait_for_next_check()

    def _wait_for_next_check(self) -> None:
        """`interval`, or `probe_interval` as soon as the service is degraded (looked at every slice)."""
        if self.probe_interval is None or self._degraded is None:
            self._stop.wait(self.interval)
            return
        started = time.monotonic()
        slice_seconds = min(self.interval, self.probe_interval)
        while not self._stop.wait(slice_seconds):
            waited = time.monotonic() - started
            if waited >= self.interval or (waited >= self.probe_interval and self._is_degraded()):
                return

    def _my_turn(self) -> bool:
        if self._claim_probe is None or self._degraded is None or not self._is_degraded():
            return True
        try:
            return self._claim_probe()
        except Exception:
            log.exception("health monitor: claim_probe() failed")
            return True

    def _is_degraded(self) -> bool:
        assert self._degraded is not None  # noqa: S101 - narrows the type for mypy: both callers check _degraded first
        try:
            return self._degraded()
        except Exception:
            log.exception("health monitor: degraded() failed")
            return False
