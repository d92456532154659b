"""Pipelined connections: BEGIN and COMMIT ride on statements, and transactions mean what they meant.

The round trips are counted on the wire (a proxy reading the client's Query messages), not by asking
the driver."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout._db import CommitOutcomeUnknown, Database, DeadlineExceeded, execute_with_retry, pipelined
from brownout._db.pipelined import CLIENT_CHECK, commit_with
from brownout._dispatch.dispatcher import Applied, Dispatcher
from tests.conftest import PG_URL, admin_cursor, database_url
from tests.support.pg_wire import FrontendMessages
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy
from tests.support.written_rows import row_counts

NOTE = {"user_id": 7, "email": "ada@example.com", "subject": "Hi", "body": "Hello"}


@pytest.fixture
def wire() -> Iterator[tuple[FaultProxy, FrontendMessages]]:
    messages = FrontendMessages()
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=make_url(PG_URL).port or 5432, on_client_bytes=messages) as proxy:
        yield proxy, messages


@pytest.fixture
def watched(
    make_database: Callable[..., Database], pg_database: str, wire: tuple[FaultProxy, FrontendMessages]
) -> Callable[..., Database]:
    """A Database whose every byte to PostgreSQL goes through the wire counter (no TLS, so it can read them)."""
    upgrade_database(database_url(pg_database))
    proxy, _ = wire
    url = database_url(pg_database, port=proxy.port, sslmode="disable")
    return lambda **overrides: make_database(database_url=url, **overrides)


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    database = make_database()
    with database.session() as s:
        s.execute(text("CREATE TABLE items (id int PRIMARY KEY)"))
        s.commit()
    return database


def item_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return [row.id for row in conn.execute(text("SELECT id FROM items ORDER BY id"))]


def test_a_direct_write_costs_two_round_trips(
    watched: Callable[..., Database], wire: tuple[FaultProxy, FrontendMessages]
) -> None:
    _, messages = wire
    database = watched()
    dispatcher = Dispatcher(
        database=database, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=2.0
    )
    assert isinstance(dispatcher.submit(CREATE, NOTE, idempotency_key="warm"), Applied)
    messages.take()

    outcome = dispatcher.submit(CREATE, NOTE, idempotency_key="measured")

    assert isinstance(outcome, Applied) and not outcome.duplicate
    queries = messages.take()
    assert len(queries) == 2, queries
    assert queries[0].startswith(f"BEGIN;{CLIENT_CHECK};WITH r AS"), "the effect carries the BEGIN"
    assert queries[1].startswith("INSERT INTO applied_commands") and queries[1].endswith("\n;COMMIT"), (
        "the record carries the COMMIT"
    )
    assert "RETURNING" not in queries[1], "the COMMIT's answer is the one that comes back"
    again = dispatcher.submit(CREATE, NOTE, idempotency_key="measured")
    assert isinstance(again, Applied) and again.duplicate and again.result == outcome.result
    assert row_counts(database) == (2, 2, 2), "the duplicate left nothing behind"


def test_behind_a_pooler_the_statement_timeout_rides_on_the_begin(
    watched: Callable[..., Database], wire: tuple[FaultProxy, FrontendMessages]
) -> None:
    _, messages = wire
    database = watched(database_pooler="transaction", db_statement_timeout_seconds=5)
    with database.session() as s:  # the first connect's own queries (SQLAlchemy's dialect)
        s.execute(text("SELECT 1"))
    for _ in range(2):  # each transaction sets it again: the pooler's server connection may be another
        messages.take()
        with database.session() as s:
            assert s.execute(text("SHOW statement_timeout")).scalar_one() == "5s"
            s.commit()
        assert messages.take() == [f"BEGIN;SET LOCAL statement_timeout = 5000;{CLIENT_CHECK};SHOW statement_timeout", "COMMIT"]


def test_the_checkout_ping_opens_no_transaction(
    watched: Callable[..., Database], wire: tuple[FaultProxy, FrontendMessages]
) -> None:
    _, messages = wire
    database = watched(pool_pre_ping_idle_seconds=0)  # every checkout of a used connection pings
    with database.session() as s:
        s.execute(text("SELECT 1"))
    messages.take()
    with database.session() as s:
        s.execute(text("SELECT 2"))
        s.commit()
    with database.session() as s:
        s.connection()  # checked out, nothing sent: nothing to roll back
    assert messages.take() == ["SELECT 1", f"BEGIN;{CLIENT_CHECK};SELECT 2", "COMMIT", "SELECT 1"]


def test_a_failed_statement_aborts_the_transaction_until_rollback(db: Database) -> None:
    with db.session() as s:
        s.execute(text("INSERT INTO items VALUES (1)"))
        with pytest.raises(DBAPIError):
            s.execute(text("SELECT * FROM no_such_table"))
        s.rollback()
        s.execute(text("INSERT INTO items VALUES (2)"))
        s.commit()
    assert item_ids(db.engine) == [2]


def test_a_commit_after_a_swallowed_failure_raises_and_commits_nothing(db: Database) -> None:
    """PostgreSQL answers the COMMIT of an aborted transaction with ROLLBACK and no error; psycopg2 reports
    success, so a write after a failure someone swallowed was lost in silence."""
    raw = db.engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.execute("INSERT INTO items VALUES (13)")
            with pytest.raises(psycopg2.Error):
                cursor.execute("SELECT * FROM no_such_table")
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            raw.commit()
        with raw.cursor() as cursor:  # the connection goes on, in a new transaction
            cursor.execute("INSERT INTO items VALUES (14)")
        raw.commit()
    finally:
        raw.close()
    assert item_ids(db.engine) == [14]


def test_rollback_undoes_what_the_transaction_wrote(db: Database) -> None:
    with db.session() as s:
        s.execute(text("INSERT INTO items VALUES (1)"))
        s.execute(text("INSERT INTO items VALUES (2)"))
        s.rollback()
    assert item_ids(db.engine) == []


def test_commit_with_a_broken_constraint_commits_nothing(db: Database) -> None:
    with db.session() as s:
        s.execute(text("INSERT INTO items VALUES (1)"))
        with pytest.raises(IntegrityError):
            commit_with(s, text("INSERT INTO items VALUES (1)"), {})
        s.rollback()
    assert item_ids(db.engine) == []
    with db.session() as s:
        s.execute(text("INSERT INTO items VALUES (3)"))
        commit_with(s, text("INSERT INTO items VALUES (4)"), {})
    assert item_ids(db.engine) == [3, 4]


def test_a_link_lost_with_the_commit_in_flight_is_an_unknown_outcome(db: Database) -> None:
    attempts = 0

    def write() -> None:
        nonlocal attempts
        attempts += 1
        s.execute(text("INSERT INTO items VALUES (5)"))
        commit_with(s, text("SELECT pg_terminate_backend(pg_backend_pid())"), {})

    with db.session() as s, pytest.raises(CommitOutcomeUnknown):
        execute_with_retry(s, write)
    assert attempts == 1, "a COMMIT that may have happened is never sent twice"
    assert item_ids(db.engine) == []


def test_cursors_of_other_classes_stay_in_the_transaction(db: Database) -> None:
    raw = db.engine.raw_connection()
    try:
        with raw.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
            cursor.execute("INSERT INTO items VALUES (6) RETURNING id")
            assert cursor.fetchone() == {"id": 6}
        with raw.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
            cursor.execute("SELECT count(*) AS n FROM items")
            assert cursor.fetchone() == {"n": 1}
        raw.rollback()
    finally:
        raw.close()
    assert item_ids(db.engine) == []


def test_a_server_side_cursor_reads_inside_the_transaction(db: Database) -> None:
    with db.session() as s:
        s.execute(text("INSERT INTO items VALUES (7), (8)"))
        streamed = s.execute(text("SELECT id FROM items ORDER BY id"), execution_options={"stream_results": True})
        assert [row.id for row in streamed] == [7, 8]
        s.rollback()
    assert item_ids(db.engine) == []
    with db.session() as s:  # the connection still keeps transactions after it
        s.execute(text("INSERT INTO items VALUES (9)"))
        s.rollback()
        s.execute(text("INSERT INTO items VALUES (10)"))
        s.commit()
    assert item_ids(db.engine) == [10]


def test_large_objects_and_two_phase_commit_are_refused_clearly(db: Database) -> None:
    raw = db.engine.raw_connection()
    try:
        with pytest.raises(psycopg2.NotSupportedError, match="large objects"):
            raw.lobject()
        with pytest.raises(psycopg2.NotSupportedError, match="two-phase"):
            raw.tpc_begin(raw.xid(1, "g", "b"))
    finally:
        raw.close()


def test_autocommit_runs_statements_outside_any_transaction(db: Database) -> None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM items")  # refused inside a transaction block
        conn.exec_driver_sql("INSERT INTO items VALUES (11)")
        conn.rollback()  # nothing to undo: it committed on its own
    with db.session() as s:  # the pool gave the connection back its transactions
        s.execute(text("INSERT INTO items VALUES (12)"))
        s.rollback()
    assert item_ids(db.engine) == [11]


def test_a_query_cut_by_its_deadline_stops_on_the_server(make_database: Callable[..., Database], pg_database: str) -> None:
    database = make_database(retry_max_retries=0)
    with database.session() as s, pytest.raises(DeadlineExceeded):
        execute_with_retry(s, lambda: s.execute(text("SELECT pg_sleep(30)")), deadline=0.3)
    with admin_cursor() as cur:  # the connection is closed; without the client check the backend would sleep on

        def sleepers() -> int:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE %s",
                (pg_database, "%pg_sleep(30)%"),
            )
            return int(cur.fetchone()[0])

        assert wait_until(lambda: sleepers() == 0, timeout=3), "the backend stopped within a few checks"


def test_the_client_check_is_asked_once_per_server(
    watched: Callable[..., Database], wire: tuple[FaultProxy, FrontendMessages]
) -> None:
    _, messages = wire
    for database in (watched(), watched()):
        with database.session() as s:
            s.execute(text("SELECT 1"))
            s.commit()
    queries = messages.take()
    probes = [q for q in queries if "set_config('client_connection_check_interval'" in q]
    assert len(probes) == 1, queries
    assert queries.count(f"BEGIN;{CLIENT_CHECK};SELECT 1") == 2


def test_a_server_that_refuses_the_client_check_is_not_sent_it(
    watched: Callable[..., Database], wire: tuple[FaultProxy, FrontendMessages], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL on a platform that cannot poll for a closed peer (Windows; 14 off Linux) refuses the setting,
    and would then refuse every transaction that sets it. This server takes it: its verdict is set instead."""
    proxy, messages = wire
    monkeypatch.setitem(pipelined._CLIENT_CHECK_TAKEN, ("127.0.0.1", proxy.port), False)  # noqa: SLF001
    database = watched()
    with database.session() as s:
        s.execute(text("SELECT 1"))
        s.commit()
    queries = messages.take()
    assert "BEGIN;SELECT 1" in queries and not [q for q in queries if "client_connection_check_interval" in q], queries
