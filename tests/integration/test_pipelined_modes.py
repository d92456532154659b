"""Pipelined connections (src/brownout/_db/pipelined.py): transaction modes across pool checkouts, server-side
cursors across transactions, and the psycopg2 calls that bypass `execute` (reset, COPY), against the real
database and a real PgBouncer.

The modes (isolation level, read-only, deferrable, autocommit) are kept on the connection, not on the server:
whatever SQLAlchemy sets for one checkout it must be able to take back, and nothing psycopg2 does on its own
(reset) may leave them, or libpq's autocommit, behind."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import pytest
from sqlalchemy import column, event, insert, table, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from brownout._db import Database
from brownout._db.pipelined import _BASE_AUTOCOMMIT, PipelinedConnection, commit_with
from tests.conftest import admin_cursor
from tests.support.pgbouncer import PgBouncer
from tests.support.written_rows import committed_ids


@pytest.fixture
def one_connection(single_connection: Callable[..., Database]) -> Callable[..., Database]:
    """Each checkout is the same connection again, and no ping runs on it."""
    return functools.partial(single_connection, pool_pre_ping=False)


def transaction_modes(database: Database) -> tuple[str, str, str]:
    """What a plain session's transaction gets, on the (single) pooled connection."""
    with database.session() as s:
        row = s.execute(
            text(
                "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'),"
                " current_setting('transaction_deferrable')"
            )
        ).one()
        s.rollback()
    return (row[0], row[1], row[2])


DEFAULT_MODES = ("read committed", "off", "off")


def stream_started(s: Session, rows: int = 1000) -> Any:
    """A streamed read of *rows* numbers with its first row taken: a server-side cursor open on the session."""
    streamed = s.execute(text(f"SELECT g FROM generate_series(1, {rows}) AS g"), execution_options={"stream_results": True})
    assert next(iter(streamed))[0] == 1
    return streamed


def server_cursors(database: Database) -> int:
    """Cursors open on the server session of the (single) pooled connection."""
    with database.engine.connect() as conn:
        count = int(conn.exec_driver_sql("SELECT count(*) FROM pg_cursors").scalar_one())
        conn.rollback()
    return count


# -- modes set for one checkout do not reach the next ---------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"isolation_level": "SERIALIZABLE", "postgresql_readonly": True, "postgresql_deferrable": True},
        {"isolation_level": "REPEATABLE READ"},
        {"postgresql_readonly": True},
        {"isolation_level": "AUTOCOMMIT"},
    ],
    ids=["serializable-ro-deferrable", "repeatable-read", "read-only", "autocommit"],
)
def test_connection_execution_options_apply_to_one_checkout_only(
    one_connection: Callable[..., Database], options: dict[str, object]
) -> None:
    database = one_connection()
    with database.engine.connect().execution_options(**options) as conn:
        got = conn.execute(
            text("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')")
        ).one()
        conn.rollback()
    if "isolation_level" in options and options["isolation_level"] != "AUTOCOMMIT":
        assert got[0] == str(options["isolation_level"]).lower()
    if options.get("postgresql_readonly"):
        assert got[1] == "on"
    assert transaction_modes(database) == DEFAULT_MODES


