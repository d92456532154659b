"""The worker's health gate and the breaker it probes for: the fleet's breaker (real Redis) and the worker's own.

A passing `SELECT 1` in the worker is a recovery probe. For the worker's own breaker it closes it (else the
worker would wait out the open time after every outage); for the fleet's breaker it only reports the probe
(OPEN -> HALF_OPEN), and the fleet's trials decide: one worker must not close, for every process, a breaker
the web opened on a database that answers `SELECT 1` but fails real work.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from brownout._db import BreakerState, CircuitBreaker, CircuitOpenError, ErrorKind
from brownout._fleet.assembly import build_fleet_breaker, stop_breaker
from brownout._fleet.shared_breaker import SharedBreaker
from brownout._settings import Settings
from brownout._worker.health_gate import DatabaseUnavailable, HealthGate
from tests.support.polling import wait_until

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def fleet(make_settings: Callable[..., Settings], redis_prefix: str) -> Iterator[Callable[..., SharedBreaker]]:
    """Breakers of one fleet (one Redis prefix): each stands for another process."""
    built: list[SharedBreaker] = []

    def factory(**overrides: object) -> SharedBreaker:
        fields: dict[str, object] = {
            "breaker_backend": "redis",
            "redis_url": REDIS,
            "redis_key_prefix": redis_prefix,
            "breaker_failure_threshold": 3,
            "breaker_success_threshold": 2,
            "breaker_probe_interval_seconds": 0.2,
        } | overrides
        breaker = build_fleet_breaker(make_settings(**fields))
        assert isinstance(breaker, SharedBreaker)
        built.append(breaker)
        return breaker

    yield factory
    for breaker in built:
        stop_breaker(breaker)


def open_it(breaker: CircuitBreaker, failures: int = 3) -> None:
    for _ in range(failures):
        breaker.record_failure(breaker.before_call(), ErrorKind.DISCONNECT)
    assert breaker.state is BreakerState.OPEN


def passing() -> bool:
    return True


def test_a_passing_check_moves_the_fleets_breaker_to_half_open_never_closed(fleet: Callable[..., SharedBreaker]) -> None:
    web, worker = fleet(), fleet()
    open_it(web)
    assert wait_until(lambda: worker.state is BreakerState.OPEN, timeout=5)
    gate = HealthGate(passing, breaker=worker)
    assert gate.probe() is True
    assert worker.state is BreakerState.HALF_OPEN
    assert wait_until(lambda: web.state is BreakerState.HALF_OPEN, timeout=5)
    for _ in range(5):  # the gate checks every second while healthy: it must not close it either
        gate.probe()
    assert web.state is BreakerState.HALF_OPEN and worker.state is BreakerState.HALF_OPEN
    # The fleet's trials close it: two successes (success_threshold) from whoever holds the trial.
    for _ in range(2):
        web.record_success(web.before_call())
    assert web.state is BreakerState.CLOSED
    assert wait_until(lambda: worker.state is BreakerState.CLOSED, timeout=5)


def test_a_failed_trial_after_the_probe_opens_it_again_for_everyone(fleet: Callable[..., SharedBreaker]) -> None:
    web, worker = fleet(), fleet()
    open_it(web)
    assert wait_until(lambda: worker.state is BreakerState.OPEN, timeout=5)
    HealthGate(passing, breaker=worker).probe()
    assert wait_until(lambda: web.state is BreakerState.HALF_OPEN, timeout=5)
    web.record_failure(web.before_call(), ErrorKind.TRANSIENT)  # the trial: real work still fails
    assert web.state is BreakerState.OPEN
    assert wait_until(lambda: worker.state is BreakerState.OPEN, timeout=5)


def test_the_workers_own_breaker_is_closed_by_a_passing_check() -> None:
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=60.0)
    open_it(breaker)
    assert HealthGate(passing, breaker=breaker).probe() is True
    assert breaker.state is BreakerState.CLOSED


def test_a_forced_open_breaker_keeps_the_gate_closed() -> None:
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=60.0)
    breaker.force_open()
    assert HealthGate(passing, breaker=breaker).probe() is False
    assert breaker.state is BreakerState.OPEN


class _IdleWorker:
    """What the gate drives of Dramatiq's Worker, with no threads to pause (the gate's backoff is under test)."""

    def __init__(self) -> None:
        self.consumers: dict[str, Any] = {}
        self.workers: list[Any] = []
        self.work_queue: queue.Queue[Any] = queue.Queue()
        self.resumed = 0

    def resume(self) -> None:
        self.resumed += 1


@pytest.mark.parametrize(("refusal_state", "strikes"), [("half_open", 0), ("open", 1)])
def test_a_refusal_while_another_process_holds_the_trial_is_no_strike(refusal_state: str, strikes: int) -> None:
    broker = StubBroker()
    broker.emit_after("process_boot")

    @dramatiq.actor(broker=broker, throws=(DatabaseUnavailable,), max_retries=0)
    def apply_batch() -> None:  # pragma: no cover - never run: only its options are read
        pass

    checks: list[bool] = []

    def check() -> bool:  # the database answers SELECT 1: the refusal came from the breaker
        checks.append(True)
        return True

    gate = HealthGate(check, base_seconds=30.0, cap_seconds=60.0)
    worker = _IdleWorker()
    gate.after_worker_boot(broker, worker)  # type: ignore[arg-type]
    try:
        assert wait_until(lambda: len(checks) == 1, timeout=5)  # the boot check passed; the next in 30 s
        refusal = CircuitOpenError("database", 1.0, refusal_state)
        held = DatabaseUnavailable(str(refusal))
        held.__cause__ = refusal
        gate.after_process_message(broker, dramatiq.MessageProxy(apply_batch.message()), exception=held)
        assert gate.held == 1
        assert wait_until(lambda: gate.paused, timeout=5), "a held batch pauses the worker"
        assert gate.strikes == strikes
        assert len(checks) == 1
    finally:
        gate.before_worker_shutdown(broker, worker)  # type: ignore[arg-type]
