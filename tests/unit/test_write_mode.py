"""Read-only mode's logic in one process: who decides, what it logs, what the metric exports.

The fleet's record reaches a process as `OverrideRecord` hands it over (a dict with the mode, its sequence
and times); tests/integration/test_read_only_mode.py sends it through Redis for real.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from brownout import ReadOnlyMode
from brownout._fleet.read_only import WriteMode
from brownout._observability.metrics import Metrics
from tests.support.fakes import FakeClock

WALL = 1_790_000_000.0  # a wall-clock time (the fake clock starts here)


def record(mode: str, seq: int, since: float = WALL) -> dict[str, Any]:
    return {"mode": mode, "seq": seq, "at": since, "since": since}


def mode_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [entry.getMessage() for entry in caplog.records if entry.getMessage().startswith("read-only mode")]


def test_the_operator_s_mode_refuses_writes_and_read_write_lifts_it() -> None:
    mode = WriteMode(clock=FakeClock(WALL))
    mode.check()  # read-write: nothing raised
    mode.follow(record("read-only", 1, since=WALL + 5))
    with pytest.raises(ReadOnlyMode) as refused:
        mode.check()
    assert str(refused.value) == "read-only mode" and refused.value.reason == "operator" and refused.value.since == WALL + 5
    assert refused.value.retry_after >= 1
    mode.follow(record("read-write", 2, since=WALL + 9))
    mode.check()
    assert mode.state.mode == "read-write" and mode.state.since == WALL + 9


def test_the_setting_holds_whatever_the_fleet_says(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="brownout.degraded")
    mode = WriteMode(setting=True, clock=FakeClock(WALL))
    assert mode.refusing and mode.state.reason == "setting" and mode.state.since == WALL
    mode.follow(record("read-write", 1))
    assert mode.refusing and mode.state.reason == "setting"  # the operator's read-write does not lift it
    with pytest.raises(ReadOnlyMode, match="read-only mode"):
        mode.check()
    assert len(mode_lines(caplog)) == 1 and "BROWNOUT_READ_ONLY" in mode_lines(caplog)[0]


def test_one_line_on_entering_and_one_on_leaving_however_often_the_record_is_followed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="brownout.degraded")
    mode = WriteMode(clock=FakeClock(WALL))
    mode.follow(record("read-write", 1))
    assert mode_lines(caplog) == []
    mode.follow(record("read-only", 2))
    mode.follow(record("read-only", 3))  # the operator said it again: the same state
    mode.watch()
    mode.follow(record("read-write", 4))
    mode.follow(record("read-write", 5))
    lines = mode_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("read-only mode entered") and "operator" in lines[0]
    assert lines[1].startswith("read-only mode left")
    assert all(entry.levelname in ("INFO", "WARNING") for entry in caplog.records)


def test_a_record_of_a_mode_this_release_does_not_know_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    mode = WriteMode(clock=FakeClock(WALL))
    mode.follow(record("read-mostly", 1))
    assert not mode.refusing and mode.state.mode == "read-write"
    assert any("names no mode this release knows" in entry.getMessage() for entry in caplog.records)


def test_the_automatic_state_is_reported_and_refuses_nothing_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="brownout.degraded")
    clock = FakeClock(WALL)
    blocked = [False]
    mode = WriteMode(automatic=lambda: blocked[0], clock=clock)
    assert mode.watch().mode == "read-write"
    blocked[0] = True
    clock.advance(3)
    state = mode.watch()
    assert (state.mode, state.reason, state.since) == ("read-only", "automatic", WALL + 3)
    assert state.metric_state == "read-only-automatic"
    mode.check()  # the dispatcher's own path answers these writes: the mode refuses none itself
    assert not mode.refusing
    mode.follow(record("read-only", 1))  # the operator's decision outranks the automatic state
    assert mode.state.reason == "operator" and mode.state.metric_state == "read-only"
    mode.follow(record("read-write", 2))
    assert mode.state.reason == "automatic"
    blocked[0] = False
    assert mode.watch().mode == "read-write"
    lines = mode_lines(caplog)
    assert lines[0].startswith("read-only mode entered") and "automatic" in lines[0]
    assert lines[-1].startswith("read-only mode left")


def test_a_failing_automatic_check_is_no_read_only_state(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bool:
        raise RuntimeError("probe failed")

    mode = WriteMode(automatic=broken, clock=FakeClock(WALL))
    assert mode.watch().mode == "read-write"
    assert any("automatic check failed" in entry.getMessage() for entry in caplog.records)


def test_the_metric_is_an_enum_named_brownout_mode() -> None:
    """The series a dashboard panel reads: `brownout_mode{brownout_mode="read-only"} 1`."""
    metrics = Metrics(CollectorRegistry())
    mode = WriteMode(clock=FakeClock(WALL))
    mode.add_listener(lambda state: metrics.observe_mode(state.metric_state))
    value = metrics.registry.get_sample_value
    assert value("brownout_mode", {"brownout_mode": "read-write"}) == 1
    mode.follow(record("read-only", 1))
    assert value("brownout_mode", {"brownout_mode": "read-only"}) == 1
    assert value("brownout_mode", {"brownout_mode": "read-write"}) == 0
    assert value("brownout_mode", {"brownout_mode": "read-only-automatic"}) == 0
    assert b'brownout_mode{brownout_mode="read-only"} 1.0' in generate_latest(metrics.registry)
    mode.follow(record("read-write", 2))
    assert value("brownout_mode", {"brownout_mode": "read-write"}) == 1
    assert value("brownout_mode", {"brownout_mode": "read-only"}) == 0
