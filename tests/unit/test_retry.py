"""execute_with_retry: exact backoff, budget, deadline, breaker, commit-in-flight.

A real `sqlalchemy.orm.Session()` without a bind stands in for the database
session (execute_with_retry only uses `db.info`, `db.rollback()` and
`db.close()`); *fn* is scripted to raise real psycopg2 errors, then return.
`sleep` only records the delay and moves a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
import sqlalchemy.exc
from sqlalchemy.orm import Session

from brownout._db import incidents
from brownout._db import retry as retry_module
from brownout._db.circuit_breaker import BreakerState, CircuitBreaker
from brownout._db.deadline import current_deadline
from brownout._db.errors import CircuitOpenError, CommitOutcomeUnknown, DeadlineExceeded, classify
from brownout._db.retry import RESILIENCE_KEY, Resilience, RetryPolicy, execute_with_retry
from brownout._db.waiting import DatabaseDeadlineReached
from tests.support.fakes import LOWER, UPPER, FakeClock, ScriptedRandom, pg_error

DEFAULT_NOMINAL = [0.5, 1.0, 2.0, 3.0]


def ssl_error() -> psycopg2.OperationalError:
    return psycopg2.OperationalError("SSL connection has been closed unexpectedly\n")


class RecordingSession(Session):
    """A real Session that counts rollbacks and closes (and can be told to fail a rollback)."""

    def __init__(self, *, rollback_fails: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rollbacks = 0
        self.closes = 0
        self.rollback_fails = rollback_fails

    def rollback(self) -> None:
        self.rollbacks += 1
        if self.rollback_fails:
            raise psycopg2.InterfaceError("connection already closed")
        super().rollback()

    def close(self) -> None:
        self.closes += 1
        super().close()


class Script:
    """A zero-argument fn: raises the scripted errors in turn, then returns *result*."""

    def __init__(
        self, *errors: BaseException, result: object = "done", clock: FakeClock | None = None, cost: float = 0.0
    ) -> None:
        self.errors = list(errors)
        self.raised: list[BaseException] = []
        self.result = result
        self.calls = 0
        self.clock = clock
        self.cost = cost
        self.deadlines: list[float | None] = []
        self.before_raise: Callable[[], None] | None = None

    def __call__(self) -> object:
        self.calls += 1
        self.deadlines.append(current_deadline())
        if self.clock is not None:
            self.clock.advance(self.cost)
        if self.errors:
            exc = self.errors.pop(0)
            self.raised.append(exc)
            if self.before_raise is not None:
                self.before_raise()
            raise exc
        return self.result


class Harness:
    def __init__(
        self, *, rng: random.Random | None = None, breaker: CircuitBreaker | None = None, policy: RetryPolicy | None = None
    ) -> None:
        self.clock = FakeClock()
        self.delays: list[float] = []
        self.wakes: list[float] = []  # the clock's reading at the end of each requested sleep
        self.breaker = breaker or CircuitBreaker(clock=self.clock, open_jitter=0.0)
        self.resilience = Resilience(
            breaker=self.breaker,
            policy=policy or RetryPolicy(),
            sleep=self.sleep,
            rng=rng or ScriptedRandom(UPPER),
            clock=self.clock,
        )
        self.db = RecordingSession(info={RESILIENCE_KEY: self.resilience})

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)
        self.wakes.append(self.clock())

    def run(self, fn: Callable[[], Any], **kwargs: Any) -> Any:
        return execute_with_retry(self.db, fn, **kwargs)

    def failures(self) -> int:
        count = self.breaker.snapshot()["consecutive_failures"]
        assert isinstance(count, int)
        return count


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- the policy's maths -------------------------------------------------------------


def test_nominal_delays_with_the_default_settings() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.base_seconds, policy.cap_seconds) == (4, 0.5, 3.0)
    assert [policy.nominal_delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_nominal_delays_double_until_the_cap() -> None:
    policy = RetryPolicy(base_seconds=0.1, cap_seconds=1.0)
    assert [policy.nominal_delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_full_jitter_bounds() -> None:
    policy = RetryPolicy()
    assert [policy.delay(n, ScriptedRandom(UPPER)) for n in range(1, 5)] == DEFAULT_NOMINAL
    assert [policy.delay(n, ScriptedRandom(LOWER)) for n in range(1, 5)] == [0.0] * 4
    assert policy.delay(3, ScriptedRandom(0.25)) == 0.5
    rng = random.Random(1234)
    for n in range(1, 7):
        draws = [policy.delay(n, rng) for _ in range(200)]
        assert all(0.0 <= d <= policy.nominal_delay(n) for d in draws)
        assert max(draws) - min(draws) > policy.nominal_delay(n) / 2  # spread over the window, not a constant


# -- the schedule ---------------------------------------------------------------------


def test_first_try_success_touches_nothing(h: Harness) -> None:
    fn = Script(result=42)
    assert h.run(fn) == 42
    assert (fn.calls, h.delays, h.db.rollbacks) == (1, [], 0)


def test_exact_delays_at_the_upper_bound_then_success(h: Harness) -> None:
    fn = Script(*(ssl_error() for _ in range(4)), result="ok")
    assert h.run(fn) == "ok"
    assert fn.calls == 5
    assert h.delays == DEFAULT_NOMINAL
    assert h.db.rollbacks == 4  # once after each failed attempt
    assert h.breaker.state is BreakerState.CLOSED
    assert h.failures() == 0  # the final success reset the count


def test_delays_at_the_lower_bound_are_zero() -> None:
    h = Harness(rng=ScriptedRandom(LOWER))
    fn = Script(*(ssl_error() for _ in range(4)))
    assert h.run(fn) == "done"
    assert h.delays == [0.0] * 4


@pytest.mark.parametrize("seed", range(10))
def test_seeded_delays_lie_within_their_window(seed: int) -> None:
    h = Harness(rng=random.Random(seed))
    h.run(Script(*(ssl_error() for _ in range(4))))
    assert len(h.delays) == 4
    for delay, nominal in zip(h.delays, DEFAULT_NOMINAL, strict=True):
        assert 0.0 <= delay <= nominal


def test_jitter_is_drawn_from_the_injected_rng() -> None:
    h = Harness(rng=ScriptedRandom([0.5, 0.1, 1.0, 0.0]))
    h.run(Script(*(ssl_error() for _ in range(4))))
    assert h.delays == pytest.approx([0.25, 0.1, 2.0, 0.0])


def test_five_calls_at_most_then_the_last_error_is_raised(h: Harness) -> None:
    fn = Script(*(ssl_error() for _ in range(10)))
    with pytest.raises(psycopg2.OperationalError) as info:
        h.run(fn)
    assert fn.calls == 5
    assert info.value is fn.raised[-1]
    assert h.delays == DEFAULT_NOMINAL  # no wait after the last attempt
    assert h.db.rollbacks == 5
    # With the default settings, a call that spends its whole budget opens the breaker.
    assert h.breaker.state is BreakerState.OPEN


def test_max_retries_zero_means_one_call() -> None:
    h = Harness(policy=RetryPolicy(max_retries=0))
    fn = Script(ssl_error())
    with pytest.raises(psycopg2.OperationalError):
        h.run(fn)
    assert (fn.calls, h.delays) == (1, [])


@pytest.mark.parametrize(
    "error",
    [
        pg_error("40001", "could not serialize access due to concurrent update"),
        pg_error("57P01", "terminating connection due to administrator command"),
        psycopg2.InterfaceError("connection already closed"),
        sqlalchemy.exc.OperationalError("SELECT 1", {}, psycopg2.OperationalError("server closed the connection unexpectedly")),
        sqlalchemy.exc.TimeoutError("QueuePool limit of size 10 overflow 20 reached"),
    ],
    ids=["serialization", "admin-shutdown", "closed", "sqlalchemy-wrapped", "pool-timeout"],
)
def test_every_transient_kind_is_retried(h: Harness, error: Exception) -> None:
    assert classify(error).is_transient
    fn = Script(error)
    assert h.run(fn) == "done"
    assert fn.calls == 2 and h.delays == [0.5]


# -- permanent errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        pg_error("23505", 'duplicate key value violates unique constraint "k"'),
        pg_error("42601", "syntax error at or near connection refused"),
        sqlalchemy.exc.IntegrityError("INSERT ... 'connection refused'", {}, pg_error("23503", "violates foreign key")),
        ValueError("bad payload"),
    ],
    ids=["unique", "syntax", "sqlalchemy-integrity", "value-error"],
)
def test_permanent_errors_are_raised_at_once_untouched(h: Harness, error: Exception) -> None:
    fn = Script(error)
    with pytest.raises(type(error)) as info:
        h.run(fn)
    assert info.value is error
    assert (fn.calls, h.delays) == (1, [])
    assert h.breaker.state is BreakerState.CLOSED
    assert h.failures() == 0


def test_permanent_error_does_not_reset_the_failure_count(h: Harness) -> None:
    for _ in range(3):
        h.breaker.record_failure(h.breaker.before_call(), classify(ssl_error()))
    with pytest.raises(psycopg2.errors.UniqueViolation):
        h.run(Script(pg_error("23505", "duplicate key")))
    assert h.failures() == 3


# -- the deadline -----------------------------------------------------------------------


def test_deadline_stops_before_a_wait_that_would_cross_it(h: Harness) -> None:
    start = h.clock()
    fn = Script(*(ssl_error() for _ in range(10)), clock=h.clock, cost=0.1)
    with pytest.raises(DeadlineExceeded) as info:
        h.run(fn, deadline=2.0)
    # t=0.1 fail, wait 0.5; t=0.7 fail, wait 1.0; t=1.8 fail, a 2.0 wait would end at 3.8 > 2.0.
    assert fn.calls == 3
    assert h.delays == [0.5, 1.0]
    assert h.clock() - start == pytest.approx(1.8)
    assert all(wake < start + 2.0 for wake in h.wakes)
    assert info.value.__cause__ is fn.raised[-1]
    assert info.value.attempts == 3 and info.value.deadline == 2.0
    assert isinstance(info.value, TimeoutError)
    assert h.db.rollbacks == 3


def test_no_requested_sleep_crosses_the_deadline() -> None:
    for seed in range(30):
        h = Harness(rng=random.Random(seed))
        start = h.clock()
        fn = Script(*(ssl_error() for _ in range(10)), clock=h.clock, cost=0.05)
        try:
            h.run(fn, deadline=1.5)
        except DeadlineExceeded:
            pass
        except psycopg2.OperationalError:
            assert fn.calls == 5  # the budget ran out first
        assert h.delays, "the schedule never slept: nothing was checked"
        assert all(wake < start + 1.5 for wake in h.wakes)


def test_deadline_wide_enough_lets_retries_succeed(h: Harness) -> None:
    fn = Script(ssl_error(), ssl_error(), clock=h.clock, cost=0.1)
    assert h.run(fn, deadline=10.0) == "done"
    assert h.delays == [0.5, 1.0]


def test_fn_sees_the_absolute_deadline_while_it_runs(h: Harness) -> None:
    start = h.clock()
    fn = Script(ssl_error())
    h.run(fn, deadline=2.0)
    assert fn.deadlines == [start + 2.0, start + 2.0]
    assert current_deadline() is None
    fn = Script()
    h.run(fn)
    assert fn.deadlines == [None]


def test_deadline_exceeded_when_a_single_attempt_eats_the_budget(h: Harness) -> None:
    fn = Script(ssl_error(), clock=h.clock, cost=0.35)
    with pytest.raises(DeadlineExceeded) as info:
        h.run(fn, deadline=0.3)
    assert (fn.calls, h.delays, info.value.attempts) == (1, [], 1)


# -- the breaker ---------------------------------------------------------------------------


def test_open_breaker_refuses_at_once_without_calling_fn(h: Harness) -> None:
    h.breaker.force_open()
    fn = Script()
    with pytest.raises(CircuitOpenError) as info:
        h.run(fn, deadline=0.3)
    assert (fn.calls, h.delays, h.db.rollbacks) == (0, [], 0)
    assert info.value.__cause__ is None


def test_breaker_opening_midway_stops_the_retries() -> None:
    clock = FakeClock()
    h = Harness(breaker=CircuitBreaker(clock=clock, failure_threshold=3, open_jitter=0.0))
    fn = Script(*(ssl_error() for _ in range(10)))
    with pytest.raises(CircuitOpenError) as info:
        h.run(fn)
    assert fn.calls == 3  # not 5: the 4th attempt is refused
    assert h.delays == [0.5, 1.0]  # no wait after the failure that opened it
    assert info.value.__cause__ is fn.raised[-1]
    assert h.breaker.state is BreakerState.OPEN


def test_failed_trial_reopens_and_stops_the_retries(h: Harness) -> None:
    for _ in range(5):
        h.breaker.record_failure(h.breaker.before_call(), classify(ssl_error()))
    h.clock.advance(60)
    fn = Script(*(ssl_error() for _ in range(10)))
    with pytest.raises(CircuitOpenError) as info:
        h.run(fn)
    assert fn.calls == 1  # the single trial
    assert h.delays == []
    assert info.value.__cause__ is fn.raised[0]
    assert h.breaker.state is BreakerState.OPEN


def test_successful_trials_close_the_breaker(h: Harness) -> None:
    for _ in range(5):
        h.breaker.record_failure(h.breaker.before_call(), classify(ssl_error()))
    h.clock.advance(60)
    assert h.run(Script()) == "done"
    assert h.breaker.state is BreakerState.HALF_OPEN
    assert h.run(Script()) == "done"
    assert h.breaker.snapshot()["state"] == "closed"


# -- COMMIT in flight -----------------------------------------------------------------------


def commit_then(fn: Script) -> Script:
    """Make each failure look as if it happened after COMMIT was sent (what the Engine listener counts)."""
    fn.before_raise = lambda: retry_module._count_commit(None)
    return fn


def test_transient_error_after_commit_is_outcome_unknown(h: Harness) -> None:
    fn = commit_then(Script(ssl_error()))
    with pytest.raises(CommitOutcomeUnknown) as info:
        h.run(fn)
    assert (fn.calls, h.delays) == (1, [])
    assert info.value.__cause__ is fn.raised[0]
    assert h.db.rollbacks == 1
    assert h.failures() == 1  # the breaker still heard about it


def test_idempotent_call_is_retried_after_commit(h: Harness) -> None:
    fn = commit_then(Script(ssl_error(), ssl_error()))
    assert h.run(fn, idempotent=True) == "done"
    assert fn.calls == 3 and h.delays == [0.5, 1.0]


def test_commits_outside_the_attempt_do_not_count(h: Harness) -> None:
    retry_module._count_commit(None)  # an earlier, unrelated transaction in this thread
    fn = Script(ssl_error())
    assert h.run(fn) == "done"
    assert fn.calls == 2


def test_permanent_error_after_commit_is_raised_as_is(h: Harness) -> None:
    error = pg_error("23505", "duplicate key")
    fn = commit_then(Script(error))
    with pytest.raises(psycopg2.errors.UniqueViolation) as info:
        h.run(fn)
    assert info.value is error


@pytest.mark.parametrize(("pgcode", "message"), [("40001", "could not serialize access"), ("40P01", "deadlock detected")])
def test_the_server_saying_it_rolled_back_after_commit_is_retried(h: Harness, pgcode: str, message: str) -> None:
    at_commit = sqlalchemy.exc.OperationalError(None, None, pg_error(pgcode, message))  # a COMMIT's: no statement
    fn = commit_then(Script(at_commit))
    assert h.run(fn) == "done"
    assert fn.calls == 2 and len(h.delays) == 1


def test_a_statements_serialization_failure_after_a_commit_stays_unknown(h: Harness) -> None:
    """The COMMIT counted belongs to an earlier transaction of the call, which did commit."""
    in_statement = sqlalchemy.exc.OperationalError("INSERT INTO t VALUES (1)", {}, pg_error("40001", "could not serialize"))
    fn = commit_then(Script(in_statement))
    with pytest.raises(CommitOutcomeUnknown):
        h.run(fn)
    assert fn.calls == 1


@pytest.mark.parametrize(
    ("pgcode", "message"),
    [
        ("57014", "canceling statement due to statement timeout"),  # a cancel can land after the commit record
        ("57P01", "terminating connection due to administrator command"),
        (None, "brownout deadline reached"),  # our own deadline closed the link
    ],
)
def test_a_cancel_or_a_cut_after_commit_stays_unknown(h: Harness, pgcode: str | None, message: str) -> None:
    fn = commit_then(Script(pg_error(pgcode, message)))
    with pytest.raises(CommitOutcomeUnknown):
        h.run(fn)
    assert fn.calls == 1


def test_commit_listener_is_installed_on_first_use(h: Harness) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    h.run(Script())
    assert event.contains(Engine, "commit", retry_module._count_commit)


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, asyncio.CancelledError, SystemExit])
def test_base_exception_propagates_at_once_and_releases_the_trial(h: Harness, interrupt: type[BaseException]) -> None:
    for _ in range(5):
        h.breaker.record_failure(h.breaker.before_call(), classify(ssl_error()))
    h.clock.advance(60)
    fn = Script(interrupt())
    with pytest.raises(interrupt):
        h.run(fn)
    assert (fn.calls, h.delays, h.db.rollbacks) == (1, [], 0)
    assert h.breaker.state is BreakerState.HALF_OPEN
    assert h.breaker.before_call() > 0  # the trial slot is free for the next caller


def test_base_exception_counts_no_failure(h: Harness) -> None:
    with pytest.raises(KeyboardInterrupt):
        h.run(Script(ssl_error(), KeyboardInterrupt()))
    assert h.delays == [0.5]
    assert h.failures() == 1  # only the SSL error


# -- the session -------------------------------------------------------------------------------


def test_session_without_resilience_is_a_clear_type_error() -> None:
    fn = Script()
    with pytest.raises(TypeError, match="Resilience"):
        execute_with_retry(Session(), fn)
    assert fn.calls == 0


def test_explicit_resilience_wins_over_the_sessions(h: Harness) -> None:
    other = Harness()
    other.breaker.force_open()
    db = Session(info={RESILIENCE_KEY: other.resilience})
    assert execute_with_retry(db, Script(ssl_error()), resilience=h.resilience) == "done"
    assert h.delays == [0.5] and other.delays == []


def test_failed_rollback_closes_the_session_and_retries(h: Harness) -> None:
    h.db.rollback_fails = True
    fn = Script(ssl_error(), ssl_error())
    assert h.run(fn) == "done"
    assert h.db.rollbacks == 2 and h.db.closes == 2


def test_retry_log_masks_the_password(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    error = psycopg2.OperationalError(
        'connection to server at "db" failed: timeout expired (postgresql://app:hunter2@db:6543/postgres)\n'
    )
    with caplog.at_level(logging.WARNING, logger="brownout._db.retry"):
        h.run(Script(error))
    assert "retry 1/4" in caplog.text
    assert "hunter2" not in caplog.text
    assert "app:***@db" in caplog.text


# -- one incident, one failure (incidents.py) ------------------------------------------------


def report_casualty() -> None:
    """What engine.py's handle_error reports for a connection born before the latest disconnect."""
    epochs = incidents.DisconnectEpochs()
    assert epochs.on_disconnect(None) is False  # the incident itself, counted
    assert epochs.on_disconnect({incidents.EPOCH_KEY: 0}) is True


