"""Pipelined connections (src/brownout/_db/pipelined.py): what a lazily opened transaction must still mean
to SQLAlchemy, psycopg2, psycopg2.extras, a pooler and the operator, against the real database.

The server has transactions open that psycopg2 itself never began (libpq stays in autocommit): everything
that asks psycopg2 whether a transaction is open (its status, set_isolation_level, the extras' type lookups,
SQLAlchemy's AUTOCOMMIT and streamed reads) must still get the answer a plain connection would give."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extras
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout._db import Database
from brownout._db.pipelined import CLIENT_CHECK, commit_with
from brownout._dispatch.apply import KeyConflict
from brownout._dispatch.dispatcher import Applied, Dispatcher
from tests.conftest import PG_URL, admin_cursor, database_url
from tests.support.pg_wire import FrontendMessages
from tests.support.pgbouncer import PgBouncer
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy
from tests.support.written_rows import committed_ids, row_counts


@pytest.fixture
def one_connection(single_connection: Callable[..., Database]) -> Callable[..., Database]:
    """Each checkout is the same connection again, pinged at every checkout."""
    return functools.partial(single_connection, pool_pre_ping_idle_seconds=0)


def idle_in_transaction(dbname: str) -> int:
    with admin_cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
            (dbname,),
        )
        return int(cur.fetchone()[0])


# -- a pre-ping at checkout, then transaction settings (the ping runs outside any transaction)


def test_an_isolation_level_asked_after_a_pre_ping_is_the_one_the_transaction_gets(
    one_connection: Callable[..., Database],
) -> None:
    database = one_connection()
    with database.engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
        level = conn.execute(text("SELECT current_setting('transaction_isolation')")).scalar_one()
        conn.rollback()
    assert level == "serializable"


def test_autocommit_after_a_pre_ping_runs_outside_any_transaction(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    database = one_connection()
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("INSERT INTO items VALUES (1)")
        assert committed_ids(pg_database) == [1], "an AUTOCOMMIT statement is committed when it returns"
        conn.exec_driver_sql("VACUUM items")  # refused inside a transaction block
    assert idle_in_transaction(pg_database) == 0, "the pool holds no open transaction"


def test_a_read_only_transaction_asked_after_a_pre_ping_refuses_writes(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    with database.engine.connect().execution_options(postgresql_readonly=True) as conn:
        with pytest.raises(DBAPIError, match="read-only transaction"):
            conn.exec_driver_sql("INSERT INTO items VALUES (3)")
        conn.rollback()


# -- the same after SQLAlchemy's own Connection.get_isolation_level() (Alembic's autocommit_block calls it)


def test_autocommit_after_get_isolation_level_runs_outside_any_transaction(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """Alembic's `autocommit_block()` does exactly this: `get_isolation_level()`, then AUTOCOMMIT (for
    CREATE INDEX CONCURRENTLY and the like). psycopg2's set_isolation_level rolls back the transaction in
    progress; it cannot see the one `BEGIN;show transaction isolation level` opened."""
    database = one_connection(pool_pre_ping=False)
    with database.engine.connect() as conn:
        assert conn.get_isolation_level() == "READ COMMITTED"
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        autocommit.exec_driver_sql("INSERT INTO items VALUES (1)")
        assert committed_ids(pg_database) == [1], "an AUTOCOMMIT statement is committed when it returns"
        autocommit.exec_driver_sql("CREATE INDEX CONCURRENTLY items_id ON items (id)")
    assert idle_in_transaction(pg_database) == 0, "the pool holds no open transaction"


def test_autocommit_after_get_isolation_level_leaves_no_transaction_open_in_the_pool(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    database = one_connection(pool_pre_ping=False)
    with database.engine.connect() as conn:
        conn.get_isolation_level()
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("INSERT INTO items VALUES (2)")
    assert idle_in_transaction(pg_database) == 0, "the pool holds no open transaction"
    assert committed_ids(pg_database) == [2], "the AUTOCOMMIT write is committed once the connection is back"


def test_serializable_after_get_isolation_level_is_serializable(one_connection: Callable[..., Database]) -> None:
    database = one_connection(pool_pre_ping=False)
    with database.engine.connect() as conn:
        conn.get_isolation_level()
        serializable = conn.execution_options(isolation_level="SERIALIZABLE")
        level = serializable.execute(text("SELECT current_setting('transaction_isolation')")).scalar_one()
        serializable.rollback()
    assert level == "serializable"


# -- behind a transaction-mode pooler


def test_behind_a_pooler_every_transaction_keeps_its_statement_timeout(make_database: Callable[..., Database]) -> None:
    """After a connection served an AUTOCOMMIT block, its later transactions still get the pooler's
    `SET LOCAL statement_timeout`."""
    database = make_database(
        database_pooler="transaction", db_statement_timeout_seconds=5, pool_size=1, pool_max_overflow=0, pool_pre_ping=False
    )
    with database.session() as s:
        assert s.execute(text("SHOW statement_timeout")).scalar_one() == "5s"
        s.rollback()
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("SELECT 1")
    with database.session() as s:
        assert s.execute(text("SHOW statement_timeout")).scalar_one() == "5s"
        s.rollback()


def test_behind_a_pooler_a_streamed_read_keeps_the_statement_timeout_after(make_database: Callable[..., Database]) -> None:
    database = make_database(
        database_pooler="transaction", db_statement_timeout_seconds=5, pool_size=1, pool_max_overflow=0, pool_pre_ping=False
    )
    with database.session() as s:
        assert [r[0] for r in s.execute(text("SELECT 1"), execution_options={"stream_results": True})] == [1]
        s.rollback()
    with database.session() as s:
        assert s.execute(text("SHOW statement_timeout")).scalar_one() == "5s"
        s.rollback()


def test_a_psycopg2_extras_type_lookup_inside_a_transaction_keeps_the_transaction(
    make_database: Callable[..., Database], pg_database: str
) -> None:
    """psycopg2.extras' type registrations (register_json, register_composite, register_range, hstore) read
    pg_type and roll back afterwards unless `conn.status` says a transaction was already open. On a pipelined
    connection psycopg2's own status never says so: the caller's transaction was rolled back with it."""
    database = make_database(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("CREATE TABLE items (id int PRIMARY KEY)"))
        s.commit()
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (4)"))
        dbapi = s.connection().connection.dbapi_connection
        psycopg2.extras.register_json(dbapi, name="json")
        s.execute(text("INSERT INTO items VALUES (5)"))
        s.commit()
    assert committed_ids(pg_database) == [4, 5]


# -- server-side cursors inside a transaction psycopg2 never saw


def test_a_streamed_read_refused_before_it_was_sent_leaves_the_rollback_working(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """A DECLARE refused before it is sent (a parameter psycopg2 cannot adapt) inside the transaction the
    INSERT opened: rollback() must still end that transaction, or it stays open in the pool and the next
    session's COMMIT commits the rolled-back INSERT."""
    database = one_connection(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (1)"))
        with pytest.raises(DBAPIError, match="can't adapt"):
            s.execute(text("SELECT :x"), {"x": object()}, execution_options={"stream_results": True})
        s.rollback()
    left_open = idle_in_transaction(pg_database)
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (2)"))
        s.commit()
    assert (left_open, committed_ids(pg_database)) == (0, [2]), "no open transaction in the pool; 1 never committed"


def test_a_kill_while_idle_in_transaction_fails_the_commit(one_connection: Callable[..., Database], pg_database: str) -> None:
    database = one_connection(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (1)"))
        pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with admin_cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DBAPIError):
            s.commit()
    assert committed_ids(pg_database) == []
    with database.session() as s:  # the pool gave a working connection back
        s.execute(text("INSERT INTO items VALUES (2)"))
        s.commit()
    assert committed_ids(pg_database) == [2]


def test_behind_a_pooler_a_pinged_connection_keeps_the_statement_timeout_after_autocommit(
    make_database: Callable[..., Database],
) -> None:
    """A pinged checkout after an AUTOCOMMIT block: the transaction that follows the ping still opens with
    `SET LOCAL statement_timeout`."""
    database = make_database(
        database_pooler="transaction",
        db_statement_timeout_seconds=5,
        pool_size=1,
        pool_max_overflow=0,
        pool_pre_ping_idle_seconds=0,
    )
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("SELECT 1")
    for _ in range(2):
        with database.session() as s:  # pinged at checkout
            assert s.execute(text("SHOW statement_timeout")).scalar_one() == "5s"
            s.rollback()


# -- direct writes: the record rides with the COMMIT

NOTE = {"user_id": 7, "email": "ada@example.com", "subject": "Hi", "body": "Hello"}


def make_dispatcher(database: Database) -> Dispatcher:
    return Dispatcher(database=database, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=5.0)


def test_a_backend_killed_between_the_effect_and_the_record_applies_the_write_once(
    make_database: Callable[..., Database], pg_database: str
) -> None:
    """The record's round trip carries the COMMIT, so its failure counts as a COMMIT sent: the direct path
    (idempotent) must retry it, and the retry must apply it once, not report a duplicate of nothing."""
    upgrade_database(database_url(pg_database))
    database = make_database(pool_pre_ping=False)
    dispatcher = make_dispatcher(database)
    kills: list[int] = []

    records: list[str] = []

    def kill_before_the_record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO applied_commands"):
            records.append(statement)
        if records and not kills:
            kills.append(cursor.connection.info.backend_pid)
            with admin_cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (kills[0],))

    event.listen(database.engine, "before_cursor_execute", kill_before_the_record)
    try:
        outcome = dispatcher.submit(CREATE, NOTE, idempotency_key="killed-between")
    finally:
        event.remove(database.engine, "before_cursor_execute", kill_before_the_record)
    assert kills and len(records) == 2, "the record's first round trip failed, and was retried"
    assert isinstance(outcome, Applied) and not outcome.duplicate
    assert row_counts(database) == (1, 1, 1)


