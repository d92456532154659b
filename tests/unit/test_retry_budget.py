"""The retry budget caps retries at a fraction of calls over a sliding window (fake clock)."""

from __future__ import annotations

import random

import psycopg2
import pytest

from brownout._db import CircuitBreaker, Resilience, RetryPolicy, execute_with_retry
from brownout._db.retry_budget import RetryBudget
from tests.support.fakes import FakeClock, pg_error


def test_retries_beyond_the_ratio_are_denied() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_seconds=10, min_retries=0, clock=clock)
    for _ in range(100):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(50)) == 10
    assert budget.denied == 40 and budget.used() == pytest.approx(1.0)


def test_the_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, window_seconds=10, min_retries=0, clock=clock)
    for _ in range(10):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(10)) == 5
    clock.advance(5)
    assert not budget.try_spend()  # the calls are still in the window, so are the retries
    clock.advance(6)  # all of it has slid out: no calls, no budget
    assert not budget.try_spend()
    budget.record_call()
    budget.record_call()
    assert budget.try_spend() and not budget.try_spend()


def test_the_floor_lets_a_quiet_process_retry() -> None:
    budget = RetryBudget(ratio=0.1, window_seconds=10, min_retries=4, clock=FakeClock())
    budget.record_call()
    assert [budget.try_spend() for _ in range(5)] == [True, True, True, True, False]


def test_under_total_failure_retries_stay_within_the_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_seconds=10, min_retries=2, clock=clock)
    attempts = 0

    def fail() -> None:
        nonlocal attempts
        attempts += 1
        raise pg_error("08006", "server closed the connection unexpectedly")

    resilience = Resilience(
        breaker=CircuitBreaker(failure_threshold=10_000, clock=clock),
        policy=RetryPolicy(max_retries=4),
        sleep=lambda seconds: None,
        rng=random.Random(1),
        clock=clock,
        budget=budget,
    )

    class Session:
        info: dict[str, object] = {}

        def rollback(self) -> None:
            pass

    calls = 200
    for _ in range(calls):
        with pytest.raises(psycopg2.OperationalError):
            execute_with_retry(Session(), fail, resilience=resilience)  # type: ignore[arg-type]
    retries = attempts - calls
    assert retries <= 2 + 0.1 * calls  # without the budget: 4 retries a call, 800
    assert budget.denied >= calls - retries