def casualty_then(fn: Script) -> Script:
    """Make each failure look like a casualty of an incident already counted."""
    fn.before_raise = report_casualty
    return fn


def test_casualty_disconnect_is_retried_but_not_counted() -> None:
    h = Harness(breaker=CircuitBreaker(failure_threshold=1))
    fn = casualty_then(Script(ssl_error(), ssl_error()))
    assert h.run(fn) == "done"
    assert fn.calls == 3 and h.delays == [0.5, 1.0] and h.db.rollbacks == 2
    assert h.breaker.state is BreakerState.CLOSED


def test_fresh_disconnect_is_counted() -> None:
    h = Harness(breaker=CircuitBreaker(failure_threshold=1))
    fn = Script(ssl_error())
    with pytest.raises(CircuitOpenError):
        h.run(fn)
    assert fn.calls == 1


def test_casualty_verdict_only_excuses_disconnects() -> None:
    h = Harness(breaker=CircuitBreaker(failure_threshold=1))
    fn = casualty_then(Script(pg_error("40001", "could not serialize")))
    with pytest.raises(CircuitOpenError):  # the serialization failure counted, and opened the breaker
        h.run(fn)
    assert fn.calls == 1


def slow_connect(connecting: bool = True) -> DatabaseDeadlineReached:
    error = DatabaseDeadlineReached("brownout deadline reached connecting to the database after 0.300 s")
    error.connecting = connecting
    return error


