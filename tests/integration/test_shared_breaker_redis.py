"""The shared breaker's transitions against the real Redis, two breakers in one process.

What the four-process fault test cannot easily force: a trial holder that dies
(its lease must expire), the failure window sliding, probe-gated recovery not
moving on a timer, and the operator's reset reaching the other breaker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from brownout._db import BreakerState, CircuitOpenError, ErrorKind
from brownout._fleet.assembly import build_fleet_breaker, stop_breaker
from brownout._fleet.shared_breaker import SharedBreaker
from brownout._settings import Settings
from tests.support.polling import wait_until

REDIS = "redis://127.0.0.1:6379/0"
Pair = Callable[..., tuple[SharedBreaker, SharedBreaker]]


@pytest.fixture
def pair(
    make_settings: Callable[..., Settings], redis_prefix: str
) -> Iterator[Callable[..., tuple[SharedBreaker, SharedBreaker]]]:
    built: list[SharedBreaker] = []

    def factory(**overrides: object) -> tuple[SharedBreaker, SharedBreaker]:
        fields: dict[str, object] = {
            "breaker_backend": "redis",
            "redis_url": REDIS,
            "redis_key_prefix": redis_prefix,
            "breaker_failure_threshold": 3,
            "breaker_probe_interval_seconds": 0.2,
        } | overrides
        settings = make_settings(**fields)
        breakers = []
        for _ in range(2):
            breaker = build_fleet_breaker(settings)
            assert isinstance(breaker, SharedBreaker)
            built.append(breaker)
            breakers.append(breaker)
        return breakers[0], breakers[1]

    yield factory
    for breaker in built:
        stop_breaker(breaker)


def fail(breaker: SharedBreaker, times: int) -> None:
    for _ in range(times):
        breaker.record_failure(breaker.before_call(), ErrorKind.DISCONNECT)


def test_failures_from_two_processes_add_up(pair: Pair) -> None:
    first, second = pair()
    fail(first, 2)
    assert first.state is BreakerState.CLOSED
    fail(second, 1)  # the third failure fleet-wide
    assert second.state is BreakerState.OPEN
    assert wait_until(lambda: first.state is BreakerState.OPEN, timeout=5)  # told by pub/sub
    with pytest.raises(CircuitOpenError):
        first.before_call()
    assert first.remote_transitions >= 1


def test_failures_outside_the_window_do_not_count(pair: Pair) -> None:
    first, second = pair(breaker_window_seconds=0.3)
    fail(first, 2)
    time.sleep(0.4)  # Redis's own clock decides the window: let it slide past them
    fail(second, 2)
    assert first.state is BreakerState.CLOSED and second.state is BreakerState.CLOSED


def test_probe_gated_open_waits_for_a_passing_probe_not_a_timer(pair: Pair) -> None:
    first, second = pair(breaker_open_seconds=0.2)
    fail(first, 3)
    time.sleep(0.4)  # past the open time, on Redis's clock
    with pytest.raises(CircuitOpenError):
        second.before_call()  # still OPEN: no timer ends it
    second.on_health({"healthy": False})
    assert second.state is BreakerState.OPEN
    second.on_health({"healthy": True})
    assert second.state is BreakerState.HALF_OPEN
    assert wait_until(lambda: first.state is BreakerState.HALF_OPEN, timeout=5)


def test_one_trial_at_a_time_and_a_dead_holder_does_not_wedge_it(
    pair: Pair,
) -> None:
    first, second = pair(breaker_success_threshold=1)
    first._lease_ms = second._lease_ms = 300  # a short lease, as if open_seconds were short
    fail(first, 3)
    first.on_health({"healthy": True})
    assert wait_until(lambda: second.state is BreakerState.HALF_OPEN, timeout=5)
    held = first.before_call()  # first takes the trial... and "dies" holding it
    assert held != 0
    with pytest.raises(CircuitOpenError):
        second.before_call()
    permit = None
    for _ in range(100):  # the lease expires after 0.3 s: then second may try
        try:
            permit = second.before_call()
            break
        except CircuitOpenError:
            time.sleep(0.05)
    assert permit is not None and permit != 0
    second.record_success(permit)
    assert second.state is BreakerState.CLOSED
    assert wait_until(lambda: first.state is BreakerState.CLOSED, timeout=5)
    first.record_failure(held, ErrorKind.DISCONNECT)  # the late verdict of the dead holder changes nothing
    assert first.state is BreakerState.CLOSED


def test_reset_reaches_the_fleet(pair: Pair) -> None:
    first, second = pair()
    fail(first, 3)
    assert wait_until(lambda: second.state is BreakerState.OPEN, timeout=5)
    first.reset()
    assert wait_until(lambda: second.state is BreakerState.CLOSED, timeout=5)


def test_the_fleet_follows_redis_when_it_lost_the_breaker(pair: Pair, redis_prefix: str) -> None:
    """A Redis restart without persistence restarts the epoch at 0: the periodic re-read must still win."""
    first, second = pair()
    fail(first, 3)
    first.on_health({"healthy": True})
    first.reset()  # a few transitions: the processes have seen epoch >= 3
    assert wait_until(lambda: second.state is BreakerState.CLOSED, timeout=5)
    first._link.client.delete(*first._keys)  # the breaker's hash is gone, as after a restart
    fail(second, 3)  # Redis says OPEN at epoch 1, older than what both have seen
    assert wait_until(lambda: first.state is BreakerState.OPEN and second.state is BreakerState.OPEN, timeout=5)


def test_after_its_own_failure_a_process_sends_one_call_at_a_time_until_the_fleet_opens(pair: Pair) -> None:
    """The bound on a fleet's overshoot: each process that saw a failure of its own has at most one call at the
    database until it succeeds or the fleet opens, so news of the opening arriving late costs at most one
    attempt per process, not every call it starts meanwhile."""
    first, second = pair()  # threshold 3
    fail(first, 1)
    in_flight = first.before_call()
    for _ in range(10):
        with pytest.raises(CircuitOpenError):
            first.before_call()  # concurrent calls in `first`: refused, not sent
    assert second.before_call() == 0 and second.before_call() == 0, "a process with no failure of its own is free"
    first.record_failure(in_flight, ErrorKind.DISCONNECT)  # 2 fleet-wide
    fail(second, 1)  # 3: the fleet opens
    assert second.state is BreakerState.OPEN
    assert wait_until(lambda: first.state is BreakerState.OPEN, timeout=5)
    assert not first.wary and not second.wary
