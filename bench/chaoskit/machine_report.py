"""The summary's account of the machine: calibration, generator lag, CPU per process, sessions, web counters.

A run whose generator lagged measured the machine: the summary says so before any figure."""

from __future__ import annotations

from typing import Any

from bench.chaoskit.calibrate import STOP
from bench.chaoskit.figures import late_requests, sessions_per_second, windows
from bench.chaoskit.helpers import md_table
from bench.chaoskit.results import ModeResult

LAGGED = "**generator lagged: these figures describe the machine, not the service**"


def lag_windows(result: ModeResult) -> list[tuple[str, int, int, bool]]:
    """(window, late, requests, lagged) per window: lagged over 1 % sent more than 20 ms late."""
    out = []
    for label, start, end in windows(result):
        late, total = late_requests(result, start, end, STOP["lag_ms"])
        out.append((label, late, total, late > STOP["lag_fraction"] * max(1, total)))
    return out


def lagged(result: ModeResult) -> bool:
    sent = max(1, len(result.requests) + result.shed)
    return any(w[3] for w in lag_windows(result)) or result.shed > STOP["lag_fraction"] * sent


def lag_line(result: ModeResult) -> str:
    bad = [f"{label} {100 * late / max(1, total):.1f} %" for label, late, total, is_late in lag_windows(result) if is_late]
    if result.shed:
        bad.append(f"{result.shed} requests shed (over 512 in flight)")
    if lagged(result):
        return f"{LAGGED} ({result.mode}: sent over {STOP['lag_ms']:g} ms late: " + ", ".join(bad) + ")."
    return (
        f"Generator on schedule ({result.mode}): in every window under {100 * STOP['lag_fraction']:g} % of the requests "
        f"were sent over {STOP['lag_ms']:g} ms late, none shed."
    )


LABELS = {"harness": "harness process", "generator": "load generator", "proxies": "proxies (one process)"}
OWN = ("harness", "generator", "proxies")


def machine_markdown(results: dict[str, ModeResult]) -> list[str]:
    """Per mode: the calibration, CPU per process, the web's counters, sessions and lag per window."""
    parts: list[str] = []
    for mode, result in results.items():
        parts += _calibration(result)
        parts += [
            "",
            f"**The machine** ({mode}; 1-minute load average {result.loadavg[0]:.1f} at the start, "
            f"{result.loadavg[1]:.1f} at the end). CPU seconds (% of one core), from /proc, sums of each process tree:",
            "",
        ]
        spans = [name for name in ("warm-up", "whole run") if name in result.usage]
        if spans:
            parts += _cpu(result.usage, spans) + _counters(result, spans)
        parts += _windows(result)
    return parts


def _calibration(result: ModeResult) -> list[str]:
    cal = result.calibration
    if cal is None:
        return []
    return [
        "",
        f"**Calibration** ({result.mode} stage, every proxy passing, the run's mix: "
        f"{100 * cal.write_share:.0f} % writes): {cal.describe()}.",
        "",
        md_table(["requests/s", "p99 ms", "sent > 20 ms late", "errors", "passed"], cal.table()),
        "",
        f"Its {result.calibration_writes} writes are in the audit above.",
    ]


def _cpu(usage: dict[str, Any], spans: list[str]) -> list[str]:
    groups = [g for g in usage[spans[-1]]["cpu"] if g != "harness"] + ["harness"]
    rows = []
    for group in groups:
        cells = []
        for span in spans:
            seconds, pct = usage[span]["cpu"].get(group, (0.0, 0.0))
            cells.append(f"{seconds:.1f} ({pct:.0f} %)")
        rows.append([LABELS.get(group, group), *cells])
    own = []
    for span in spans:
        seconds = sum(usage[span]["cpu"].get(g, (0.0, 0.0))[0] for g in OWN)
        own.append(f"**{seconds:.1f} ({100 * seconds / usage[span]['wall']:.0f} %)**")
    rows.append(["the harness's own (3 rows above)", *own])
    return [
        md_table(["process"] + [f"{s} ({usage[s]['wall']:.0f} s)" for s in spans], rows),
        "",
        "PostgreSQL, RabbitMQ and Redis are the machine's shared servers: other work on them is counted too. "
        "With the memory alarm in the timeline, the run's broker is a RabbitMQ node of its own.",
    ]


def _counters(result: ModeResult, spans: list[str]) -> list[str]:
    if result.mode == "naive":
        return ["", "(naive_app has no `/metrics`: no database error or breaker counters in this mode)"]
    usage = result.usage
    keys = sorted({k for s in spans for k in usage[s]["counters"]})
    rows = [[key, *(f"{usage[s]['counters'].get(key, 0):g}" for s in spans)] for key in keys]
    parts = ["", "Web processes' `/metrics` (both replicas summed):", ""]
    parts.append(md_table(["counter", *spans], rows) if rows else "(no database error, no breaker transition)")
    if not all(usage[s]["scraped"] for s in spans):
        parts.append("(a web process did not answer /metrics at a mark: its counters are missing there)")
    return parts


def _windows(result: ModeResult) -> list[str]:
    rows = []
    for (label, start, end), (_, late, total, is_late) in zip(windows(result), lag_windows(result), strict=True):
        rate = sessions_per_second(result, start, end)
        rows.append(
            [
                f"{label} ({start:.0f}-{end:.0f} s)",
                "n/a" if rate is None else f"{rate:.1f}",
                f"{late}/{total}" + (" **lagged**" if is_late else ""),
            ]
        )
    return [
        "",
        "Per window: new PostgreSQL sessions per second (`pg_stat_database.sessions` of the run's database) and "
        "requests the generator sent over 20 ms late:",
        "",
        md_table(["window", "sessions/s", "sent late"], rows),
    ]
