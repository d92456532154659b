"""Shared fixtures: each test that touches PostgreSQL gets its own database.

The services are the machine's real ones (see deploy/local-services.sh).
`BROWNOUT_TEST_PG_URL` names the server and an account that may create
databases; default: the local `brownout` role over TLS.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from brownout._db import Database, waiting
from brownout._dispatch.publisher import Publisher
from brownout._settings import Settings
from tests.support.credentials import SERVICE_KEY_ENTRY
from tests.support.pgbouncer import PgBouncer, start_pgbouncer_or_skip
from tests.support.rabbit import RABBITMQ_URL, delete_queue_set
from tests.support.sentry_capture import sentry_events  # noqa: F401 - a fixture for every test
from tests.support.worker_rig import WorkerRig

REDIS_URL = os.environ.get("BROWNOUT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get(
    "BROWNOUT_TEST_PG_URL",
    "postgresql://brownout:brownout@127.0.0.1:5432/postgres?sslmode=require",
)
TEST_REDIS_TIMEOUT_SECONDS = 1.0


def admin_connect(dbname: str = "postgres") -> Any:
    """An autocommit psycopg2 connection for test set-up and fault injection."""
    url = make_url(PG_URL).set(database=dbname)
    conn = psycopg2.connect(url.render_as_string(hide_password=False))
    conn.autocommit = True
    return conn


@contextmanager
def admin_cursor(dbname: str = "postgres") -> Iterator[Any]:
    conn = admin_connect(dbname)
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _blocking_psycopg2_between_tests() -> Iterator[None]:
    """psycopg2's wait callback is process-wide: an engine built by one test must not
    change how raw psycopg2 behaves in the next. Each engine installs it again."""
    yield
    waiting.uninstall()


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty database for this test; dropped afterwards (connections forced out)."""
    name = f"bo_test_{uuid.uuid4().hex[:12]}"
    with admin_cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin_cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def app_name() -> str:
    """A unique application_name, so a test finds (and kills) only its own backends."""
    return f"bo-{uuid.uuid4().hex[:10]}"


def database_url(dbname: str, *, host: str = "127.0.0.1", port: int | None = None, sslmode: str = "require") -> str:
    url = make_url(PG_URL).set(database=dbname, host=host, query={"sslmode": sslmode})
    if port is not None:
        url = url.set(port=port)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def make_settings(pg_database: str, app_name: str) -> Callable[..., Settings]:
    """Settings pointing at this test's database; keyword arguments override fields."""

    def factory(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "database_url": database_url(pg_database),
            "db_application_name": app_name,
            "api_keys": SERVICE_KEY_ENTRY,  # the suite runs with credentials, as production does
            # Production's 50 ms is a deadline for one Redis on a quiet network; under four test workers a
            # healthy reply can miss it and send a test around Redis. Tests about Redis deadlines set their own.
            "redis_timeout_seconds": TEST_REDIS_TIMEOUT_SECONDS,
        }
        fields.update(overrides)
        return Settings(**fields)

    return factory


@pytest.fixture
def make_database(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Database]]:
    """Build Database objects for this test; all are closed at the end."""
    built: list[Database] = []

    def factory(**overrides: Any) -> Database:
        database = Database.from_settings(make_settings(**overrides))
        built.append(database)
        return database

    yield factory
    for database in built:
        database.close()


def backend_pids(dbname: str, app_name: str) -> set[int]:
    with admin_cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (dbname, app_name),
        )
        return {row[0] for row in cur.fetchall()}


def terminate_backends(dbname: str, app_name: str) -> set[int]:
    """pg_terminate_backend over an sslmode=require admin link: the SSL error, for real."""
    pids = backend_pids(dbname, app_name)
    with admin_cursor() as cur:
        for pid in pids:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return pids


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A queue (with its .DQ and .XQ) of this test's own; deleted afterwards."""
    name = f"bo-test-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queue_set(name)


@pytest.fixture
def make_worker_rig(queue_name: str) -> Iterator[Callable[..., WorkerRig]]:
    """In-process worker brokers (tests/support/worker_rig.py): their Workers stopped, brokers closed at the end,
    before this test's queues are deleted (hence *queue_name*)."""
    rigs: list[WorkerRig] = []

    def factory(**options: Any) -> WorkerRig:
        rig = WorkerRig(**options)
        rigs.append(rig)
        return rig

    yield factory
    for rig in rigs:
        rig.close()


@pytest.fixture
def make_publisher(queue_name: str) -> Iterator[Callable[..., Publisher]]:
    """Started publishers on this test's queue; all are closed at the end."""
    built: list[Publisher] = []

    def factory(**overrides: Any) -> Publisher:
        options: dict[str, Any] = {"url": RABBITMQ_URL, "queue_name": queue_name, "max_length": 1000}
        options.update(overrides)
        publisher = Publisher(**options).start()
        built.append(publisher)
        return publisher

    yield factory
    for publisher in built:
        publisher.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"bo-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def api_settings(
    make_settings: Callable[..., Settings], pg_database: str, queue_name: str, redis_prefix: str
) -> Callable[..., Settings]:
    """Settings for a web process on this test's database (migrated), queue and Redis prefix."""
    from app.schema import upgrade_database

    upgrade_database(database_url(pg_database))

    def factory(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "rabbitmq_url": RABBITMQ_URL,
            "queue_name": queue_name,
            "redis_url": REDIS_URL,
            "redis_key_prefix": redis_prefix,
        }
        fields.update(overrides)
        return make_settings(**fields)

    return factory


@pytest.fixture
def single_connection(make_database: Callable[..., Database]) -> Callable[..., Database]:
    """A Database whose pool holds one connection (each checkout is the same one again), with an `items` table."""

    def factory(**overrides: object) -> Database:
        fields: dict[str, object] = {"pool_size": 1, "pool_max_overflow": 0}
        database = make_database(**(fields | overrides))
        with database.engine.connect() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY)"))
            conn.commit()
        return database

    return factory


@pytest.fixture
def bouncer() -> Iterator[PgBouncer]:
    """A PgBouncer of this test's own in front of the local PostgreSQL (skipped where none is installed, failed
    under CI)."""
    started = start_pgbouncer_or_skip()
    yield started
    started.stop()
