"""execute_with_retry over a real Session on the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from brownout._db import BreakerState, CommitOutcomeUnknown, Database, execute_with_retry, pipelined
from brownout._db.retry import Resilience, RetryPolicy
from tests.conftest import admin_connect, terminate_backends


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


def _rival_books_night_after_reading_day(pg_database: str) -> None:
    """A SERIALIZABLE transaction of another client that reads what ours writes and writes what ours read,
    committed first: PostgreSQL then fails ours at its COMMIT (write skew)."""
    rival = admin_connect(pg_database)
    try:
        rival.autocommit = False
        rival.set_session(isolation_level="SERIALIZABLE")
        with rival.cursor() as cur:
            cur.execute("SELECT count(*) FROM items WHERE name = 'day'")
            cur.execute("INSERT INTO items VALUES (100, 'night')")
        rival.commit()
    finally:
        rival.close()


@pytest.mark.parametrize("commit", ["commit", "commit_with"])
def test_a_serialization_failure_at_commit_is_retried_because_it_rolled_back(db: Database, pg_database: str, commit: str) -> None:
    """The server's 40001 answers the COMMIT: nothing was applied, so even a call not marked idempotent is
    retried, where a lost connection during COMMIT would leave it unknown."""
    delays: list[float] = []
    res = Resilience(breaker=db.breaker, policy=RetryPolicy(), sleep=delays.append)
    calls = 0
    with db.session() as s:

        def book_day() -> int:
            nonlocal calls
            calls += 1
            s.connection(execution_options={"isolation_level": "SERIALIZABLE"})
            nights = s.execute(text("SELECT count(*) FROM items WHERE name = 'night'")).scalar_one()
            if commit == "commit":
                s.execute(text("INSERT INTO items VALUES (:id, 'day')"), {"id": calls})
                if calls == 1:
                    _rival_books_night_after_reading_day(pg_database)
                s.commit()
            else:
                if calls == 1:
                    _rival_books_night_after_reading_day(pg_database)
                pipelined.commit_with(s, text("INSERT INTO items VALUES (:id, 'day')"), {"id": calls})
            return int(nights)

        assert execute_with_retry(s, book_day, resilience=res) == 1  # the second attempt saw the rival's night
    assert calls == 2 and len(delays) == 1
    with db.session() as s:
        assert s.execute(text("SELECT id, name FROM items ORDER BY id")).all() == [(2, "day"), (100, "night")]


RAISE_40001 = "DO $$BEGIN RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001'; END$$"
RAISE_40P01 = "DO $$BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END$$"


def test_a_serialization_failure_after_an_earlier_commit_of_the_same_call_stays_unknown(db: Database) -> None:
    """Running the call again would apply its first, committed, transaction twice."""
    res = Resilience(breaker=db.breaker, policy=RetryPolicy(), sleep=lambda seconds: None)
    calls = 0
    with db.session() as s:

        def two_transactions() -> None:
            nonlocal calls
            calls += 1
            s.execute(text("INSERT INTO items VALUES (:id, 'charge')"), {"id": calls})
            s.commit()  # the first transaction is in
            if calls == 1:
                s.execute(text(RAISE_40001))  # the second one fails
            s.commit()

        with pytest.raises(CommitOutcomeUnknown):
            execute_with_retry(s, two_transactions, resilience=res)
    assert calls == 1
    with db.session() as s:
        assert s.execute(text("SELECT count(*) FROM items")).scalar_one() == 1


def test_a_lost_commit_after_a_deadlock_handled_in_a_savepoint_stays_unknown(db: Database, pg_database: str) -> None:
    """The lost link's error carries the handled deadlock as its context: only its own code may say 'rolled back'."""
    res = Resilience(breaker=db.breaker, policy=RetryPolicy(), sleep=lambda seconds: None)
    with db.session() as s:

        def work() -> None:
            s.execute(text("INSERT INTO items VALUES (1, 'charge')"))
            try:
                with s.begin_nested():
                    s.execute(text(RAISE_40P01))
            except DBAPIError:
                pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
                admin = admin_connect(pg_database)
                try:
                    admin.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
                finally:
                    admin.close()
                s.commit()

        with pytest.raises(CommitOutcomeUnknown):
            execute_with_retry(s, work, resilience=res)
