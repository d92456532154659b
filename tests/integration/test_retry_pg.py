"""execute_with_retry over a real Session on the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from brownout._db import BreakerState, Database, execute_with_retry
from brownout._db.retry import Resilience, RetryPolicy
from tests.conftest import terminate_backends


@pytest.fixture
def db(make_database: Callable[..., Database]) -> Database:
    database = make_database(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)"))
        s.commit()
    return database


def test_reads_and_writes(db: Database) -> None:
    with db.session() as s:

        def write() -> None:
            s.execute(text("INSERT INTO items VALUES (1, 'a'), (2, 'b')"))
            s.commit()

        execute_with_retry(s, write)
        names = execute_with_retry(s, lambda: s.execute(text("SELECT name FROM items ORDER BY id")).scalars().all())
    assert names == ["a", "b"]
    assert db.breaker.state is BreakerState.CLOSED


def test_constraint_violation_is_not_retried_and_leaves_breaker_closed(db: Database) -> None:
    delays: list[float] = []
    res = Resilience(breaker=db.breaker, policy=RetryPolicy(), sleep=delays.append)
    calls = 0
    with db.session() as s:
        s.execute(text("INSERT INTO items VALUES (1, 'a')"))
        s.commit()

        def duplicate() -> None:
            nonlocal calls
            calls += 1
            s.execute(text("INSERT INTO items VALUES (1, 'again')"))
            s.commit()

        for _ in range(db.breaker.failure_threshold + 1):
            with pytest.raises(IntegrityError):
                execute_with_retry(s, duplicate, resilience=res)
            s.rollback()
    assert calls == db.breaker.failure_threshold + 1
    assert delays == []
    assert db.breaker.state is BreakerState.CLOSED
    assert db.breaker.snapshot()["consecutive_failures"] == 0


def test_ssl_kill_is_retried_on_a_fresh_connection(db: Database, pg_database: str, app_name: str) -> None:
    delays: list[float] = []
    res = Resilience(breaker=db.breaker, policy=RetryPolicy(), sleep=delays.append)
    with db.session() as s:
        before = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
        s.commit()
        assert terminate_backends(pg_database, app_name) == {before}
        after = execute_with_retry(s, lambda: s.execute(text("SELECT pg_backend_pid()")).scalar_one(), resilience=res)
    assert after != before
    assert len(delays) == 1 and 0 <= delays[0] <= 0.5
    assert db.breaker.state is BreakerState.CLOSED