def test_through_pgbouncer_direct_writes_and_duplicates(
    make_database: Callable[..., Database], pg_database: str, bouncer: PgBouncer
) -> None:
    upgrade_database(database_url(pg_database))
    url = bouncer.dsn(pg_database, "brownout", "brownout", sslmode="require")
    database = make_database(database_url=url, database_pooler="transaction", db_statement_timeout_seconds=5)
    dispatcher = make_dispatcher(database)
    first = dispatcher.submit(CREATE, NOTE, idempotency_key="via-bouncer")
    again = dispatcher.submit(CREATE, NOTE, idempotency_key="via-bouncer")
    assert isinstance(first, Applied) and not first.duplicate
    assert isinstance(again, Applied) and again.duplicate and again.result == first.result
    assert row_counts(database) == (1, 1, 1)


def test_through_pgbouncer_the_statement_timeout_cuts_the_first_statement(
    make_database: Callable[..., Database], pg_database: str, bouncer: PgBouncer
) -> None:
    """`BEGIN;SET LOCAL statement_timeout = 500;SELECT pg_sleep(3)` is one message: the SET LOCAL must
    already bound the statement that follows it in that message."""
    url = bouncer.dsn(pg_database, "brownout", "brownout", sslmode="require")
    database = make_database(database_url=url, database_pooler="transaction", db_statement_timeout_seconds=0.5)
    started = time.monotonic()
    with database.session() as s:
        with pytest.raises(DBAPIError, match="statement timeout"):
            s.execute(text("SELECT pg_sleep(3)"))
        s.rollback()
    assert time.monotonic() - started < 2.5


