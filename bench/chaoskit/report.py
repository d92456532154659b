"""The Markdown summary: the audit, each fault's window, breaker and backlog timings, the targets."""

from __future__ import annotations

import os
from typing import Any

from bench.chaoskit.config import FIXED_SETTINGS, RUN_SETTINGS, TARGETS, ChaosConfig
from bench.chaoskit.figures import window_stats
from bench.chaoskit.helpers import md_table, percentile
from bench.chaoskit.machine_report import lag_line, machine_markdown
from bench.chaoskit.results import ModeResult


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def fmt_pct(value: float) -> str:
    return f"{value * 100:.2f} %" if value < 0.9995 or value == 1 else f"{value * 100:.3f} %"


def targets(results: dict[str, ModeResult]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the Brownout mode; None: not measured in this run."""
    out: list[tuple[str, str, bool | None]] = []
    result = results.get("brownout")
    if result is None:
        return out
    audit = result.audit
    for name in ("lost", "duplicated", "reordered"):
        out.append((f"0 {name} writes", str(audit[name]), audit[name] == 0))
    main = next((t for t in result.timings if t["kind"] == "db_outage"), None)
    rates = f" (run at {result.writes_rate:g} writes/s, {result.reads_rate:g} reads/s)"
    if main is None:
        return out
    stats = window_stats(result, main["start"], main["end"])
    out.append(
        (
            "every write acknowledged during the database outage, RabbitMQ up" + rates,
            f"{stats['writes'] - stats['write_errors']}/{stats['writes']} ({stats['queued']} queued)",
            stats["write_errors"] == 0,
        )
    )
    out.append(
        (
            "reads answered during the outage >= 99.9 %",
            f"{fmt_pct(stats['answered'])} ({stats['stale']} stale)",
            stats["answered"] >= TARGETS["reads_answered"],
        )
    )
    out.append(
        (
            "API p99 during the outage <= 50 ms",
            f"{stats['p99_ms']:.1f} ms (reads {stats['p99_reads_ms']:.1f}, writes {stats['p99_writes_ms']:.1f})",
            stats["p99_ms"] <= TARGETS["p99_ms"],
        )
    )
    # A node kill is judged on its own terms below: while a quorum queue elects a leader, a write may be refused
    # with 503 and Retry-After (never acknowledged unconfirmed), so the 99 % rule of the other windows is not its.
    others = [
        window_stats(result, f.start, f.end) | {"label": f.label}
        for f in result.faults
        if f.start != main["start"] and f.kind != "rabbit_node_kill"
    ]
    if others:
        worst_reads = min(others, key=lambda s: s["answered"])
        worst_writes = min(others, key=lambda s: 1 - s["write_error_rate"])
        out.append(
            (
                "every other fault window: >= 99 % of reads and of writes answered",
                f"worst reads {fmt_pct(worst_reads['answered'])} ({worst_reads['label']}), "
                f"worst writes {fmt_pct(1 - worst_writes['write_error_rate'])} ({worst_writes['label']})",
                worst_reads["answered"] >= TARGETS["other_windows_answered"]
                and 1 - worst_writes["write_error_rate"] >= TARGETS["other_windows_answered"],
            )
        )
    for kill in (t for t in result.timings if t["kind"] == "rabbit_node_kill"):
        first = kill["details"].get("first_ack_after_kill")
        out.append(
            (
                f"RabbitMQ node kill: first write acknowledged within {TARGETS['node_kill_first_ack']:g} s of the kill",
                "never" if first is None else fmt_s(first),
                first is not None and first <= TARGETS["node_kill_first_ack"],
            )
        )
    opened = main["open_all"]
    out.append(
        (
            "breaker open within 1 s of the outage (every web replica)",
            fmt_s(opened) + (f" (first {fmt_s(main['open_first'])})" if main["open_first"] is not None else ""),
            opened is not None and opened <= TARGETS["open_within"],
        )
    )
    out.append(("database back -> every web breaker closed (reported)", fmt_s(main["closed_all"]), None))
    drained = main["drained"]
    out.append(
        (
            "backlog drained within 15 s of the breakers closing",
            fmt_s(drained) + f" (peak {main['peak_backlog']})",
            drained is not None and drained <= TARGETS["drain_within"],
        )
    )
    return out


def report_markdown(results: dict[str, ModeResult], config: ChaosConfig, started: str) -> str:
    modes = list(results)
    first = next(iter(results.values()))
    parts = [
        f"### Chaos run, scenario `{config.scenario}`, {started}",
        "",
        f"{first.writes_rate:g} writes/s + {first.reads_rate:g} reads/s for {first.duration:g} s, "
        f"{config.web} web replica(s) (`brownout web`) and one worker (`brownout worker`); "
        f"settings: {', '.join(f'`{k}={v}`' for k, v in first.settings.items() if k in RUN_SETTINGS or k in FIXED_SETTINGS)}"
        ", the default settings otherwise.",
        "",
        *(lag_line(result) for result in results.values()),
        "",
        "**Audit, from the database** (acknowledged = 201/200 applied or 202 queued):",
        "",
    ]
    audit_rows = [
        ("writes sent", "writes_sent"),
        ("acknowledged", "acknowledged"),
        ("  of which queued (202)", "acknowledged_queued"),
        ("applied by the worker (path queued)", "applied_via_queue"),
        ("present in the database", "present"),
        ("lost", "lost"),
        ("duplicated", "duplicated"),
        ("rows no write asked for", "phantoms"),
        ("out of acceptance order (notifications)", "reordered"),
        ("notifications toggled", "toggled_entities"),
        ("late writes superseded (not applied over a newer one)", "superseded"),
        ("rejected (503, retry with the same key)", "rejected"),
        ("failed (500, timeout, connection)", "failed_writes"),
        ("unacknowledged but applied", "unacknowledged_applied"),
        ("reads", "reads"),
        ("reads answered", "reads_answered"),
        ("  of which stale", "reads_stale"),
        ("reads failed", "reads_failed"),
        ("  of which 404 for a notification created by an acknowledged write", "reads_not_found"),
        ("    created by a queued write (202), read before it was applied", "reads_not_found_queued"),
        ("dead letters", "dead_letters"),
    ]
    parts.append(md_table(["", *modes], [[label] + [str(results[m].audit[key]) for m in modes] for label, key in audit_rows]))
    parts += ["", "**During each fault** (requests scheduled inside the fault's window; p99 of all requests, client side):", ""]
    rows = []
    reference = results.get("brownout") or first
    for fault in reference.faults:
        for mode in modes:
            match = next((f for f in results[mode].faults if f.kind == fault.kind), None)
            if match is None:
                continue
            stats = window_stats(results[mode], match.start, match.end)
            rows.append(
                [
                    fault.label if mode == modes[0] else "",
                    mode,
                    f"{fmt_pct(stats['write_error_rate'])} ({stats['write_errors']}/{stats['writes']})",
                    f"{fmt_pct(stats['read_error_rate'])} ({stats['read_errors']}/{stats['reads']})",
                    f"{stats['p99_ms']:.1f} ({stats['p99_reads_ms']:.1f} / {stats['p99_writes_ms']:.1f})",
                    str(stats["queued"]),
                    str(stats["stale"]),
                    str(stats["lost"]),
                ]
            )
    parts.append(
        md_table(["fault", "mode", "write errors", "read errors", "p99 ms (reads / writes)", "queued", "stale", "lost"], rows)
    )
    brownout = results.get("brownout")
    if brownout is not None and brownout.timings:
        parts += ["", "**Breaker and backlog** (Brownout; from the dynos' transition log lines and the database):", ""]
        rows = []
        for t in brownout.timings:
            extra = ""
            if t["kind"] == "worker_kill":
                d = t["details"]
                extra = (
                    f"worker SIGKILLed at backlog {d.get('backlog_at_kill')} of {d.get('peak_before')}"
                    f" (mid-drain: {d.get('mid_drain')}), restarted"
                )
            if t["kind"] == "rabbit_node_kill":
                extra = node_kill_line(t["details"])
            rows.append(
                [
                    t["label"],
                    fmt_s(t["open_first"])
                    + " / "
                    + fmt_s(t["open_all"])
                    + (f" ({', '.join(t['already_open'])} already open)" if t["already_open"] else ""),
                    fmt_s(t["closed_all"]),
                    fmt_s(t["drained"]),
                    str(t["peak_backlog"]),
                    extra,
                ]
            )
        header = ["outage", "breaker open (first / all)", "back -> all closed", "closed -> drained", "peak backlog", ""]
        parts.append(md_table(header, rows))
        parts += ["", "**Targets**:", ""]
        parts.append(
            md_table(
                ["target", "measured", "met"],
                [[name, value, "-" if met is None else ("yes" if met else "**no**")] for name, value, met in targets(results)],
            )
        )
    lag = {m: harness_lag(results[m]) for m in modes}
    cpu = {m: results[m].load_cpu_seconds * 1000 / max(1, len(results[m].requests)) for m in modes}
    parts += [
        "",
        "Harness: open-loop load from a child process, latency from each request's scheduled time; its send lag p99 "
        + ", ".join(f"{m} {v:.1f} ms" for m, v in lag.items())
        + "; its CPU per request "
        + ", ".join(f"{m} {v:.2f} ms" for m, v in cpu.items())
        + "; requests shed by the client (over 512 in flight): "
        + ", ".join(f"{m} {results[m].shed}" for m in modes)
        + f"; machine ({os.cpu_count()} cores, shared) 1-min load average at start -> end: "
        + ", ".join(f"{m} {results[m].loadavg[0]:.1f} -> {results[m].loadavg[1]:.1f}" for m in modes)
        + ".",
    ]
    parts += machine_markdown(results)
    return "\n".join(parts) + "\n"


def node_kill_line(details: dict[str, Any]) -> str:
    """The RabbitMQ node kill: which node, when, the first write acknowledged (202) after it, when it was back."""
    if "killed_at" not in details:
        return str(details.get("kill", "the node was not killed"))
    first = details.get("first_ack_after_kill")
    return (
        f"queue leader {details['node']} SIGKILLed at {details['killed_at']:.1f} s; first 202 sent after it answered "
        + ("never" if first is None else f"{first:.1f} s later")
        + (f"; back at {details['back_at']:.1f} s" if "back_at" in details else "; not started again")
        + (f", leader then {details['leader_after']}" if "leader_after" in details else "")
    )


def harness_lag(result: ModeResult) -> float:
    return percentile([(r[1] - r[0]) * 1000 for r in result.requests], 0.99)
