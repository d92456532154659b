"""Admission control's rules (src/brownout/_admission.py), on a clock of the test's own."""

from __future__ import annotations

import pytest

from brownout._admission import AdmissionControl, AdmissionSettings, Criticality, Verdict
from brownout.fastapi._admission import CriticalityTable
from tests.support.fakes import FakeClock

CRITICAL, SHEDDABLE, OPTIONAL, EXEMPT = Criticality.CRITICAL, Criticality.SHEDDABLE, Criticality.OPTIONAL, Criticality.EXEMPT


def control(clock: FakeClock, cpu: FakeClock | None = None, **settings: float) -> AdmissionControl:
    values = {"min_limit": 2, "max_limit": 8, "lag_target": 0.01, "interval": 0.1, "tick": 0.02} | settings
    return AdmissionControl(AdmissionSettings(**values), clock=clock, cpu_clock=cpu or FakeClock(0))  # type: ignore[arg-type]


def serve_for(
    admission: AdmissionControl, clock: FakeClock, cpu: FakeClock, *, seconds: float, latency: float, cores: float
) -> None:
    """Ten requests a tick, each *latency* long in the process, *cores* of CPU used, for *seconds*."""
    tick = admission.settings.tick + 1e-6
    for _ in range(round(seconds / admission.settings.tick)):
        started = clock()
        admission.in_flight += 10  # as admitted: what is judged here is their time, not their admission
        clock.advance(latency)
        for _ in range(10):
            admission.done(started)
        clock.advance(max(0.0, tick - latency))
        cpu.advance(cores * tick)
        admission.observe_lag(0.0)


def fill(admission: AdmissionControl, count: int) -> None:
    for _ in range(count):
        assert admission.admit(CRITICAL) is Verdict.ADMIT


def lag_for(admission: AdmissionControl, clock: FakeClock, seconds: float, lag: float) -> None:
    """Probe results every tick for *seconds*, each *lag* late."""
    for _ in range(round(seconds / admission.settings.tick)):
        clock.advance(admission.settings.tick + 1e-6)  # a real sleep wakes a little late, never early
        admission.observe_lag(lag)


def test_it_starts_open_and_admits_critical_work_up_to_the_limit() -> None:
    admission = control(FakeClock())
    assert admission.limit == 8
    fill(admission, 8)
    assert admission.admit(CRITICAL) is Verdict.REFUSE
    admission.done()
    assert admission.admit(CRITICAL) is Verdict.ADMIT


def test_optional_work_is_refused_first_then_sheddable_then_critical() -> None:
    admission = control(FakeClock())
    fill(admission, 4)  # half the limit
    assert admission.admit(OPTIONAL) is Verdict.REFUSE
    assert admission.admit(SHEDDABLE) is Verdict.ADMIT  # 4 < 6
    assert admission.admit(SHEDDABLE) is Verdict.ADMIT  # 5 < 6
    assert admission.admit(SHEDDABLE) is Verdict.REFUSE  # 6 = 3/4 of 8
    assert admission.admit(CRITICAL) is Verdict.ADMIT
    assert admission.admit(CRITICAL) is Verdict.ADMIT
    assert admission.admit(CRITICAL) is Verdict.REFUSE
    assert admission.in_flight == 8


def test_a_cached_read_past_its_share_is_admitted_from_the_cache_up_to_the_headroom() -> None:
    admission = control(FakeClock(), cache_headroom=0.5)
    fill(admission, 8)
    assert admission.admit(CRITICAL, cached=True) is Verdict.CACHE_ONLY
    assert admission.admit(SHEDDABLE, cached=True) is Verdict.CACHE_ONLY
    assert admission.admit(SHEDDABLE, cached=False) is Verdict.REFUSE
    for _ in range(2):
        assert admission.admit(OPTIONAL, cached=True) is Verdict.CACHE_ONLY
    assert admission.in_flight == 12  # 8 x 1.5
    assert admission.admit(CRITICAL, cached=True) is Verdict.REFUSE


def test_exempt_routes_are_never_refused_nor_counted() -> None:
    admission = control(FakeClock())
    fill(admission, 8)
    assert admission.admit(EXEMPT) is Verdict.ADMIT
    assert admission.in_flight == 8


def test_a_standing_lag_halves_the_limit_once_per_interval_down_to_the_floor() -> None:
    clock = FakeClock()
    admission = control(clock)
    lag_for(admission, clock, 0.1, lag=0.05)
    assert admission.limit == 4
    lag_for(admission, clock, 0.1, lag=0.05)
    assert admission.limit == 2
    lag_for(admission, clock, 0.5, lag=0.05)
    assert admission.limit == 2  # the floor


def test_one_late_wake_up_in_an_interval_is_a_burst_not_a_standing_delay() -> None:
    clock = FakeClock()
    admission = control(clock)
    for lag in (0.2, 0.0, 0.3, 0.0, 0.5):  # a GC pause or a burst: the smallest lag is what stands
        clock.advance(0.02)
        admission.observe_lag(lag)
    lag_for(admission, clock, 0.2, lag=0.0)
    assert admission.limit == 8


