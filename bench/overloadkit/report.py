"""The printed figures: a table per mix and service, Brownout's targets, and whether the run counts."""

from __future__ import annotations

from collections.abc import Callable

from bench.overloadkit.steps import LATE_MS, StepResult

MAX_START_LOAD = 1.5
MAX_LATE_SHARE = 0.01
MAX_CORE_SHARE = 0.8  # the generator's CPU while sending, of its one core: beyond it, its own lag is in the latencies

HEADER = (
    f"  {'step':<6}{'offered':>8}{'goodput':>8}{'p50':>7}{'p99':>7}{'2xx':>7}{'stale':>6}{'shed':>6}{'503':>6}"
    f"{'5xx':>6}{'other':>6}{'t/o':>6}{'err':>5}{'<=1s':>7}{'breaker':>8}{'conns':>6}{'late':>13}"
)
LEGEND = (
    "  offered, goodput: requests/s (goodput: 2xx, stale reads included); p50/p99: ms from the scheduled time, of\n"
    "  admitted requests (all but 503 overloaded; a timeout counts at its give-up time); shed: 503 overloaded;\n"
    "  503: other 503; 5xx: other 5xx; other: any other status (4xx); t/o: no answer within the client timeout;\n"
    "  err: connection error; <=1s: share answered within 1 s; breaker: transitions during the step (/metrics);\n"
    "  conns: new PostgreSQL sessions during the step (pg_stat_database.sessions); late: share sent\n"
    f"  > {LATE_MS:g} ms after its scheduled time, by the generator's own loop / waiting for a free connection"
)


def row(step: StepResult) -> str:
    c = step.counts
    moved = "-" if step.transitions is None else str(sum(step.transitions.values()))
    late = f"{step.loop_late:.1%}/{step.conn_late:.1%}"
    return (
        f"  {step.label:<6}{step.rate:8.0f}{step.goodput:8.0f}{step.p50:7.0f}{step.p99:7.0f}{c['ok']:7d}{c['stale']:6d}"
        f"{c['shed']:6d}{c['other503']:6d}{c['other5xx']:6d}{c['other']:6d}{c['timeout']:6d}{c['error']:5d}"
        f"{step.within_1s:7.1%}{moved:>8}{step.new_sessions:6d}{late:>13}"
    )


def table(title: str, steps: list[StepResult], echo: Callable[[str], None]) -> None:
    echo(title)
    echo(HEADER)
    for step in steps:
        echo(row(step))


def verdicts(capacity: float, steps: dict[str, StepResult], echo: Callable[[str], None]) -> bool:
    """Brownout's targets at 2x and 3x its capacity; True when all are met."""
    half, double, triple = steps["0.5x"], steps["2x"], steps["3x"]
    moved = {label: sum(step.transitions.values()) if step.transitions is not None else None for label, step in steps.items()}
    checks = [
        (
            f"2x: goodput >= 90 % of capacity ({0.9 * capacity:.0f}/s)",
            double.goodput >= 0.9 * capacity,
            f"{double.goodput:.0f}/s ({double.goodput / capacity:.0%})",
        ),
        (
            f"2x: admitted p99 <= 2 x its value at 0.5x ({2 * half.p99:.0f} ms)",
            double.p99 <= 2 * half.p99,
            f"{double.p99:.0f} ms ({double.p99 / half.p99:.1f}x)" if half.p99 > 0 else f"{double.p99:.0f} ms",
        ),
        (
            "0.5x-3x: no breaker transition (the database is healthy)",
            all(value == 0 for value in moved.values()),
            ", ".join(f"{label} {value if value is not None else '?'}" for label, value in moved.items()),
        ),
        (
            "2x: no new database connection beyond the warm pool's (no more than at 0.5x)",
            double.new_sessions <= half.new_sessions,
            f"{double.new_sessions} new at 2x, {half.new_sessions} at 0.5x",
        ),
        (
            "3x: every request answered (admitted or 503) within 1 s",
            triple.within_1s >= 1.0,
            f"{triple.within_1s:.1%}",
        ),
    ]
    for text, passed, figure in checks:
        echo(f"  {'PASS' if passed else 'FAIL'}  {text}: {figure}")
    return all(passed for _, passed, _ in checks)


def validity(load_start: float, steps: list[StepResult], echo: Callable[[str], None]) -> bool:
    """Whether the run can be read: a quiet machine at the start, and a generator that kept its schedule with
    CPU to spare."""
    reasons = []
    if load_start > MAX_START_LOAD:
        reasons.append(f"the load average at the start was {load_start:.2f} (> {MAX_START_LOAD})")
    lagged = [s for s in steps if s.loop_late > MAX_LATE_SHARE]
    if lagged:
        worst = max(lagged, key=lambda s: s.loop_late)
        reasons.append(
            f"the generator lagged in {len(lagged)} step(s) (worst: {worst.service} {worst.mix} {worst.label}, "
            f"{worst.loop_late:.1%} sent > {LATE_MS:g} ms late by its own loop)"
        )
    busy = [s for s in steps if s.core_share > MAX_CORE_SHARE]
    if busy:
        worst = max(busy, key=lambda s: s.core_share)
        reasons.append(
            f"the generator used more than {MAX_CORE_SHARE:.0%} of its core in {len(busy)} step(s) (worst: {worst.service} "
            f"{worst.mix} {worst.label} at {worst.rate:.0f}/s, {worst.core_share:.0%})"
        )
    waited = [s for s in steps if s.conn_late > MAX_LATE_SHARE]
    if waited:
        echo(
            f"  note: in {len(waited)} step(s) more than {MAX_LATE_SHARE:.0%} of requests waited for one of the "
            "generator's connections (all busy with requests the server had not answered): sent late, their wait is in "
            "their latency. That is the server's backlog seen through a bounded client pool, not the generator's lag."
        )
    for reason in reasons:
        echo(f"  THIS RUN PROVES NOTHING and should be repeated: {reason}")
    return not reasons
