"""The PgBouncer test helper against the real PostgreSQL: it starts, pools in
transaction mode, speaks TLS to clients, refuses ``options`` like Supabase's
pooler, lets a test kill the backends behind it, and cleans up.

The messages asserted here are the ones the error classifier must recognise.
A missing PgBouncer skips locally but fails under CI (``CI`` set), so CI can
never pass by skipping.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from tests.support import pgbouncer as pgbouncer_module
from tests.support.pgbouncer import PgBouncer, PgBouncerError, PgBouncerUnavailable, start_pgbouncer_or_skip

pytestmark = pytest.mark.pgbouncer

USER, PASSWORD = "postgres", "brownout-test-secret"
CLOSED = "server closed the connection unexpectedly"
SSL_CLOSED = "SSL connection has been closed unexpectedly"


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    started = start_pgbouncer_or_skip(
        users={USER: PASSWORD},
    )
    yield started
    started.stop()


def connect(bouncer: PgBouncer, *, sslmode: str = "require", **options: Any) -> psycopg2.extensions.connection:
    """A psycopg2 connection to ``postgres`` through the pooler, as the test superuser."""
    dsn = bouncer.dsn("postgres", USER, PASSWORD, sslmode=sslmode)
    conn: psycopg2.extensions.connection = psycopg2.connect(dsn, connect_timeout=5, **options)
    return conn


def scalar(conn: psycopg2.extensions.connection, sql: str) -> object:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    conn.commit()
    assert row is not None
    return row[0]


def test_select_one_over_tls_to_the_pooler(bouncer: PgBouncer) -> None:
    conn = connect(bouncer, sslmode="require")
    try:
        assert scalar(conn, "SELECT 1") == 1
        assert conn.info.ssl_in_use
        assert conn.info.port == bouncer.port
    finally:
        conn.close()


def test_plain_clients_are_allowed_too(bouncer: PgBouncer) -> None:
    conn = connect(bouncer, sslmode="disable")
    try:
        assert scalar(conn, "SELECT 1") == 1
        assert not conn.info.ssl_in_use
    finally:
        conn.close()


def test_dsn_is_a_libpq_url() -> None:
    helper = PgBouncer(users={USER: PASSWORD})
    assert helper.dsn("db", "u s", "p@ss") == "postgresql://u%20s:p%40ss@127.0.0.1:0/db?sslmode=require"
    assert helper.dsn("db", "u", sslmode="disable") == "postgresql://u@127.0.0.1:0/db?sslmode=disable"


def test_startup_options_are_refused_as_by_supabases_pooler(bouncer: PgBouncer) -> None:
    with pytest.raises(psycopg2.OperationalError) as refused:
        connect(bouncer, options="-c statement_timeout=1000")

    assert str(refused.value) == (
        f'connection to server at "127.0.0.1", port {bouncer.port} failed: FATAL:  unsupported startup parameter: options\n'
    )


def test_wrong_password_is_refused_by_the_pooler(bouncer: PgBouncer) -> None:
    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(bouncer.dsn("postgres", USER, "wrong"), connect_timeout=5)

    assert str(refused.value).endswith("failed: FATAL:  SASL authentication failed\n")


def test_transaction_mode_shares_one_backend_and_resyncs_application_name(bouncer: PgBouncer) -> None:
    first = connect(bouncer, application_name="brownout-a")
    second = connect(bouncer, application_name="brownout-b")
    try:
        # One at a time, both clients are served by the same idle backend ...
        backend = scalar(first, "SELECT pg_backend_pid()")
        assert scalar(second, "SELECT pg_backend_pid()") == backend
        # ... and PgBouncer re-SETs application_name for whichever client has it.
        assert scalar(first, "SELECT current_setting('application_name')") == "brownout-a"
        assert scalar(second, "SELECT current_setting('application_name')") == "brownout-b"
        assert backend in bouncer.server_backend_pids("postgres")
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(("sslmode", "expected"), [("require", SSL_CLOSED), ("disable", CLOSED)])
def test_terminating_the_backend_mid_query_closes_the_client(bouncer: PgBouncer, sslmode: str, expected: str) -> None:
    conn = connect(bouncer, sslmode=sslmode)
    errors: list[BaseException] = []

    def sleep_on_the_server() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(30)")
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    query = threading.Thread(target=sleep_on_the_server, daemon=True)
    try:
        query.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until a server connection runs the query
            if any(row["state"] == "active" for row in bouncer.admin_query("SHOW SERVERS")):
                break
            time.sleep(0.05)

        assert bouncer.terminate_server_backends(dbname="postgres")
        query.join(10)

        assert not query.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], psycopg2.OperationalError)
        # PostgreSQL's FATAL 57P01 is not passed on: only the close is seen.
        assert str(errors[0]).startswith(expected), str(errors[0])
        assert errors[0].pgcode is None
        assert "server conn crashed?" in bouncer.log_text()
    finally:
        conn.close()

    fresh = connect(bouncer)  # the pool heals by itself
    try:
        assert scalar(fresh, "SELECT 1") == 1
    finally:
        fresh.close()


def test_query_wait_timeout_closes_a_client_that_waits_for_a_busy_pool() -> None:
    small = start_pgbouncer_or_skip(users={USER: PASSWORD}, default_pool_size=1, query_wait_timeout=1)
    holder = psycopg2.connect(small.dsn("postgres", USER, PASSWORD), connect_timeout=5)
    waiter = psycopg2.connect(small.dsn("postgres", USER, PASSWORD), connect_timeout=5)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1")  # holds the only server connection in a transaction
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError) as waited:
            with waiter.cursor() as cur:
                cur.execute("SELECT 1")

        assert 0.5 <= time.monotonic() - started <= 10
        assert str(waited.value) == SSL_CLOSED + "\n"  # the FATAL query_wait_timeout is lost
        assert "pooler error: query_wait_timeout" in small.log_text()
    finally:
        holder.close()
        waiter.close()
        small.stop()


def test_stop_terminates_and_cleans_up() -> None:
    helper = start_pgbouncer_or_skip(
        users={USER: PASSWORD},
    )
    directory, port = helper.directory, helper.port
    assert directory is not None and (directory / "pgbouncer.ini").exists()
    conn = psycopg2.connect(helper.dsn("postgres", USER, PASSWORD), connect_timeout=5)
    assert scalar(conn, "SELECT 1") == 1

    helper.stop()
    helper.stop()

    assert not helper.running
    assert not directory.exists()
    assert helper.log_text() == ""
    with pytest.raises(psycopg2.OperationalError) as after_stop:
        scalar(conn, "SELECT 1")
    assert str(after_stop.value) == "SSL SYSCALL error: EOF detected\n"
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="Connection refused"):
        psycopg2.connect(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/postgres", connect_timeout=5)


def test_a_pooler_that_cannot_reach_postgres_fails_with_its_log() -> None:
    helper = PgBouncer(users={USER: PASSWORD}, server_port=1, start_timeout=2)
    try:
        with pytest.raises(PgBouncerError, match="connect failed"):
            helper.start()
    except PgBouncerUnavailable as missing:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(missing))
    assert not helper.running and helper.directory is None


def test_a_missing_binary_is_reported_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgbouncer_module, "PGBOUNCER_BINARY", "/nonexistent/pgbouncer")

    with pytest.raises(PgBouncerUnavailable, match="apt-get install -y pgbouncer"):
        PgBouncer(users={USER: PASSWORD}).start()
