"""The health check and its monitor with the database up, down and silent."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text

from brownout._db import ErrorKind, HealthMonitor, periodic_health_check
from tests.support.fakes import FakeClock
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy


def test_monitor_runs_and_stops_cleanly(proxied: Any) -> None:
    database = proxied()
    results: list[dict[str, Any]] = []
    monitor = HealthMonitor(database.sessions, interval=30.0, timeout=1.0, on_result=results.append).start()
    try:
        assert wait_until(lambda: monitor.checks >= 1)
        assert monitor.last_result is not None and monitor.last_result["healthy"] is True
        assert results and results[0] is monitor.last_result
    finally:
        start = time.monotonic()
        monitor.stop()
    assert time.monotonic() - start < 3.0, "stop() must not wait for the 30 s interval"
    assert not monitor.running


def test_monitor_stops_within_its_timeout_while_the_database_is_silent(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied(pool_pre_ping=False)
    proxy.silence()
    monitor = HealthMonitor(database.sessions, interval=0.05, timeout=0.5).start()
    assert wait_until(lambda: monitor.checks >= 2)
    assert monitor.last_result is not None and monitor.last_result["healthy"] is False
    start = time.monotonic()
    monitor.stop()
    assert not monitor.running
    assert time.monotonic() - start < 5.0


def test_failed_check_invalidates_the_pool(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied()
    with database.session() as s, database.session() as s2:
        s.execute(text("SELECT 1"))
        s2.execute(text("SELECT 1"))
    assert database.engine.pool.checkedin() == 2
    monitor = HealthMonitor(database.sessions, timeout=0.5)
    proxy.refuse()
    proxy.reset_existing()
    result = monitor.check_now()
    assert result["healthy"] is False and ErrorKind(result["error_kind"]).is_disconnect
    assert database.engine.pool.checkedin() == 0, "idle connections must be dropped after a failed check"
    proxy.pass_through()
    assert monitor.check_now()["healthy"] is True


def test_periodic_health_check_is_rate_limited(proxied: Any, proxy: FaultProxy) -> None:
    database = proxied()
    clock = FakeClock()
    with database.session() as s:
        first = periodic_health_check(s, interval_seconds=30, clock=clock)
        proxy.refuse()
        proxy.reset_existing()
        clock.advance(29)
        assert periodic_health_check(s, interval_seconds=30, clock=clock) is first
        clock.advance(2)
        later = periodic_health_check(s, interval_seconds=30, clock=clock, timeout=0.5)
    assert first["healthy"] is True
    assert later["healthy"] is False
