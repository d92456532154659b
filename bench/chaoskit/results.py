"""What one mode's run leaves: its records, audit and timings (relative to the load's t0)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.chaoskit.calibrate import Calibration


@dataclasses.dataclass
class FaultRecord:
    kind: str
    label: str
    start: float
    end: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModeResult:
    mode: str
    duration: float
    writes_rate: float
    reads_rate: float
    requests: list[list[Any]]
    writes: list[dict[str, Any]]
    shed: int
    faults: list[FaultRecord]
    transitions: list[tuple[float, str, str, str]]  # relative to t0
    backlog: list[tuple[float, int]]
    queue_depth: list[tuple[float, int]]
    audit: dict[str, Any]
    timings: list[dict[str, Any]]
    drained_after_load: float | None
    settings: dict[str, str]
    load_cpu_seconds: float = 0.0
    loadavg: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load average at the start and the end
    calibration: Calibration | None = None
    calibration_writes: int = 0  # writes the calibration sent (audited with the run's)
    usage: dict[str, Any] = dataclasses.field(default_factory=dict)  # "warm-up", "whole run": monitor.usage_between
    sessions: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (t, pg_stat_database.sessions)
