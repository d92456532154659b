"""The error table's rows, produced for real against PostgreSQL and classified."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from brownout._db.errors import ErrorKind, classify
from tests.conftest import admin_cursor, database_url


def connect(dbname: str, app_name: str, *, sslmode: str = "require", port: int = 5432) -> Any:
    conn = psycopg2.connect(database_url(dbname, sslmode=sslmode, port=port), application_name=app_name)
    conn.autocommit = True
    return conn


def kill(pid: int) -> None:
    with admin_cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))


def raised(fn: Callable[[], object]) -> Exception:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to catch what the driver raises
        return exc
    raise AssertionError("expected the call to fail")


def test_ssl_kill_is_an_ssl_disconnect(pg_database: str, app_name: str) -> None:
    conn = connect(pg_database, app_name, sslmode="require")
    assert conn.info.ssl_in_use
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    kill(pid)
    exc = raised(lambda: conn.cursor().execute("SELECT 1"))
    assert "SSL" in str(exc) or "closed the connection" in str(exc), str(exc)
    assert classify(exc) is ErrorKind.SSL


def test_admin_shutdown_without_tls_is_57p01_disconnect(pg_database: str, app_name: str) -> None:
    conn = connect(pg_database, app_name, sslmode="disable")
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    kill(pid)
    exc = raised(lambda: conn.cursor().execute("SELECT 1"))
    assert classify(exc) is ErrorKind.DISCONNECT
    assert getattr(exc, "pgcode", None) in ("57P01", None)


def test_sqlalchemy_wrapped_ssl_kill_is_ssl_and_invalidated(pg_database: str, app_name: str) -> None:
    engine = create_engine(
        database_url(pg_database).replace("postgresql://", "postgresql+psycopg2://"), connect_args={"application_name": app_name}
    )
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            kill(pid)
            exc = raised(lambda: conn.execute(text("SELECT 1")))
        assert isinstance(exc, DBAPIError) and exc.connection_invalidated
        assert classify(exc) is ErrorKind.SSL
    finally:
        engine.dispose()


def test_refused_port_is_a_disconnect() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        exc = raised(lambda: psycopg2.connect(host="127.0.0.1", port=port, dbname="x", user="x", connect_timeout=2))
    assert "refused" in str(exc).lower()
    assert classify(exc) is ErrorKind.DISCONNECT


def _two_sessions(pg_database: str, app_name: str) -> tuple[Any, Any]:
    setup = connect(pg_database, app_name)
    with setup.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        cur.execute("INSERT INTO t VALUES (1, 0), (2, 0)")
    setup.close()
    a, b = connect(pg_database, app_name), connect(pg_database, app_name)
    a.autocommit = b.autocommit = False
    return a, b


def test_serialization_failure_is_transient(pg_database: str, app_name: str) -> None:
    a, b = _two_sessions(pg_database, app_name)
    for conn in (a, b):
        conn.set_session(isolation_level="SERIALIZABLE")
    ca, cb = a.cursor(), b.cursor()
    ca.execute("SELECT sum(v) FROM t")
    cb.execute("SELECT sum(v) FROM t")
    ca.execute("UPDATE t SET v = 1 WHERE id = 1")
    cb.execute("UPDATE t SET v = 1 WHERE id = 2")
    a.commit()
    exc = raised(b.commit)
    assert exc.pgcode == "40001"
    assert classify(exc) is ErrorKind.TRANSIENT


def test_deadlock_is_transient(pg_database: str, app_name: str) -> None:
    a, b = _two_sessions(pg_database, app_name)
    ca, cb = a.cursor(), b.cursor()
    ca.execute("UPDATE t SET v = 1 WHERE id = 1")
    cb.execute("UPDATE t SET v = 1 WHERE id = 2")
    errors: list[Exception] = []

    def a_takes_2() -> None:
        try:
            ca.execute("UPDATE t SET v = 2 WHERE id = 2")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            a.rollback()

    worker = threading.Thread(target=a_takes_2)
    worker.start()
    try:
        cb.execute("UPDATE t SET v = 2 WHERE id = 1")
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
        b.rollback()
    worker.join(30)
    assert not worker.is_alive()
    assert [e.pgcode for e in errors] == ["40P01"]
    assert classify(errors[0]) is ErrorKind.TRANSIENT


def test_lock_not_available_is_transient(pg_database: str, app_name: str) -> None:
    a, b = _two_sessions(pg_database, app_name)
    a.cursor().execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")
    exc = raised(lambda: b.cursor().execute("SELECT * FROM t WHERE id = 1 FOR UPDATE NOWAIT"))
    assert exc.pgcode == "55P03"
    assert classify(exc) is ErrorKind.TRANSIENT


def test_unique_violation_is_permanent(pg_database: str, app_name: str) -> None:
    a, _ = _two_sessions(pg_database, app_name)
    exc = raised(lambda: a.cursor().execute("INSERT INTO t VALUES (1, 0)"))
    assert exc.pgcode == "23505"
    assert classify(exc) is ErrorKind.PERMANENT
