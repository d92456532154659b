"""The stage's capacity, measured before the timeline: so the run tests resilience, not the machine.

A stepped ramp of the run's own workload mix (writes and reads in the scenario's proportion) against the
running stage, every proxy passing. A step passes when its p99 (from each request's scheduled time) is
under 100 ms, under 1 % of its requests fail and the generator kept to its schedule (under 1 % sent more
than 20 ms late, none shed). Three unjudged seconds at the first rate warm connections and caches; a step
that fails is played once more, and the ramp ends at its second failure. The capacity is the highest step
that passed. The timeline then runs at
`--load-fraction` of it."""

from __future__ import annotations

import dataclasses
from typing import Any

RAMP_START = 30.0  # requests/s, writes and reads together
RAMP_FACTOR = 1.4
STEP_SECONDS = 4.0
MAX_STEPS = 9  # 30 -> about 440 requests/s: past what this project's machines carry
STOP = {"p99_ms": 100.0, "lag_ms": 20.0, "lag_fraction": 0.01, "error_fraction": 0.01, "warmup_seconds": 3.0}


def ramp(write_share: float) -> list[list[float]]:
    """[seconds, writes/s, reads/s] per step."""
    steps, rate = [], RAMP_START
    for _ in range(MAX_STEPS):
        steps.append([STEP_SECONDS, round(rate * write_share, 1), round(rate * (1 - write_share), 1)])
        rate *= RAMP_FACTOR
    return steps


@dataclasses.dataclass
class Calibration:
    steps: list[dict[str, Any]]  # the load child's verdict per step played
    fraction: float
    write_share: float

    @property
    def capacity(self) -> float | None:
        """Requests/s of the last step that passed; None when the first one failed."""
        passed = [s["writes"] + s["reads"] for s in self.steps if s["ok"]]
        return max(passed) if passed else None

    def rates(self) -> tuple[float, float]:
        """(writes/s, reads/s) for the timeline: the fraction of the capacity (of the first step if none passed)."""
        total = (self.capacity or RAMP_START) * self.fraction
        return round(total * self.write_share, 1), round(total * (1 - self.write_share), 1)

    def describe(self) -> str:
        capacity = self.capacity
        writes, reads = self.rates()
        head = f"capacity {capacity:.0f} requests/s" if capacity is not None else f"no step passed (first {RAMP_START:g}/s)"
        return f"{head}; the timeline runs at {self.fraction:g} of it: {writes:g} writes/s + {reads:g} reads/s"

    def table(self) -> list[list[str]]:
        return [
            [
                f"{s['writes'] + s['reads']:.0f}",
                f"{s['p99_ms']:.1f}",
                f"{s['late']}/{s['requests']}",
                str(s["errors"]),
                "yes" if s["ok"] else "**no**" + (" (generator lagged)" if s["lagged"] else ""),
            ]
            for s in self.steps
        ]
