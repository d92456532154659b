"""A database that refuses, resets or goes silent, through a real TCP proxy.

Timing bounds are deliberately wide (the machine is shared); the tight
figures are in bench/. Breaker time is a fake clock: no test waits for it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import text

from brownout._db import (
    BreakerState,
    CircuitOpenError,
    Database,
    DeadlineExceeded,
    ErrorKind,
    check_db_health,
    execute_with_retry,
)
from brownout._db.errors import BrownoutDbError
from tests.faults.conftest import FakeClock
from tests.support.tcp_proxy import FaultProxy


def select_one(database: Database, **kwargs: Any) -> Any:
    with database.session() as s:
        return execute_with_retry(s, lambda: s.execute(text("SELECT 1")).scalar_one(), **kwargs)


def timed(fn: Any) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned for the test to inspect
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


def test_silent_on_connect_request_path_gives_up_at_deadline(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied()
    proxy.silence()
    elapsed, exc = timed(lambda: select_one(database, deadline=0.3))
    assert isinstance(exc, DeadlineExceeded), exc
    assert 0.2 <= elapsed < 3.0


def test_silent_on_connect_background_bound(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied(db_connect_timeout_seconds=1.0, retry_max_retries=0)
    proxy.silence()
    elapsed, exc = timed(lambda: select_one(database))
    assert exc is not None and "deadline reached connecting" in str(exc), exc
    assert 0.8 <= elapsed < 6.0


def test_silent_mid_query_request_path(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied(pool_pre_ping=False)
    assert select_one(database) == 1
    proxy.silence()
    elapsed, exc = timed(lambda: select_one(database, deadline=0.3))
    assert isinstance(exc, DeadlineExceeded), exc
    assert elapsed < 3.0
    proxy.pass_through()
    # the cut connection was discarded, not returned to the pool half-used
    assert select_one(database) == 1


def test_silent_mid_query_background_bound(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied(pool_pre_ping=False, db_io_timeout_seconds=1.0, retry_max_retries=0)
    assert select_one(database) == 1
    proxy.silence()
    elapsed, exc = timed(lambda: select_one(database))
    assert exc is not None and "deadline reached waiting" in str(exc), exc
    assert 0.8 <= elapsed < 6.0


@pytest.mark.parametrize("fault", ["refuse", "reset"])
def test_refused_and_reset_fail_fast(proxied: Any, proxy: FaultProxy, fault: str) -> None:
    database = proxied(retry_max_retries=0)
    getattr(proxy, fault)()
    elapsed, exc = timed(lambda: select_one(database))
    assert exc is not None and not isinstance(exc, BrownoutDbError), exc
    assert elapsed < 2.0


def test_breaker_opens_then_recovers(proxied: Any, proxy: FaultProxy) -> None:
    clock = FakeClock()
    database = proxied(clock=clock, retry_max_retries=0, breaker_open_jitter=0.0)
    assert select_one(database) == 1
    proxy.refuse()
    proxy.reset_existing()
    for _ in range(5):
        with pytest.raises(Exception) as failure:
            select_one(database)
        assert not isinstance(failure.value, CircuitOpenError)
    assert database.breaker.state is BreakerState.OPEN

    connections = proxy.connection_count
    elapsed, exc = timed(lambda: select_one(database))
    assert isinstance(exc, CircuitOpenError)
    assert exc.retry_after == pytest.approx(60.0)
    assert elapsed < 0.5  # well under the 2 s connect floor
    assert proxy.connection_count == connections, "an open breaker must not touch the database"

    proxy.pass_through()
    clock.advance(61)
    assert select_one(database) == 1
    assert database.breaker.state is BreakerState.HALF_OPEN
    assert select_one(database) == 1
    assert database.breaker.state is BreakerState.CLOSED


def test_health_check_up_down_and_silent(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied()
    with database.session() as s:
        up = check_db_health(s, timeout=2.0)
    assert up["healthy"] is True and up["error"] is None
    assert up["latency_ms"] >= 0 and up["pool"]["size"] == 10
    assert up["breaker"]["state"] == "closed"

    proxy.refuse()
    proxy.reset_existing()
    with database.session() as s:
        down = check_db_health(s, timeout=2.0)
    assert down["healthy"] is False and ErrorKind(down["error_kind"]).is_disconnect
    assert "brownout@" not in down["error"] and ":brownout" not in str(down)

    proxy.silence()
    start = time.monotonic()
    with database.session() as s:
        silent = check_db_health(s, timeout=0.5)
    assert silent["healthy"] is False
    assert time.monotonic() - start < 3.0
