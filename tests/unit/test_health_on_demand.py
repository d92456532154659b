"""HealthMonitor.recent, the check `/ready` asks for: within the fleet's probe turns, and never beside another."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from brownout._db import health_check


class GatedCheck:
    """A check that says healthy once let through: how many ran at once, at most."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, db: Any, *, timeout: float) -> dict[str, Any]:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        self.entered.set()
        self.release.wait(10)
        with self._lock:
            self.now -= 1
        return {"healthy": True, "latency_ms": 1.0, "error": None, "error_kind": None}


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch) -> GatedCheck:
    gated = GatedCheck()
    monkeypatch.setattr(health_check, "check_db_health", gated)
    return gated


@contextlib.contextmanager
def sessions() -> Iterator[object]:
    yield object()


def test_while_degraded_a_check_on_demand_waits_for_this_processs_probe_turn(check: GatedCheck) -> None:
    check.release.set()
    told: list[dict[str, Any]] = []
    monitor = health_check.HealthMonitor(
        sessions, interval=60, probe_interval=5, degraded=lambda: True, claim_probe=lambda: False, on_result=told.append
    )
    assert monitor.recent(5.0) is None  # another process probes for the fleet this interval
    assert monitor.checks == 0 and told == []


def test_a_check_on_demand_never_runs_beside_the_monitors_own(check: GatedCheck) -> None:
    monitor = health_check.HealthMonitor(sessions, interval=60).start()
    try:
        assert check.entered.wait(10)  # the monitor's first check is under way, held
        answers = [monitor.recent(0.0) for _ in range(3)]  # asked meanwhile: answered from the last, none run
        check.release.set()
    finally:
        monitor.stop()
    assert answers == [None, None, None]
    assert check.peak == 1 and monitor.checks == 1
