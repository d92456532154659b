"""The chaos report's targets: each fault window other than the main outage must answer 99 % of reads and writes.
Synthetic records only (no service needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaoskit.report import targets  # noqa: E402
from bench.chaoskit.results import FaultRecord, ModeResult  # noqa: E402

OUTAGE = FaultRecord("db_outage", "database outage 30 s", 10.0, 40.0)
REDIS = FaultRecord("redis_outage", "Redis down 15 s", 50.0, 65.0)


def requests(start: float, count: int, *, kind: str, status: int) -> list[list[Any]]:
    # [scheduled, sent, answered, kind, status, stale, id, late]
    return [[start + i * 0.01, start + i * 0.01, start + i * 0.01 + 0.005, kind, status, 0, "x", 0] for i in range(count)]


def run(redis_read_failures: int) -> ModeResult:
    records = requests(10.0, 1000, kind="get", status=200) + requests(10.5, 100, kind="create", status=202)
    records += requests(50.0, 1000 - redis_read_failures, kind="get", status=200)
    records += requests(60.0, redis_read_failures, kind="get", status=503)
    records += requests(51.0, 100, kind="create", status=201)
    audit = {"lost": 0, "duplicated": 0, "reordered": 0, "lost_keys": []}
    timing = {
        "kind": "db_outage",
        "label": OUTAGE.label,
        "start": OUTAGE.start,
        "end": OUTAGE.end,
        "open_all": 0.1,
        "open_first": 0.1,
        "closed_all": 1.0,
        "drained": 2.0,
        "peak_backlog": 100,
        "already_open": [],
        "details": {},
    }
    return ModeResult(
        mode="brownout",
        duration=70.0,
        writes_rate=10.0,
        reads_rate=20.0,
        requests=records,
        writes=[],
        shed=0,
        faults=[OUTAGE, REDIS],
        transitions=[],
        backlog=[],
        queue_depth=[],
        audit=audit,
        timings=[timing],
        drained_after_load=None,
        settings={},
    )


def other_windows(result: ModeResult) -> tuple[str, str, bool | None]:
    return next(t for t in targets({"brownout": result}) if t[0].startswith("every other fault window"))


def test_a_window_under_99_percent_fails_the_target_and_is_named() -> None:
    _, measured, met = other_windows(run(redis_read_failures=30))
    assert met is False
    assert "97.00 %" in measured and "Redis down 15 s" in measured


def test_every_window_at_99_percent_or_more_meets_it() -> None:
    _, measured, met = other_windows(run(redis_read_failures=5))
    assert met is True, measured


NODE_KILL = FaultRecord("rabbit_node_kill", "database outage 16 s + SIGKILL of the RabbitMQ queue leader's node", 80.0, 96.0)


def with_node_kill(first_ack: float | None) -> ModeResult:
    """A run whose node-kill window refused a tenth of its writes (503 while the queue elected a leader)."""
    result = run(redis_read_failures=5)
    result.requests += requests(80.0, 90, kind="create", status=202) + requests(81.0, 10, kind="create", status=503)
    result.requests += requests(80.0, 200, kind="get", status=200)
    result.faults.append(NODE_KILL)
    details: dict[str, Any] = {"node": "rabbit-1", "killed_at": 82.0}
    if first_ack is not None:
        details["first_ack_after_kill"] = first_ack
    result.timings.append(result.timings[0] | {"kind": NODE_KILL.kind, "label": NODE_KILL.label, "details": details})
    return result


def node_kill_target(result: ModeResult) -> tuple[str, str, bool | None]:
    return next(t for t in targets({"brownout": result}) if t[0].startswith("RabbitMQ node kill"))


def test_a_node_kill_is_judged_by_its_first_acknowledged_write_not_the_99_percent_rule() -> None:
    result = with_node_kill(first_ack=1.1)
    assert other_windows(result)[2] is True  # the 503s of the election do not count against the other windows
    name, measured, met = node_kill_target(result)
    assert met is True and measured == "1.10 s" and "5 s" in name


def test_a_node_kill_with_no_write_acknowledged_soon_after_fails() -> None:
    assert node_kill_target(with_node_kill(first_ack=7.5))[2] is False
    assert node_kill_target(with_node_kill(first_ack=None))[1:] == ("never", False)
