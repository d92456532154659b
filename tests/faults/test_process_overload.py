"""A deadline missed by the process is not a database failure: the database always gets its slice.

Under CPU overload a request can spend its whole deadline before the database is asked (the thread pool,
the GIL, a busy event loop). Cutting the query then blamed the database: the breaker counted a failure on a
healthy database, the cut connection was thrown away and rebuilt over TLS (more CPU), and the loop fed
itself. The time before the query is simulated here by the call itself being late (a sleep before it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from sqlalchemy import event, text

from brownout._db import Database, DeadlineExceeded, execute_with_retry

DEADLINE = 0.2


def connections_made(database: Database) -> list[float]:
    made: list[float] = []
    event.listen(database.engine, "connect", lambda *_: made.append(time.monotonic()))
    return made


def test_a_query_asked_after_the_deadline_is_answered_and_not_counted(make_database: Callable[..., Database]) -> None:
    database = make_database(breaker_failure_threshold=1, db_min_wait_seconds=0.1)
    with database.session() as session:
        execute_with_retry(session, lambda: session.execute(text("SELECT 1")).scalar_one(), deadline=5)  # pooled
    made = connections_made(database)

    def late_query() -> int:
        time.sleep(DEADLINE + 0.05)  # the process was busy: the deadline is spent before the database is asked
        return int(session.execute(text("SELECT 41 + 1")).scalar_one())

    with database.session() as session:
        assert execute_with_retry(session, late_query, deadline=DEADLINE) == 42
    assert database.breaker.state.value == "closed", database.breaker.snapshot()
    assert made == [], "the connection was cut and rebuilt for the process's own lateness"


def test_a_database_that_does_not_answer_within_its_slice_is_still_counted(make_database: Callable[..., Database]) -> None:
    database = make_database(breaker_failure_threshold=1, db_min_wait_seconds=0.1)

    def late_slow_query() -> object:
        time.sleep(DEADLINE + 0.05)
        return session.execute(text("SELECT pg_sleep(2)")).scalar_one()

    started = time.monotonic()
    with database.session() as session, pytest.raises(DeadlineExceeded):
        execute_with_retry(session, late_slow_query, deadline=DEADLINE)
    waited = time.monotonic() - started
    assert waited < DEADLINE + 0.05 + 1.0, f"cut after its slice, not after the query's 2 s: {waited:.2f} s"
    assert database.breaker.state.value == "open", "the database had its slice and did not answer: that counts"


def test_waiting_for_a_pooled_connection_is_the_process_s_own_queue_and_never_counted(
    make_database: Callable[..., Database],
) -> None:
    """More calls at once than connections: the one left waiting past its deadline is not the database's failure."""
    database = make_database(breaker_failure_threshold=1, pool_size=1, pool_max_overflow=0)
    with database.session() as holder:
        execute_with_retry(holder, lambda: holder.execute(text("SELECT 1")).scalar_one(), deadline=5)  # holds the one connection
        with database.session() as session, pytest.raises(DeadlineExceeded):
            execute_with_retry(session, lambda: session.execute(text("SELECT 1")).scalar_one(), deadline=DEADLINE)
    assert database.breaker.state.value == "closed", database.breaker.snapshot()
