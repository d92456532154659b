"""HealthMonitor.recent, the check `/ready` asks for: within the fleet's probe turns, and never beside another."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from brownout._db import health_check


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A check that takes 0.2 s and says healthy; how many ran at once, at most."""
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def check(db: Any, *, timeout: float) -> dict[str, Any]:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return {"healthy": True, "latency_ms": 1.0, "error": None, "error_kind": None}

    monkeypatch.setattr(health_check, "check_db_health", check)
    return state


@contextlib.contextmanager
def sessions() -> Iterator[object]:
    yield object()


def test_while_degraded_a_check_on_demand_waits_for_this_processs_probe_turn(running: dict[str, int]) -> None:
    told: list[dict[str, Any]] = []
    monitor = health_check.HealthMonitor(
        sessions, interval=60, probe_interval=5, degraded=lambda: True, claim_probe=lambda: False, on_result=told.append
    )
    assert monitor.recent(5.0) is None  # another process probes for the fleet this interval
    assert monitor.checks == 0 and told == []


def test_a_check_on_demand_never_runs_beside_the_monitors_own(running: dict[str, int]) -> None:
    monitor = health_check.HealthMonitor(sessions, interval=0.05).start()
    try:
        time.sleep(0.05)
        askers = [threading.Thread(target=monitor.recent, args=(0.0,)) for _ in range(3)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        time.sleep(0.3)
    finally:
        monitor.stop()
    assert running["peak"] == 1
