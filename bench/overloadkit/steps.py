"""One step (a fixed offered rate for a few seconds) and what it measured; the capacity search built on it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.chaoskit.config import ROOT
from bench.chaoskit.helpers import percentile
from bench.chaoskit.processes import die_with_parent
from bench.overloadkit.mixes import seeded_id
from bench.overloadkit.probes import AdmissionSampler, scrape, settle, transitions_between
from bench.overloadkit.stage import Stage

LATE_MS = 10.0  # a request sent later than this after its scheduled time was sent late
CAPACITY_P99_MS = 100.0
MIN_RATE = 5.0  # per second: the capacity search gives up below this


@dataclasses.dataclass
class StepResult:
    service: str
    mix: str
    label: str  # "ramp", or the multiple of capacity ("0.5x")
    rate: float
    duration: float
    counts: dict[str, int]  # ok, stale, shed, other503, other5xx, other (4xx...), timeout, error
    p50: float  # ms, admitted requests (all but the shed)
    p99: float
    within_1s: float  # share of all requests answered (any status) within 1 s of their scheduled time
    loop_late: float  # share the generator's own loop sent late
    conn_late: float  # share sent late for want of a free connection (all connections busy)
    transitions: dict[str, int] | None
    new_sessions: int
    backends: int
    pool: dict[str, float]
    cpu_seconds: float
    settle_seconds: float
    p99_all: float  # ms, every request (the capacity search's criterion)
    last_ok: float  # s from the step's start to its last 2xx answer
    by_kind: dict[str, str]  # request kind -> its answers in words (split_text)
    lag_p50: float = 0.0  # ms, the generator's own loop lag (scheduled time to taken up), every request
    lag_p99: float = 0.0
    core_share: float = 0.0  # the generator's CPU while sending, as a share of one core
    generator_cpus: tuple[int, ...] = ()  # the cores the generator was allowed to run on

    @property
    def total(self) -> int:
        return sum(self.counts.values()) - self.counts["stale"]

    @property
    def goodput(self) -> float:
        """2xx per second, over the step or until its last 2xx if that came later (a backlog served late)."""
        return self.counts["ok"] / max(self.duration, self.last_ok)

    @property
    def serves(self) -> bool:
        """Served at this rate: p99 under 100 ms (every request counted) and 99 % answered 2xx."""
        return self.p99_all < CAPACITY_P99_MS and self.counts["ok"] >= 0.99 * self.total


def classify(status: int, shed: int) -> str:
    if status == -1:
        return "timeout"
    if status == 0:
        return "error"
    if 200 <= status < 300:
        return "ok"
    if status == 503:
        return "shed" if shed else "other503"
    return "other5xx" if status >= 500 else "other"


def summarize(rows: list[list[Any]]) -> dict[str, Any]:
    counts = dict.fromkeys(("ok", "stale", "shed", "other503", "other5xx", "other", "timeout", "error"), 0)
    admitted, everything, lags = [], [], []
    within = loop_late = conn_late = 0
    last_ok = 0.0
    by_kind: dict[str, dict[str, list[float]]] = {}  # request kind -> admitted / shed latencies
    for request, status, shed, stale, at, loop_lag, send_lag, latency in rows:
        kind = classify(status, shed)
        counts[kind] += 1
        by_kind.setdefault(request, {"admitted": [], "shed": []})["shed" if kind == "shed" else "admitted"].append(latency)
        if kind == "ok":
            last_ok = max(last_ok, at + latency / 1000)
        counts["stale"] += stale
        everything.append(latency)
        lags.append(loop_lag)
        if kind != "shed":
            admitted.append(latency)
        if status > 0 and latency <= 1000:
            within += 1
        if loop_lag > LATE_MS:
            loop_late += 1
        elif send_lag < 0 or send_lag > LATE_MS:
            conn_late += 1
    n = max(1, len(rows))
    return {
        "counts": counts,
        "p50": percentile(admitted, 0.5),
        "p99": percentile(admitted, 0.99),
        "p99_all": percentile(everything, 0.99),
        "within_1s": within / n,
        "loop_late": loop_late / n,
        "conn_late": conn_late / n,
        "last_ok": last_ok,
        "lag_p50": percentile(lags, 0.5),
        "lag_p99": percentile(lags, 0.99),
        "by_kind": {request: split_text(found) for request, found in by_kind.items()},
    }


def split_text(found: dict[str, list[float]]) -> str:
    """One request kind's answers: how many were shed, and the p50/p99 of the admitted and of the shed."""
    admitted, shed = found["admitted"], found["shed"]
    text = f"{len(admitted) + len(shed)} sent, {len(shed)} shed"
    if admitted:
        text += f", admitted {percentile(admitted, 0.5):.0f}/{percentile(admitted, 0.99):.0f} ms"
    if shed:
        text += f", shed answered in {percentile(shed, 0.5):.0f}/{percentile(shed, 0.99):.0f} ms"
    return text


