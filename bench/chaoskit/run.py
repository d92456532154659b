"""run_chaos: the timeline fitted to the duration, each mode run in turn, the summary and the plot written."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from bench.chaoskit.config import FIXED_SETTINGS, ROOT, RUN_SETTINGS, SCENARIOS, ChaosConfig, Fault
from bench.chaoskit.mode_run import ModeRun
from bench.chaoskit.plot import plot
from bench.chaoskit.report import report_markdown
from bench.chaoskit.results import ModeResult


@dataclasses.dataclass
class ChaosResult:
    modes: dict[str, ModeResult]
    markdown: str
    out_dir: Path
    png: Path | None
    faults: list[Fault]

    @property
    def brownout(self) -> ModeResult:
        return self.modes["brownout"]


def run_chaos(config: ChaosConfig) -> ChaosResult:
    scenario = SCENARIOS[config.scenario]
    faults, natural = scenario.timeline(outage=config.outage, only=config.faults, rabbit_nodes=config.rabbit_nodes)
    duration = config.duration if config.duration is not None else natural
    kept = [f for f in faults if f.end + (8 if f.kind == "worker_kill" else 2) <= duration]
    for dropped in faults[len(kept) :]:
        config.echo(f"chaos: {dropped.label} at {dropped.start:g} s does not fit in {duration:g} s: left out")
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out_dir = config.out_dir or ROOT / "bench" / "out" / f"chaos-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    config.echo(
        f"chaos: scenario {config.scenario}, {duration:g} s per mode, modes {', '.join(config.modes)}; timeline: "
        + "; ".join(f"{f.start:g}-{f.end:g} s {f.label}" for f in kept)
    )
    if not config.default_settings:
        config.echo("chaos: run settings " + " ".join(f"{k}={v}" for k, v in (RUN_SETTINGS | FIXED_SETTINGS).items()))
    results: dict[str, ModeResult] = {}
    calibrate = bool(config.load_fraction) and config.writes is None and config.reads is None
    for mode in config.modes:
        run = ModeRun(config, mode, out_dir, kept, duration)
        if results:  # the first mode's calibration sets the rates of every mode: the same load, compared
            first = next(iter(results.values()))
            run.writes_rate, run.reads_rate = first.writes_rate, first.reads_rate
        else:
            run.calibrate = calibrate
        results[mode] = run.run()
    markdown = report_markdown(results, config, started)
    (out_dir / "summary.md").write_text(markdown)
    png = plot(results, out_dir / "chaos.png") if config.plot else None
    return ChaosResult(modes=results, markdown=markdown, out_dir=out_dir, png=png, faults=kept)
