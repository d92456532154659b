"""What the resilience wrapper costs: `python bench/overhead.py` (see README).

Prints, in one run:
- the median per-call time of a raw SQLAlchemy `SELECT 1` and of the same
  call through `execute_with_retry`, and their `ratio` (target <= 1.05);
- the wrapper's own cost on a no-op callable, in microseconds per call
  (target <= 2 us while CLOSED), beside pybreaker and tenacity stacked on
  the same no-op (what a Python user would otherwise reach for);
- for context, the same raw `SELECT 1` with psycopg2's blocking wait instead
  of Brownout's deadline-aware wait callback.

Raw and wrapped calls are measured in alternating rounds so machine noise
hits both alike. DATABASE_URL defaults to the local set-up's database.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
import timeit
from collections.abc import Callable

import pybreaker
import tenacity
from sqlalchemy import text
from sqlalchemy.orm import Session

from brownout._db import Database, execute_with_retry, waiting
from brownout._db.database import build_resilience
from brownout._fleet.assembly import build_fleet_breaker, stop_breaker
from brownout._settings import load_settings

LOCAL_URL = "postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def per_call_ns(fn: Callable[[], object], calls: int) -> list[int]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return samples


def noop_cost_us(fn: Callable[[], object], number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=7))
    return best / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds of raw and wrapped calls")
    parser.add_argument("--calls", type=int, default=250, help="SELECT 1 calls per round and mode")
    parser.add_argument("--noop-calls", type=int, default=200_000, help="no-op calls per timing repeat")
    args = parser.parse_args()

    os.environ.setdefault("DATABASE_URL", LOCAL_URL)
    database = Database.from_settings(load_settings())
    select_one = text("SELECT 1")
    raw: list[int] = []
    wrapped: list[int] = []
    blocking: list[int] = []
    with database.session() as db:
        raw_call = lambda: db.execute(select_one).scalar_one()  # noqa: E731
        wrapped_call = lambda: execute_with_retry(db, raw_call)  # noqa: E731
        per_call_ns(raw_call, 200)  # warm the pool, the statement cache and the breaker
        per_call_ns(wrapped_call, 200)
        for _ in range(args.rounds):
            raw += per_call_ns(raw_call, args.calls)
            wrapped += per_call_ns(wrapped_call, args.calls)
        waiting.uninstall()
        for _ in range(max(1, args.rounds // 4)):
            blocking += per_call_ns(raw_call, args.calls)
        waiting.install(waiting.WaitBounds())
        db.rollback()

    raw_us = statistics.median(raw) / 1000
    wrapped_us = statistics.median(wrapped) / 1000
    blocking_us = statistics.median(blocking) / 1000
    print(f"SELECT 1, raw SQLAlchemy session:        {raw_us:8.1f} us/call (median of {len(raw)})")
    print(f"SELECT 1, through execute_with_retry:    {wrapped_us:8.1f} us/call (median of {len(wrapped)})")
    print(f"ratio: {wrapped_us / raw_us:.2f}")
    print(f"SELECT 1, raw, psycopg2 blocking wait:   {blocking_us:8.1f} us/call (context: cost of the wait callback)")

    noop = lambda: None  # noqa: E731
    session = Session()
    direct = noop_cost_us(noop, args.noop_calls)
    ours = noop_cost_us(lambda: execute_with_retry(session, noop, resilience=database.resilience), args.noop_calls)
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(5),
        wait=tenacity.wait_random_exponential(multiplier=0.5, max=3),
        reraise=True,
    )
    stacked = noop_cost_us(lambda: retrying(breaker.call, noop), args.noop_calls // 10)
    print(f"no-op, direct call:                      {direct:8.3f} us/call")
    print(f"no-op, execute_with_retry (CLOSED):      {ours - direct:8.3f} us/call of wrapper")
    print(f"no-op, tenacity + pybreaker:             {stacked - direct:8.3f} us/call of wrapper")
    unbudgeted = dataclasses.replace(database.resilience, budget=None)
    without_budget = noop_cost_us(lambda: execute_with_retry(session, noop, resilience=unbudgeted), args.noop_calls)
    print(
        f"no-op, execute_with_retry, no budget:    {without_budget - direct:8.3f} us/call of wrapper "
        f"(the retry budget costs {ours - without_budget:.3f})"
    )
    database.close()
    shared_breaker_cost(session, noop, direct, args.noop_calls, ours)


def shared_breaker_cost(session: Session, noop: Callable[[], object], direct: float, calls: int, local: float) -> None:
    """The shared breaker's hot path (CLOSED) beside the local one: no Redis round trip on it."""
    settings = load_settings(breaker_backend="redis", redis_url=os.environ.get("REDIS_URL", LOCAL_REDIS))
    settings = settings.model_copy(update={"redis_key_prefix": f"bench-overhead-{os.getpid()}:"})
    breaker = build_fleet_breaker(settings)
    try:
        resilience = build_resilience(settings, breaker=breaker)
        shared = noop_cost_us(lambda: execute_with_retry(session, noop, resilience=resilience), calls)
    finally:
        stop_breaker(breaker)
    print(
        f"no-op, execute_with_retry, shared breaker: {shared - direct:6.3f} us/call of wrapper "
        f"({shared - local:+.3f} vs local; target: within 1 us)"
    )


if __name__ == "__main__":
    main()