def test_the_limit_grows_only_while_requests_meet_it_and_the_loop_keeps_up() -> None:
    clock = FakeClock()
    admission = control(clock)
    lag_for(admission, clock, 0.2, lag=0.05)
    assert admission.limit == 2
    lag_for(admission, clock, 1.0, lag=0.0)
    assert admission.limit == 2, "no demand above the limit: no growth"
    for _ in range(3):
        fill(admission, admission.limit - admission.in_flight)
        assert admission.admit(CRITICAL) is Verdict.REFUSE  # demand meets the limit
        clock.advance(0.02)
        admission.observe_lag(0.0)
    assert admission.limit == 5
    fill(admission, 1)
    assert admission.admit(CRITICAL) is Verdict.REFUSE  # 5 in flight, limit 5
    clock.advance(0.02)
    admission.observe_lag(0.05)  # lagging now: demand alone does not grow it
    assert admission.limit == 5


def test_changes_are_reported_with_their_reason() -> None:
    clock = FakeClock()
    admission = control(clock)
    changes: list[tuple[int, str]] = []
    admission.on_change = lambda limit, why: changes.append((limit, why))
    lag_for(admission, clock, 0.1, lag=0.05)
    assert changes == [(4, "event loop 50 ms late")]


def test_a_busy_process_whose_requests_take_twice_their_baseline_halves_its_limit() -> None:
    clock, cpu = FakeClock(), FakeClock(0)
    admission = control(clock, cpu, latency_floor=0.005)
    serve_for(admission, clock, cpu, seconds=1.0, latency=0.004, cores=0.9)  # the baseline: 4 ms
    assert admission.limit == 8
    serve_for(admission, clock, cpu, seconds=0.1, latency=0.012, cores=0.95)  # 3x: queueing
    assert admission.limit == 4
    assert admission.latency == pytest.approx(0.012) and admission.baseline == pytest.approx(0.004)


def test_a_slow_database_under_an_idle_process_is_not_overload() -> None:
    clock, cpu = FakeClock(), FakeClock(0)
    admission = control(clock, cpu)
    serve_for(admission, clock, cpu, seconds=1.0, latency=0.004, cores=0.2)
    serve_for(admission, clock, cpu, seconds=1.0, latency=0.015, cores=0.2)  # waiting on the database, not on the CPU
    assert admission.limit == 8


def test_requests_cheaper_than_the_floor_are_never_queueing() -> None:
    clock, cpu = FakeClock(), FakeClock(0)
    admission = control(clock, cpu, latency_floor=0.005)
    serve_for(admission, clock, cpu, seconds=1.0, latency=0.001, cores=1.0)
    serve_for(admission, clock, cpu, seconds=1.0, latency=0.004, cores=1.0)  # 4x the baseline, but under 5 ms
    assert admission.limit == 8


def test_requests_admitted_before_a_decrease_do_not_count_against_the_new_limit() -> None:
    clock, cpu = FakeClock(), FakeClock(0)
    admission = control(clock, cpu, latency_floor=0.001)
    serve_for(admission, clock, cpu, seconds=1.0, latency=0.002, cores=1.0)
    old = clock()
    serve_for(admission, clock, cpu, seconds=0.1, latency=0.010, cores=1.0)
    assert admission.limit == 4
    for _ in range(10):  # the burst's stragglers, admitted under the old limit, end slowly
        admission.in_flight += 1
        admission.done(old)
    clock.advance(0.11)
    cpu.advance(0.11)
    admission.observe_lag(0.0)
    assert admission.limit == 4


@pytest.mark.parametrize(
    "settings",
    [
        {"min_limit": 0},
        {"min_limit": 9},
        {"lag_target": 0},
        {"interval": 0},
        {"tick": -1},
        {"cache_headroom": -0.1},
        {"latency_floor": 0},
        {"busy_cpu": 0},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        control(FakeClock(), **settings)


def test_routes_are_classified_by_method_and_template_and_default_to_critical() -> None:
    table = CriticalityTable()
    table.declare("GET", "/users/{user_id}/orders", "sheddable", cached=True)
    table.declare("GET", "/users/{user_id}/orders/stats", Criticality.OPTIONAL)
    table.declare("GET", "/files/{rest:path}", "optional")
    table.declare("GET", "/health", "exempt")
    assert table.classify("GET", "/users/42/orders") == (SHEDDABLE, True)
    assert table.classify("HEAD", "/users/42/orders") == (SHEDDABLE, True)
    assert table.classify("GET", "/users/42/orders/stats") == (OPTIONAL, False)
    assert table.classify("GET", "/users/42/x/orders") == (CRITICAL, False)  # a parameter never spans a slash
    assert table.classify("GET", "/files/a/b/c") == (OPTIONAL, False)
    assert table.classify("POST", "/users/42/orders") == (CRITICAL, False)  # writes stay critical
    assert table.classify("GET", "/health") == (EXEMPT, False)
    assert table.classify("GET", "/users/a.b+c/orders") == (SHEDDABLE, True)  # literal text around parameters only
    with pytest.raises(ValueError):
        table.declare("GET", "/x", "vital")
