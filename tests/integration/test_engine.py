"""The engine's settings as PostgreSQL sees them: pool, timeouts, fork safety."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from sqlalchemy import event, text

from brownout._db import Database, DeadlineExceeded, ErrorKind, classify, execute_with_retry
from brownout._db.pre_ping import CheckoutPinger
from brownout._db.retry import Resilience, RetryPolicy


def test_default_pool_settings(make_database: Callable[..., Database], app_name: str) -> None:
    database = make_database()
    pool = database.engine.pool
    assert pool.size() == 10
    assert pool._max_overflow == 20  # noqa: SLF001 - no public accessor
    assert pool._recycle == 90  # noqa: SLF001
    assert event.contains(database.engine, "checkout", CheckoutPinger.on_checkout) or any(
        getattr(fn, "__func__", None) is CheckoutPinger.on_checkout for fn in database.engine.pool.dispatch.checkout
    )
    with database.session() as s:
        assert s.execute(text("SHOW application_name")).scalar_one() == app_name
        assert s.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar_one() is True


def test_statement_timeout_direct_is_a_startup_option(make_database: Callable[..., Database]) -> None:
    database = make_database(db_statement_timeout_seconds=0.2, retry_max_retries=0)
    with database.session() as s:
        assert s.execute(text("SHOW statement_timeout")).scalar_one() == "200ms"
        with pytest.raises(Exception) as info:
            execute_with_retry(s, lambda: s.execute(text("SELECT pg_sleep(2)")).scalar_one())
    assert classify(info.value) is ErrorKind.TRANSIENT
    assert getattr(info.value.orig, "pgcode", None) == "57014"


def test_pool_checkout_wait_ends_with_the_deadline(make_database: Callable[..., Database]) -> None:
    database = make_database(pool_size=1, pool_max_overflow=0, pool_timeout_seconds=30)
    res = Resilience(breaker=database.breaker, policy=RetryPolicy(), sleep=time.sleep)
    with database.session() as holder:
        holder.execute(text("SELECT 1"))  # holds the only connection
        with database.session() as s:
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                execute_with_retry(s, lambda: s.execute(text("SELECT 1")).scalar_one(), deadline=0.3, resilience=res)
            elapsed = time.monotonic() - start
    assert elapsed < 3.0, "the checkout waited for the pool timeout instead of the deadline"
    assert classify(info.value.__cause__) is ErrorKind.TRANSIENT
    # outside a deadline the configured checkout timeout is intact
    assert database.engine.pool._timeout == 30  # noqa: SLF001


def test_forked_child_gets_its_own_connections(make_database: Callable[..., Database]) -> None:
    database = make_database()
    with database.session() as s:
        parent_pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            with database.session() as s:
                backend = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
            os.write(write_end, str(backend).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    child_backend = int(os.read(read_end, 64).decode() or 0)
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend and child_backend != parent_pid
    with database.session() as s:  # the parent's pooled connection was not disturbed
        assert s.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_pid