def excuse_slow_connect() -> None:
    """What engine.py reports for a connect cut by the deadline right after a disconnect incident."""
    epochs = incidents.DisconnectEpochs()
    assert epochs.on_disconnect(None) is False
    assert epochs.excuse_slow_connect() is True


def test_a_slow_connect_in_a_reconnect_storm_is_retried_but_not_counted() -> None:
    h = Harness(breaker=CircuitBreaker(failure_threshold=1))
    fn = Script(slow_connect(), slow_connect())
    fn.before_raise = excuse_slow_connect
    assert h.run(fn) == "done"
    assert fn.calls == 3 and h.breaker.state is BreakerState.CLOSED


def test_the_verdict_excuses_a_slow_connect_not_a_slow_query() -> None:
    h = Harness(breaker=CircuitBreaker(failure_threshold=1))
    fn = Script(slow_connect(connecting=False))
    fn.before_raise = excuse_slow_connect
    with pytest.raises(CircuitOpenError):
        h.run(fn)
    assert fn.calls == 1


def test_stale_verdict_from_an_unseen_failure_is_forgotten() -> None:
    h = Harness(breaker=CircuitBreaker(failure_threshold=1))
    report_casualty()
    fn = Script(ssl_error())
    with pytest.raises(CircuitOpenError):
        h.run(fn)  # this fresh disconnect counts, despite the verdict left behind
    assert fn.calls == 1


def test_casualty_in_half_open_frees_the_trial(h: Harness) -> None:
    for _ in range(5):
        h.breaker.record_failure(h.breaker.before_call(), classify(ssl_error()))
    h.clock.advance(60)
    fn = casualty_then(Script(ssl_error()))
    assert h.run(fn) == "done"
    assert fn.calls == 2
    assert h.breaker.state is BreakerState.HALF_OPEN
    assert h.breaker.snapshot()["half_open_successes"] == 1