class StepRunner:
    """Runs steps against the stage's current web process, one generator child per step.

    *generator_cpu*: the core the generator is pinned to (os.sched_setaffinity), None to let it float."""

    def __init__(
        self,
        stage: Stage,
        *,
        seconds: float,
        timeout: float,
        connections: int,
        echo: Callable[[str], None],
        generator_cpu: int | None = None,
    ) -> None:
        self.stage, self.seconds, self.timeout, self.connections, self.echo = stage, seconds, timeout, connections, echo
        self.generator_cpu = generator_cpu
        self.item_cursor = self.list_cursor = 0
        self.cpu_seconds = 0.0
        self.count = 0

    def _preexec(self) -> None:
        die_with_parent()
        if self.generator_cpu is not None:
            os.sched_setaffinity(0, {self.generator_cpu})

    def run(self, service: str, url: str, mix: str, rate: float, label: str) -> StepResult:
        self.count += 1
        out = self.stage.out_dir / f"step-{self.count:02d}-{service}-{mix}-{label}.json"
        cfg = {
            "url": url,
            "headers": self.stage.auth,
            "mix": mix,
            "tag": f"{self.stage.tag}-{self.count}",
            "item_start": self.item_cursor,
            "list_start": self.list_cursor,
            "rate": rate,
            "duration": self.seconds,
            "timeout": self.timeout,
            "connections": self.connections,
            "cpu": self.generator_cpu,
            "out": str(out),
        }
        metrics_before = scrape(url, self.stage.auth)
        sessions_before, _ = self.stage.sessions()
        config_path = out.with_suffix(".cfg.json")
        config_path.write_text(json.dumps(cfg))
        sampler = AdmissionSampler(url, self.stage.auth)
        with sampler:
            child = subprocess.run(
                [sys.executable, "-m", "bench.overloadkit.generator", str(config_path)],
                cwd=ROOT,
                start_new_session=True,  # its own autogroup (generator.first_in_line); killed if this process dies
                preexec_fn=self._preexec,  # pinned from its first instruction, imports included
                timeout=self.seconds + self.timeout + 60,
                check=False,
            )
        if child.returncode != 0:
            raise RuntimeError(f"the load generator exited with {child.returncode}")
        data = json.loads(out.read_text())
        self.item_cursor += data["items_used"]
        self.list_cursor += data["lists_used"]
        self.cpu_seconds += data["cpu_seconds"]
        probe = f"/notifications/{seeded_id('c', 0)}"  # a cached read (a database read for the naive service)
        waited = settle(url, self.stage.auth, probe)
        time.sleep(max(0.0, 1.2 - waited))  # PostgreSQL counts a new session once its backend is idle (<= 1 s)
        metrics_after = scrape(url, self.stage.auth)
        sessions_after, backends = self.stage.sessions()
        summary = summarize(data["rows"])
        pool = {k.removeprefix("pool:"): v for k, v in (metrics_after or {}).items() if k.startswith("pool:")}
        result = StepResult(
            service=service,
            mix=mix,
            label=label,
            rate=rate,
            duration=self.seconds,
            counts=summary["counts"],
            p50=summary["p50"],
            p99=summary["p99"],
            within_1s=summary["within_1s"],
            loop_late=summary["loop_late"],
            conn_late=summary["conn_late"],
            transitions=transitions_between(metrics_before, metrics_after),
            new_sessions=sessions_after - sessions_before,
            backends=backends,
            pool=pool,
            cpu_seconds=data["cpu_seconds"],
            settle_seconds=waited,
            p99_all=summary["p99_all"],
            last_ok=summary["last_ok"],
            by_kind=summary["by_kind"],
            lag_p50=summary["lag_p50"],
            lag_p99=summary["lag_p99"],
            core_share=data["sending_cpu_seconds"] / max(1e-9, data["sending_seconds"]),
            generator_cpus=tuple(data["cpus"]),
        )
        self.echo(one_line(result) + (f"; {sampler.text()}" if sampler.text() else ""))
        return result

    def capacity(self, service: str, url: str, mix: str, start: float, bisections: int) -> tuple[float, list[StepResult]]:
        """The highest rate served (p99 < 100 ms): doubling from *start* until a step fails, then bisecting.

        0 when not even MIN_RATE is served.

        A failed step is run once more before it counts: on this shared machine one slow second (another
        process, a checkpoint) fails a short step at a rate the service serves."""
        steps: list[StepResult] = []

        def served(rate: float) -> bool:
            for _ in range(2):
                steps.append(self.run(service, url, mix, rate, "ramp"))
                if steps[-1].serves:
                    return True
            return False

        good, bad, rate = 0.0, 0.0, start
        while not bad:  # up by doubling
            if served(rate):
                good, rate = rate, rate * 2
            else:
                bad = rate
        while not good and rate >= 2 * MIN_RATE:  # or down by halving, when the first rate already failed
            rate /= 2
            if served(rate):
                good = rate
            else:
                bad = rate
        for _ in range(bisections if good else 0):
            rate = round((good + bad) / 2)
            if served(rate):
                good = rate
            else:
                bad = rate
        return good, steps


def one_line(step: StepResult) -> str:
    c = step.counts
    moved = "-" if step.transitions is None else (sum(step.transitions.values()) if step.transitions else 0)
    return (
        f"  [{step.service} {step.mix} {step.label}] {step.rate:.0f}/s: goodput {step.goodput:.0f}/s, "
        f"p99 all {step.p99_all:.0f} ms, admitted p50/p99 {step.p50:.0f}/{step.p99:.0f} ms, 2xx {c['ok']} shed {c['shed']} "
        f"503 {c['other503']} 5xx {c['other5xx']} timeout {c['timeout']} error {c['error']}, "
        f"breaker moves {moved}, new sessions {step.new_sessions}, late: loop {step.loop_late:.1%} conn {step.conn_late:.1%}; "
        f"generator CPU {step.cpu_seconds:.2f} s ({step.core_share:.0%} of its core while sending), "
        f"lag p50/p99 {step.lag_p50:.1f}/{step.lag_p99:.1f} ms"
    )
