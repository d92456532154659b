"""`execute_with_retry(db, fn)`: the entry point, with the breaker inside.

Backoff: capped exponential with **Full Jitter** (AWS Architecture Blog,
"Exponential Backoff And Jitter", 2015): before retry n the wait is drawn
uniformly from [0, min(cap, base * 2**(n-1))], i.e. up to 0.5, 1, 2, 3 s with
the default settings. Of the schemes that study compared, Full Jitter did the
least work and finished soonest under contention; here the contention is a
fleet of processes that all saw the same failover (or the same pool
invalidation) at the same instant, and spreading their retries over the whole
window is the point.

SSL errors get no special delay. Longer waits after an SSL error would assume
a stale TLS connection fails again; here a disconnect invalidates the pool
(see engine.py) and the retry runs on a fresh connection, so a longer wait
would only add latency, and a shorter, unjittered one would line every process
up on a database that may be failing over.

Why tenacity is not used: the retry decision needs the breaker's permit, the
commit-in-flight flag and the deadline together at each attempt, and the hot
path must stay near a plain function call (see bench/overhead.py).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from brownout._db import incidents
from brownout._db.circuit_breaker import BreakerState, CircuitBreaker
from brownout._db.deadline import deadline_scope
from brownout._db.errors import (
    CircuitOpenError,
    CommitOutcomeUnknown,
    DeadlineExceeded,
    ErrorKind,
    classify,
    commit_rolled_back,
    describe,
    is_slow_connect,
)
from brownout._db.retry_budget import RetryBudget

log = logging.getLogger(__name__)
T = TypeVar("T")

RESILIENCE_KEY = "brownout.resilience"


class CallObserver:
    """Told about every attempt that reached the database (metrics attach here); no-op defaults.

    Called on the caller's thread, after the attempt: keep it cheap, never raise.
    """

    def on_attempt(self, seconds: float, kind: ErrorKind | None) -> None:
        """An attempt ended: *kind* None means it succeeded."""

    def on_retry(self, kind: ErrorKind, wait: float) -> None:
        """A transient failure is about to be retried after *wait* seconds."""

    def on_retry_denied(self, kind: ErrorKind) -> None:
        """A transient failure is not retried: the retry budget is spent."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many retries, and the nominal (pre-jitter) delay before each."""

    max_retries: int = 4
    base_seconds: float = 0.5
    cap_seconds: float = 3.0

    def nominal_delay(self, retry: int) -> float:
        """Upper bound of the wait before retry number *retry* (1-based)."""
        return min(self.cap_seconds, self.base_seconds * 2.0 ** (retry - 1))

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full Jitter: uniform in [0, nominal_delay(retry)]."""
        return rng.uniform(0.0, self.nominal_delay(retry))


@dataclass(slots=True)
class Resilience:
    """What `execute_with_retry` needs besides the session; one per process and database."""

    breaker: CircuitBreaker
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    observers: list[CallObserver] = field(default_factory=list)
    budget: RetryBudget | None = None


# -- knowing whether COMMIT was reached ----------------------------------------
# A connection lost during COMMIT leaves the outcome unknown: the server may
# have committed and only the reply was lost. Retrying such a call would apply a
# non-idempotent write twice, so each thread counts the COMMITs it sends and an
# attempt compares the count before and after (nested calls stay correct).
_commits = threading.local()
_commit_listener_lock = threading.Lock()
_commit_listener_installed = False


def _commits_sent() -> int:
    return getattr(_commits, "count", 0)


def _count_commit(conn: object) -> None:
    _commits.count = getattr(_commits, "count", 0) + 1


def note_commit_sent() -> None:
    """Count a COMMIT sent inside a statement (pipelined.py) as one sent by `commit()`."""
    _commits.count = getattr(_commits, "count", 0) + 1


def _install_commit_listener() -> None:
    global _commit_listener_installed
    with _commit_listener_lock:
        if not _commit_listener_installed:
            event.listen(Engine, "commit", _count_commit)
            _commit_listener_installed = True


def _rollback_quietly(db: Session) -> None:
    try:
        db.rollback()
    except Exception:  # the connection is already gone; closing releases it
        log.debug("rollback after a failed attempt failed; closing the session", exc_info=True)
        try:
            db.close()
        except Exception:
            log.debug("closing the session failed too", exc_info=True)


def execute_with_retry(
    db: Session,
    fn: Callable[[], T],
    *,
    deadline: float | None = None,
    idempotent: bool = False,
    resilience: Resilience | None = None,
) -> T:
    """Run *fn* (which uses *db*) under the breaker, retrying transient failures.

    *deadline* bounds the whole call, waits included, in seconds; when it is
    spent, DeadlineExceeded is raised from the last failure. Permanent errors
    are raised at once, untouched. A transient failure after COMMIT was sent
    raises CommitOutcomeUnknown unless *idempotent* is true: only the caller
    knows whether running *fn* twice is harmless (an idempotency key, an
    upsert). Raises CircuitOpenError when the breaker refuses the call.
    """
    res = resilience or db.info.get(RESILIENCE_KEY)
    if res is None:
        raise TypeError(
            "execute_with_retry: this Session has no Resilience; make sessions with "
            "brownout._db.make_session_factory(...) or pass resilience="
        )
    if not _commit_listener_installed:
        _install_commit_listener()
    breaker = res.breaker
    deadline_at = None if deadline is None else res.clock() + deadline
    if res.budget is not None:
        res.budget.record_call()
    attempt = 0
    last_error: Exception | None = None
    casualty = False  # the last attempt was lost to an incident already counted
    while True:
        attempt += 1
        try:
            permit = breaker.before_call(casualty=casualty)
        except CircuitOpenError as refused:
            if attempt > 1:
                raise refused from last_error
            raise
        commits_before = _commits_sent()
        incidents.clear()
        started = time.perf_counter() if res.observers else 0.0
        try:
            if deadline_at is None:
                result = fn()
            else:
                with deadline_scope(deadline_at):
                    result = fn()
        except Exception as exc:
            commits_sent = _commits_sent() - commits_before
            kind = classify(exc)
            _tell(res.observers, "on_attempt", time.perf_counter() - started, kind)
            casualty = bool((kind.is_disconnect or is_slow_connect(exc)) and incidents.take_casualty())
            if casualty:
                breaker.release(permit)  # this incident was counted already (incidents.py)
            elif waited_for_pool(exc):
                # No connection free in this process's pool within the deadline: the process's own queue
                # (more calls at once than connections); the calls holding them are counted if slow.
                breaker.release(permit)
            else:
                breaker.record_failure(permit, kind)
            if not kind.is_transient:
                raise
            _rollback_quietly(db)
            # One COMMIT sent, and the error is the server's answer to it saying it rolled back: nothing applied.
            # Two or more: an earlier one committed, and running fn again would apply it twice.
            if commits_sent and not idempotent and not (commits_sent == 1 and commit_rolled_back(exc)):
                raise CommitOutcomeUnknown(
                    f"connection lost during COMMIT ({kind.value}); the write may or may not have been applied"
                ) from exc
            last_error = exc
            if deadline is not None and deadline_at is not None and res.clock() >= deadline_at:
                raise DeadlineExceeded(deadline, attempt) from exc
            if attempt > res.policy.max_retries:
                raise
            if breaker.state is BreakerState.OPEN:  # this failure opened it: do not wait for nothing
                raise CircuitOpenError(breaker.name, breaker.retry_after(), breaker.state.value) from exc
            wait = res.policy.delay(attempt, res.rng)
            if deadline is not None and deadline_at is not None and res.clock() + wait >= deadline_at:
                raise DeadlineExceeded(deadline, attempt) from exc
            if res.budget is not None and not res.budget.try_spend():
                log.warning("database call failed (%s), not retried: retry budget spent: %s", kind.value, describe(exc))
                _tell(res.observers, "on_retry_denied", kind)
                raise
            _log_retry(kind, exc, attempt, res.policy.max_retries, wait)
            _tell(res.observers, "on_retry", kind, wait)
            res.sleep(wait)
            continue
        except BaseException:
            breaker.release(permit)
            raise
        if res.observers:
            _tell(res.observers, "on_attempt", time.perf_counter() - started, None)
        breaker.record_success(permit)
        return result


def waited_for_pool(exc: BaseException) -> bool:
    """True when *exc* is (or wraps) a checkout that found no connection free in time."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, sqlalchemy.exc.TimeoutError):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def _tell(observers: list[CallObserver], hook: str, *args: object) -> None:
    for observer in observers:
        try:
            getattr(observer, hook)(*args)
        except Exception:  # an observer never breaks a database call
            log.exception("call observer %r failed in %s", observer, hook)


def _log_retry(kind: ErrorKind, exc: Exception, attempt: int, max_retries: int, wait: float) -> None:
    log.warning("database call failed (%s), retry %d/%d in %.2f s: %s", kind.value, attempt, max_retries, wait, describe(exc))
