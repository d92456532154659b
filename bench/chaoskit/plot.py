"""chaos.png: per mode, request rate, p99, breaker state, backlog and errors over time (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.chaoskit.audit import ACK
from bench.chaoskit.config import TARGETS
from bench.chaoskit.dynos import STATE_LEVEL
from bench.chaoskit.helpers import percentile
from bench.chaoskit.load import WRITE_KINDS
from bench.chaoskit.results import ModeResult


def plot(results: dict[str, ModeResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = list(results)
    rows = ["requests/s", "p99 latency (ms)", "breaker state", "backlog (queued writes)", "errors/s"]
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(7.5 * len(modes), 12), sharex="col", squeeze=False)
    colors = {
        "ssl_kills": "#f4a261",
        "db_outage": "#e63946",
        "rabbit_outage": "#457b9d",
        "redis_outage": "#2a9d8f",
        "worker_kill": "#9b5de5",
        "rabbit_node_kill": "#1d3557",
    }
    for col, mode in enumerate(modes):
        result = results[mode]
        horizon = int(result.duration)  # whole seconds: a last partial bin would show a false drop
        bins: list[list[list[Any]]] = [[] for _ in range(horizon)]
        for r in result.requests:
            index = int(r[0])
            if 0 <= index < horizon:
                bins[index].append(r)
        xs = list(range(horizon))
        writes = [sum(1 for r in b if r[3] in WRITE_KINDS) for b in bins]
        reads = [sum(1 for r in b if r[3] not in WRITE_KINDS) for b in bins]
        p99 = [percentile([(r[2] - r[0]) * 1000 for r in b], 0.99) if b else float("nan") for b in bins]
        write_err = [sum(1 for r in b if r[3] in WRITE_KINDS and r[4] not in ACK) for b in bins]
        read_err = [sum(1 for r in b if r[3] not in WRITE_KINDS and r[4] != 200) for b in bins]
        queued = [sum(1 for r in b if r[4] == 202) for b in bins]
        stale = [sum(r[5] for r in b if r[3] not in WRITE_KINDS) for b in bins]
        ax = axes[0][col]
        ax.plot(xs, writes, label="writes", color="#1d3557")
        ax.plot(xs, reads, label="reads", color="#2a9d8f")
        ax.plot(xs, queued, label="writes queued (202)", color="#9b5de5", linewidth=0.8)
        ax.set_title(f"{mode}: {result.writes_rate:g} writes/s + {result.reads_rate:g} reads/s")
        ax.legend(loc="upper right", fontsize=7)
        ax = axes[1][col]
        ax.plot(xs, p99, color="#e63946")
        ax.axhline(TARGETS["p99_ms"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax = axes[2][col]
        webs = sorted({dyno for _, dyno, _, _ in result.transitions})
        if result.mode == "brownout" and webs:
            for offset, dyno in enumerate(webs):
                ts = [(t, STATE_LEVEL.get(new, 0)) for t, d, _, new in result.transitions if d == dyno]
                xs_s = [max(0.0, t) for t, _ in ts] + [result.duration]
                ys_s = [lvl for _, lvl in ts] + [ts[-1][1]]
                ax.step(xs_s, [y + 0.04 * offset for y in ys_s], where="post", label=dyno)
            ax.set_yticks([0, 1, 2], ["closed", "half open", "open"])
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no breaker", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
        ax = axes[3][col]
        if result.backlog:
            ax.plot(
                [t for t, _ in result.backlog], [n for _, n in result.backlog], color="#9b5de5", label="acknowledged, not applied"
            )
            if result.queue_depth:
                ax.plot(
                    [t for t, _ in result.queue_depth],
                    [n for _, n in result.queue_depth],
                    color="grey",
                    linewidth=0.8,
                    label="RabbitMQ ready",
                )
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no queue", ha="center", va="center", transform=ax.transAxes)
        ax = axes[4][col]
        ax.plot(xs, write_err, label="write errors (not acknowledged)", color="#e63946")
        ax.plot(xs, read_err, label="read errors", color="#f4a261")
        ax.plot(xs, stale, label="stale reads (answered)", color="#2a9d8f", linewidth=0.8)
        ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("seconds since the load started")
        for row_index in range(len(rows)):
            ax = axes[row_index][col]
            for fault in result.faults:
                ax.axvspan(fault.start, fault.end, color=colors.get(fault.kind, "grey"), alpha=0.15)
                killed = fault.details.get("killed_at")
                if killed is not None:
                    ax.axvline(killed, color="#9b5de5", linestyle="--", linewidth=0.8)
            if col == 0:
                ax.set_ylabel(rows[row_index])
        for fault in result.faults:
            top = axes[0][col]
            where = top.get_xaxis_transform()
            top.text(fault.start, 0.02, " " + fault.label, transform=where, fontsize=6, rotation=90, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