def test_session_connection_execution_options_apply_to_one_session_only(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    database = one_connection()
    with database.session() as s:
        s.connection(execution_options={"isolation_level": "SERIALIZABLE", "postgresql_readonly": True})
        assert s.execute(text("SELECT current_setting('transaction_isolation')")).scalar_one() == "serializable"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            s.execute(text("INSERT INTO items VALUES (1)"))
        s.rollback()
        # after the rollback the session's next transaction gets a connection without the options
        s.execute(text("INSERT INTO items VALUES (2)"))
        s.commit()
    assert transaction_modes(database) == DEFAULT_MODES
    assert committed_ids(pg_database) == [2]


def test_engine_execution_options_do_not_reach_the_base_engine(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    serializable = database.engine.execution_options(isolation_level="SERIALIZABLE", postgresql_readonly=True)
    with serializable.connect() as conn:
        assert conn.execute(text("SELECT current_setting('transaction_read_only')")).scalar_one() == "on"
        conn.rollback()
    assert transaction_modes(database) == DEFAULT_MODES


def test_modes_of_a_checkout_that_failed_are_taken_back(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    with database.engine.connect().execution_options(isolation_level="SERIALIZABLE", postgresql_readonly=True) as conn:
        with pytest.raises(DBAPIError):
            conn.execute(text("SELECT * FROM no_such_table"))
    assert transaction_modes(database) == DEFAULT_MODES


def test_isolation_levels_by_name_and_number_on_the_raw_connection(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        assert isinstance(dbapi, PipelinedConnection)
        for value, expected in [
            ("repeatable read", "repeatable read"),
            ("SERIALIZABLE", "serializable"),
            (ext.ISOLATION_LEVEL_READ_UNCOMMITTED, "read uncommitted"),
            ("DEFAULT", "read committed"),
        ]:
            dbapi.isolation_level = value
            with dbapi.cursor() as cur:
                cur.execute("SELECT current_setting('transaction_isolation')")
                assert cur.fetchone()[0] == expected, value
            dbapi.rollback()
        with pytest.raises(ValueError):
            dbapi.isolation_level = "SNAPSHOT"
    finally:
        raw.close()


# -- psycopg2's reset(): "rolls back an eventual pending transaction", back to the session defaults


def test_reset_rolls_back_the_pending_transaction(one_connection: Callable[..., Database], pg_database: str) -> None:
    """psycopg2's reset() runs DISCARD ALL after rolling back the transaction *it* began; on a pipelined
    connection psycopg2 knows of none, so DISCARD ALL ran inside the open transaction and failed."""
    database = one_connection()
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        with dbapi.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1)")
        dbapi.reset()
        dbapi.commit()
    finally:
        raw.close()
    assert committed_ids(pg_database) == []


def test_reset_gives_back_the_default_modes_and_keeps_libpq_in_autocommit(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """psycopg2's reset() puts its own (libpq) autocommit back to off: psycopg2 then sent a BEGIN of its own
    before each statement, in front of ours ("there is already a transaction in progress"), and its status
    said "in transaction" forever after. And the modes set before the reset must be the defaults again."""
    database = one_connection()
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        dbapi.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True)
        dbapi.reset()
        assert _BASE_AUTOCOMMIT.__get__(dbapi) is True, "libpq stays in autocommit: the BEGIN is ours"
        assert (dbapi.isolation_level, dbapi.readonly, dbapi.deferrable, dbapi.autocommit) == (None, None, None, False)
        del dbapi.notices[:]
        with dbapi.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1)")  # refused if READ ONLY were left
        dbapi.commit()
        assert dbapi.status == ext.STATUS_READY
        assert dbapi.notices == []
    finally:
        raw.close()
    assert committed_ids(pg_database) == [1]


def test_a_cursor_factory_set_on_the_connection_stays_in_the_transaction(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """`conn.cursor_factory = RealDictCursor` (as a `connect` listener may set it): psycopg2 then made plain
    RealDictCursors, whose statements carried no BEGIN and committed on their own, whatever rollback() said."""
    database = one_connection()
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        dbapi.cursor_factory = psycopg2.extras.RealDictCursor
        with dbapi.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1) RETURNING id")
            assert cur.fetchone() == {"id": 1}
        with dbapi.cursor(None, psycopg2.extras.NamedTupleCursor) as cur:  # the factory given by position
            cur.execute("INSERT INTO items VALUES (2) RETURNING id")
            assert cur.fetchone().id == 2
        with dbapi.cursor("streamed") as cur:
            cur.execute("SELECT id FROM items ORDER BY id")
            assert cur.fetchall() == [{"id": 1}, {"id": 2}]
        dbapi.rollback()
    finally:
        dbapi.cursor_factory = None
        raw.close()
    assert committed_ids(pg_database) == []


def test_a_server_side_cursor_read_after_its_transaction_is_refused_without_a_disconnect(
    one_connection: Callable[..., Database],
) -> None:
    """Read after the connection's commit or rollback, a streamed result fails as with psycopg2's own named
    cursors ("named cursor isn't valid anymore"): not "cursor already closed", which SQLAlchemy takes for a
    lost connection (invalidating it, and the whole pool behind no pooler)."""
    database = one_connection()
    invalidated: list[object] = []
    event.listen(database.engine, "invalidate", lambda *args: invalidated.append(args))
    for end in ("commit", "rollback"):
        with database.engine.connect() as conn:
            streamed = conn.execute(
                text("SELECT g FROM generate_series(1, 1000) AS g"), execution_options={"stream_results": True}
            )
            rows = iter(streamed)
            assert next(rows)[0] == 1
            getattr(conn, end)()
            with pytest.raises(DBAPIError, match="isn't valid anymore"):
                next(rows)
    assert invalidated == []
    assert server_cursors(database) == 0


# -- COPY: psycopg2 refuses it under a wait callback (which the engine always installs)


def test_a_copy_refused_under_the_wait_callback_opens_no_transaction(one_connection: Callable[..., Database]) -> None:
    """copy_expert sent its BEGIN, then psycopg2 refused the COPY itself ("cannot be used with an asynchronous
    callback"): a transaction was left open that nothing in the caller's code had begun, and switching the
    connection to autocommit then failed."""
    database = one_connection()
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        with dbapi.cursor() as cur, pytest.raises(psycopg2.ProgrammingError, match="asynchronous callback"):
            cur.copy_expert("COPY items TO STDOUT", io.StringIO())
        assert dbapi.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
        dbapi.autocommit = True
        dbapi.autocommit = False
    finally:
        raw.close()


# -- server-side cursors (declared WITH HOLD) and the end of their transaction


def test_a_streamed_read_left_open_across_a_commit_does_not_outlive_its_session(
    one_connection: Callable[..., Database],
) -> None:
    """A `yield_per`/`stream_results` read, partly consumed, then a commit (the batch-processing loop): at the
    COMMIT PostgreSQL materialises the rest of the result for the held cursor, and the cursor, with those rows,
    stays on the server session after the Session closes and the connection goes back to the pool (until
    the connection itself is closed). A plain psycopg2 named cursor ends with its transaction."""
    database = one_connection()
    with database.session() as s:
        streamed = stream_started(s, rows=200000)
        s.commit()
    assert server_cursors(database) == 0
    del streamed


def test_a_streamed_read_left_open_before_commit_with_does_not_outlive_its_transaction(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    database = one_connection()
    with database.session() as s:
        streamed = stream_started(s)
        commit_with(s, text("INSERT INTO items VALUES (1)"), {})
    assert server_cursors(database) == 0
    assert committed_ids(pg_database) == [1]
    del streamed


def test_a_cursor_the_caller_asked_with_hold_outlives_the_commit(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        with dbapi.cursor("held", withhold=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 10) AS g")
            assert cur.fetchone() == (1,)
            dbapi.commit()
            assert cur.fetchone() == (2,)
        dbapi.commit()
    finally:
        raw.close()


def test_a_streamed_read_under_autocommit_is_refused_as_psycopg2_refuses_it(one_connection: Callable[..., Database]) -> None:
    """Outside a transaction a cursor declared WITH HOLD is materialised whole before its first row (no
    streaming at all), and, left open, stayed on the pooled connection for the next checkout. psycopg2's own
    named cursors refuse autocommit ("can't use a named cursor outside of transactions")."""
    database = one_connection()
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        with pytest.raises(DBAPIError, match="outside of transactions"):
            conn.execute(text("SELECT g FROM generate_series(1, 1000) AS g"), execution_options={"stream_results": True})
    assert server_cursors(database) == 0
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        dbapi.autocommit = True
        with dbapi.cursor("held", withhold=True) as cur:  # asked WITH HOLD: allowed, as by psycopg2
            cur.execute("SELECT 1")
            assert cur.fetchall() == [(1,)]
        dbapi.autocommit = False
    finally:
        raw.close()


def test_a_streamed_read_left_open_and_rolled_back_leaves_no_cursor(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    with database.session() as s:
        streamed = stream_started(s)
    assert server_cursors(database) == 0
    del streamed


def test_a_streamed_read_cut_by_an_error_leaves_no_cursor(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    with database.session() as s:
        streamed = stream_started(s)
        with pytest.raises(DBAPIError):
            s.execute(text("SELECT 1/0"))
        s.rollback()
    assert server_cursors(database) == 0
    del streamed


def test_a_streamed_read_closed_after_its_rollback_does_not_lose_the_next_write(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """The ROLLBACK drops the server-side cursor; psycopg2, told WITH HOLD, still sent `CLOSE <name>` when the
    result was closed later, inside the transaction the next write had opened: "cursor does not exist"
    (logged and swallowed by SQLAlchemy's result close) aborted that transaction, and the session's COMMIT,
    answered ROLLBACK without an error, reported the write as committed. With psycopg2's own named cursors
    the late close fails on the client ("named cursor isn't valid anymore") and the write commits."""
    database = one_connection()
    with database.session() as s:
        streamed = stream_started(s)
        s.rollback()
        s.execute(text("INSERT INTO items VALUES (1)"))
        streamed.close()
        s.commit()
    assert committed_ids(pg_database) == [1]


def test_a_streamed_read_after_a_failed_statement_closes_quietly(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    database = one_connection()
    with database.session() as s:
        streamed = stream_started(s)
        with pytest.raises(DBAPIError):
            s.execute(text("SELECT 1/0"))
        s.rollback()
        s.execute(text("INSERT INTO items VALUES (2)"))
        streamed.close()
        s.commit()
    assert committed_ids(pg_database) == [2]


# -- insertmanyvalues: several round trips, one transaction


ITEMS = table("items", column("id"))


def test_commit_with_a_multi_batch_insert_commits_nothing_when_a_later_batch_fails(
    one_connection: Callable[..., Database], pg_database: str
) -> None:
    """SQLAlchemy sends an executemany INSERT as several `INSERT ... VALUES` batches (insertmanyvalues): a
    COMMIT folded into the first batch would commit it before the second fails."""
    database = one_connection()
    with database.session() as s:
        s.execute(text("INSERT INTO items VALUES (2500)"))
        s.commit()
    with database.session() as s:
        stmt = insert(ITEMS).returning(ITEMS.c.id)  # RETURNING: insertmanyvalues, page of 1000
        with pytest.raises(IntegrityError):
            commit_with(s, stmt, [{"id": n} for n in range(1, 2600)])
        s.rollback()
    assert committed_ids(pg_database) == [2500]


def test_insertmanyvalues_as_the_first_statement_rolls_back(one_connection: Callable[..., Database], pg_database: str) -> None:
    database = one_connection()
    with database.session() as s:
        s.execute(insert(ITEMS).returning(ITEMS.c.id), [{"id": n} for n in range(1, 2500)]).all()
        s.rollback()
    assert committed_ids(pg_database) == []


def test_notices_do_not_pile_up(one_connection: Callable[..., Database]) -> None:
    database = one_connection()
    raw = database.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        for n in range(30):
            with dbapi.cursor() as cur:
                cur.execute("SELECT %s", (n,))
            dbapi.commit() if n % 2 else dbapi.rollback()
            dbapi.commit()
            dbapi.rollback()
        assert dbapi.notices == []
    finally:
        raw.close()


# -- through a real PgBouncer (transaction mode)


def test_through_pgbouncer_every_transaction_gets_its_modes_and_the_client_check(
    make_database: Callable[..., Database], pg_database: str, bouncer: PgBouncer
) -> None:
    url = bouncer.dsn(pg_database, "brownout", "brownout", sslmode="require")
    database = make_database(
        database_url=url, database_pooler="transaction", db_statement_timeout_seconds=5, pool_pre_ping_idle_seconds=0
    )
    with database.engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert isinstance(dbapi, PipelinedConnection)
        real = conn.exec_driver_sql("SELECT current_setting('server_version_num')::int").scalar_one()
        assert dbapi.server_version == real, "PgBouncer passes the server's version on"
        conn.rollback()
    for _ in range(3):  # pinged checkouts: each transaction may run on another server connection
        with database.engine.connect().execution_options(isolation_level="SERIALIZABLE", postgresql_readonly=True) as conn:
            got = conn.exec_driver_sql(
                "SELECT current_setting('client_connection_check_interval'), current_setting('statement_timeout'),"
                " current_setting('transaction_isolation'), current_setting('transaction_read_only')"
            ).one()
            conn.rollback()
        assert tuple(got) == ("100ms", "5s", "serializable", "on")
        with database.session() as s:
            assert s.execute(text("SELECT current_setting('transaction_read_only')")).scalar_one() == "off"
            s.rollback()
    with admin_cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
            (pg_database,),
        )
        assert cur.fetchone()[0] == 0
