"""Figures from a mode's records: breaker and drain timings per outage, error rates and p99 per window."""

from __future__ import annotations

import math
from typing import Any

from bench.chaoskit.audit import ACK
from bench.chaoskit.helpers import percentile
from bench.chaoskit.load import WRITE_KINDS
from bench.chaoskit.results import ModeResult


def outage_timings(result: ModeResult) -> list[dict[str, Any]]:
    """Per database outage: breaker open after its start, closed after its end (each web replica), drained."""
    timings = []
    webs = sorted({dyno for _, dyno, _, _ in result.transitions if dyno.startswith("web")})
    for index, fault in enumerate(result.faults):
        if fault.kind not in ("db_outage", "worker_kill", "rabbit_node_kill") or result.mode != "brownout":
            continue
        start, end = fault.start, fault.end
        horizon = result.faults[index + 1].start if index + 1 < len(result.faults) else math.inf
        opened: dict[str, float | None] = {}
        closed: dict[str, float | None] = {}
        already_open: list[str] = []
        for web in webs:
            ts = [(t, new) for t, dyno, _, new in result.transitions if dyno == web]
            before = [new for t, new in ts if t < start]
            if before and before[-1] == "open":  # already open when the outage began (overload, an earlier fault)
                opened[web] = 0.0
                already_open.append(web)
            else:
                opened[web] = next((t - start for t, new in ts if new == "open" and start <= t <= end + 1), None)
            # closed for good after the outage (before the next fault): the first close not followed by a reopening
            later = [(t, new) for t, new in ts if end <= t < horizon]
            last_close = None
            for t, new in later:
                if new == "closed" and last_close is None:
                    last_close = t
                elif new != "closed":
                    last_close = None
            closed[web] = None if last_close is None else last_close - end
        opened_at = [v for v in opened.values() if v is not None]
        closed_at_all = [v for v in closed.values() if v is not None]
        fleet_open = max(opened_at) if opened and len(opened_at) == len(opened) else None
        first_open = min(opened_at, default=None)
        fleet_closed = max(closed_at_all) if closed and len(closed_at_all) == len(closed) else None
        drained = None
        peak = max((n for t, n in result.backlog if start <= t < horizon), default=None)
        if fleet_closed is not None:
            closed_at = end + fleet_closed
            drained_at = next((t for t, n in result.backlog if closed_at <= t and n == 0), None)
            drained = None if drained_at is None else drained_at - closed_at
        timings.append(
            {
                "label": fault.label,
                "kind": fault.kind,
                "start": start,
                "end": end,
                "open_first": first_open,
                "open_all": fleet_open,
                "closed_all": fleet_closed,
                "drained": drained,
                "peak_backlog": peak,
                "already_open": already_open,
                "details": fault.details,
            }
        )
    return timings


def window_stats(result: ModeResult, start: float, end: float) -> dict[str, Any]:
    """Requests scheduled in [start, end): write/read error rates, p99 of all, acknowledged writes lost."""
    reqs = [r for r in result.requests if start <= r[0] < end]
    writes = [r for r in reqs if r[3] in WRITE_KINDS]
    reads = [r for r in reqs if r[3] not in WRITE_KINDS]
    lost_keys = set(result.audit["lost_keys"])
    lost = sum(1 for w in result.writes if start <= w["t"] < end and w["key"] in lost_keys)
    write_acked = sum(1 for r in writes if r[4] in ACK)
    read_ok = sum(1 for r in reads if r[4] == 200)
    latencies = [(r[2] - r[0]) * 1000 for r in reqs]
    return {
        "requests": len(reqs),
        "writes": len(writes),
        "write_errors": len(writes) - write_acked,
        "write_error_rate": (len(writes) - write_acked) / len(writes) if writes else 0.0,
        "queued": sum(1 for r in writes if r[4] == 202),
        "reads": len(reads),
        "read_errors": len(reads) - read_ok,
        "read_error_rate": (len(reads) - read_ok) / len(reads) if reads else 0.0,
        "answered": read_ok / len(reads) if reads else 1.0,
        "stale": sum(r[5] for r in reads),
        "p99_ms": percentile(latencies, 0.99),
        "p99_reads_ms": percentile([(r[2] - r[0]) * 1000 for r in reads], 0.99),
        "p99_writes_ms": percentile([(r[2] - r[0]) * 1000 for r in writes], 0.99),
        "p50_ms": percentile(latencies, 0.50),
        "lost": lost,
    }


def windows(result: ModeResult) -> list[tuple[str, float, float]]:
    """(label, start, end): the fault-free warm-up, each fault that lasted, and what follows the last one."""
    faults = [f for f in result.faults if f.end > f.start]
    first = result.faults[0].start if result.faults else result.duration
    spans = [("warm-up (no fault)", 0.0, first)]
    spans += [(f.label, f.start, f.end) for f in faults]
    last = max((f.end for f in result.faults), default=first)
    if last < result.duration:
        spans.append(("after the faults", last, result.duration))
    return spans


def late_requests(result: ModeResult, start: float, end: float, lag_ms: float) -> tuple[int, int]:
    """(requests sent more than *lag_ms* after their scheduled time, requests) among those scheduled in the window."""
    rows = [r for r in result.requests if start <= r[0] < end]
    return sum(1 for r in rows if (r[1] - r[0]) * 1000 > lag_ms), len(rows)


def sessions_per_second(result: ModeResult, start: float, end: float) -> float | None:
    """New PostgreSQL sessions per second in the window, from the monitor's samples (the last one at or before each edge)."""

    def at(t: float) -> tuple[float, int] | None:
        before = [sample for sample in result.sessions if sample[0] <= t]
        return before[-1] if before else None

    first, last = at(start), at(end)
    if first is None or last is None or last[0] <= first[0]:
        return None
    return (last[1] - first[1]) / (last[0] - first[0])