# -- DB-API results and batched statements on the first statement of a transaction


def test_the_first_statement_reports_its_own_rowcount_and_rows(one_connection: Callable[..., Database]) -> None:
    database = one_connection(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (1), (2), (3)"))
        s.commit()
    with database.session() as s:
        assert s.execute(text("UPDATE items SET id = id WHERE id < 3")).rowcount == 2
        s.rollback()
        assert s.execute(text("DELETE FROM items WHERE id = 3 RETURNING id")).scalars().all() == [3]
        s.rollback()


def test_executemany_and_extras_helpers_as_a_transactions_first_statement_roll_back(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    database = one_connection(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (1), (2)"))
        s.commit()
    with database.session() as s:  # cursor.executemany (not an INSERT: no insertmanyvalues)
        result = s.execute(text("DELETE FROM items WHERE id = :id"), [{"id": 1}, {"id": 2}])
        assert result.rowcount == 2
        s.rollback()
    assert committed_ids(pg_database) == [1, 2]
    raw = database.engine.raw_connection()
    try:
        with raw.cursor() as cur:
            psycopg2.extras.execute_values(cur, "INSERT INTO items VALUES %s", [(3,), (4,)])
            psycopg2.extras.execute_batch(cur, "INSERT INTO items VALUES (%s)", [(5,), (6,)])
        raw.rollback()
    finally:
        raw.close()
    assert committed_ids(pg_database) == [1, 2]
    assert idle_in_transaction(pg_database) == 0


def test_commit_with_inside_a_savepoint_commits_everything_once_and_raises_nothing(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """Session.commit() inside begin_nested() releases the SAVEPOINT and commits the outermost transaction.
    A COMMIT folded into the statement ended the transaction first, so the RELEASE SAVEPOINT that followed
    failed ("savepoint does not exist") after the write had committed: an error reported for a write that
    is in the database."""
    database = one_connection(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (1)"))
        s.begin_nested()
        commit_with(s, text("INSERT INTO items VALUES (2)"), {})
    assert committed_ids(pg_database) == [1, 2]


class _Base(DeclarativeBase):
    pass


class _Item(_Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_commit_with_commits_the_sessions_pending_objects_in_the_same_transaction(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """An apply function that adds ORM objects (session.add) and leaves them to the commit's flush: a Core
    statement does not autoflush, so the COMMIT folded into the record went before the flush, and the
    objects were flushed and committed in a transaction of their own afterwards. Here that flush fails
    (a duplicate key): the record must not be committed without them."""
    database = one_connection(pool_pre_ping=False)
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (1)"))
        s.commit()
    with database.session() as s:
        s.add(_Item(id=1))  # the effect: its flush fails
        with pytest.raises(DBAPIError):
            commit_with(s, text("INSERT INTO items VALUES (2)"), {})  # the record
        s.rollback()
    assert committed_ids(pg_database) == [1], "the record committed without its effect"


def test_commit_with_and_pending_objects_commit_together_in_one_transaction(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    database = one_connection(pool_pre_ping=False)
    with database.session() as s:
        s.add(_Item(id=3))
        commit_with(s, text("INSERT INTO items SELECT 4 FROM items WHERE id = 3"), {})  # sees the effect
    assert committed_ids(pg_database) == [3, 4]


def test_a_direct_write_cut_by_its_deadline_while_its_record_waits_is_not_refused_and_then_committed(
    make_database: Callable[..., Database], pg_database: str
) -> None:
    """The record travels with the COMMIT: a deadline that cuts its round trip while the INSERT waits (here
    on a lock on applied_commands) closes the connection, and without `client_connection_check_interval`
    the backend, once the lock goes, inserted and COMMITted with no client: the dispatcher had answered
    Rejected (503: try again; no queue configured) and a key-less retry made a second write. With the check
    the backend notices its client gone within 100 ms and rolls back."""
    upgrade_database(database_url(pg_database))
    database = make_database(pool_pre_ping=False)
    dispatcher = Dispatcher(
        database=database, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=0.5
    )
    assert isinstance(dispatcher.submit(CREATE, NOTE), Applied)  # warm: connected, statements cached
    locker = psycopg2.connect(database_url(pg_database))
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE applied_commands IN SHARE MODE")
        outcome = dispatcher.submit(CREATE, NOTE)  # no key: a retry is a new write
        time.sleep(1.0)  # ten checks' worth: the backend must have seen its client gone before the lock goes
    finally:
        locker.rollback()
        locker.close()
    assert wait_until(lambda: idle_or_gone(pg_database), timeout=5)
    counts = row_counts(database)
    assert (type(outcome).__name__, counts) in {("Rejected", (1, 1, 1)), ("Applied", (2, 2, 2))}, (outcome, counts)


def idle_or_gone(dbname: str) -> bool:
    with admin_cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (dbname,))
        return int(cur.fetchone()[0]) == 0


def test_after_autocommit_a_pinged_checkout_costs_no_session_settings_round_trip(
    make_database: Callable[..., Database], pg_database: str
) -> None:
    """psycopg2 sends `SET default_transaction_...` when its session settings change in autocommit: after
    SQLAlchemy set and reset an isolation level, no pinged checkout may pay that round trip."""
    messages = FrontendMessages()
    port = make_url(PG_URL).port or 5432
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=port, on_client_bytes=messages) as proxy:
        url = database_url(pg_database, port=proxy.port, sslmode="disable")
        database = make_database(database_url=url, pool_size=1, pool_max_overflow=0, pool_pre_ping_idle_seconds=0)
        with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("SELECT 1")
        messages.take()
        with database.session() as s:  # pinged at checkout
            s.execute(text("SELECT 2"))
            s.rollback()
        queries = messages.take()
    # SQLAlchemy gave the connection back its default isolation level by name: the BEGIN carries it
    assert queries == ["SELECT 1", f"BEGIN ISOLATION LEVEL READ COMMITTED;{CLIENT_CHECK};SELECT 2", "ROLLBACK"], queries


def test_no_connection_waits_idle_in_transaction_in_the_pool_after_each_kind_of_use(
    make_database: Callable[..., Database], pg_database: str
) -> None:
    upgrade_database(database_url(pg_database))
    database = make_database(pool_size=2, pool_max_overflow=0, pool_pre_ping_idle_seconds=0)
    dispatcher = make_dispatcher(database)
    assert isinstance(dispatcher.submit(CREATE, NOTE, idempotency_key="k"), Applied)
    assert idle_in_transaction(pg_database) == 0, "after a direct write"
    assert isinstance(dispatcher.submit(CREATE, NOTE, idempotency_key="k"), Applied)
    assert idle_in_transaction(pg_database) == 0, "after a duplicate"
    with pytest.raises(KeyConflict):
        dispatcher.submit(CREATE, NOTE | {"subject": "other"}, idempotency_key="k")
    assert idle_in_transaction(pg_database) == 0, "after a conflict"
    with database.session() as s:
        s.execute(text("SELECT 1"))
    assert idle_in_transaction(pg_database) == 0, "after a session closed without commit or rollback"
    with database.session() as s, pytest.raises(DBAPIError):
        s.execute(text("SELECT * FROM no_such_table"))
    assert idle_in_transaction(pg_database) == 0, "after a failed statement"
    with database.session() as s:
        list(s.execute(text("SELECT 1"), execution_options={"stream_results": True}))
    assert idle_in_transaction(pg_database) == 0, "after a streamed read"
    with database.engine.connect() as conn:
        conn.get_isolation_level()
    assert idle_in_transaction(pg_database) == 0, "after get_isolation_level"
    assert row_counts(database) == (1, 1, 1)
