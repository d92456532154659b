"""One mode's run: set up, load and faults together, drain, audit; torn down whatever happens."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.chaoskit.audit import audit_database
from bench.chaoskit.backlog import Backlog
from bench.chaoskit.calibrate import RAMP_FACTOR, RAMP_START, STEP_SECONDS, STOP, Calibration, ramp
from bench.chaoskit.config import ROOT
from bench.chaoskit.faults import FaultTimeline
from bench.chaoskit.figures import outage_timings
from bench.chaoskit.helpers import now
from bench.chaoskit.monitor import Monitor, usage_between
from bench.chaoskit.processes import ENTRY_POINT, die_with_parent
from bench.chaoskit.progress import Progress
from bench.chaoskit.results import ModeResult
from bench.chaoskit.urls import pg_url, port_of

SETTLE_SECONDS = 3.0


def monitor_usage(monitor: Monitor) -> dict[str, Any]:
    """The warm-up's and the whole run's usage (usage_between), for the marks that were taken."""
    marks = monitor.marks
    usage = {}
    if "start" in marks and "warm-up" in marks:
        usage["warm-up"] = usage_between(marks["start"], marks["warm-up"])
    if "start" in marks and "end" in marks:
        usage["whole run"] = usage_between(marks["start"], marks["end"])
    return usage


class ModeRun(FaultTimeline):
    """One mode, start to end: run() sets the stage up, plays load and timeline, waits for the drain, audits."""

    def run(self) -> ModeResult:
        with contextlib.ExitStack() as stack:
            self._set_up(stack)
            return self._play()
        raise AssertionError("unreachable")

    def _load_cfg(self, records: Path, run_id: str, steps: list[list[float]]) -> dict[str, Any]:
        return {
            "urls": [web.url for web in self.webs],
            "headers": self.auth,
            "steps": steps,
            "users": self.scenario.users,
            "hot": self.scenario.hot,
            "seed": self.config.seed,
            "run_id": run_id,
            "timeout": self.config.client_timeout,
            "max_inflight": 512,
            "records": str(records),
        }

    def _start_load(self, cfg: dict[str, Any], name: str) -> tuple[subprocess.Popen[str], float]:
        """The load child and its t0 (monotonic, the first line it writes)."""
        cfg_path = self.out_dir / f"load-{name}.json"
        cfg_path.write_text(json.dumps(cfg))
        child = subprocess.Popen(
            [sys.executable, str(ENTRY_POINT), "--load-child", str(cfg_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
            text=True,
        )
        assert child.stdout is not None
        try:
            return child, float(json.loads(child.stdout.readline())["t0"])
        except (ValueError, KeyError):
            child.kill()
            child.wait(timeout=10)
            raise RuntimeError(f"the load generator ({name}) did not start") from None

    def _calibrate(self) -> Calibration:
        """The stepped ramp (calibrate.py) against this stage; sets the timeline's rates from it."""
        share = self.writes_rate / (self.writes_rate + self.reads_rate)
        records = self.out_dir / f"records-calibration-{self.mode}.json"
        cfg = self._load_cfg(records, f"{self.tag}c", ramp(share)) | {"stop": STOP}
        self.config.echo(
            f"[{self.mode}] calibration: a ramp from {RAMP_START:g} requests/s, x{RAMP_FACTOR:g} every {STEP_SECONDS:g} s"
        )
        child, _ = self._start_load(cfg, f"calibration-{self.mode}")
        bound = (len(cfg["steps"]) + 1) * (STEP_SECONDS + self.config.client_timeout + 2) + STOP["warmup_seconds"] + 30
        watchdog = threading.Timer(bound, child.kill)
        watchdog.start()
        try:
            assert child.stdout is not None
            for line in child.stdout:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    step = json.loads(line)["step"]
                    rate = step["writes"] + step["reads"]
                    self.config.echo(
                        f"[{self.mode}] calibration: {rate:.0f} requests/s, p99 {step['p99_ms']:.1f} ms, {step['late']} late, "
                        f"{step['errors']} errors: {'passed' if step['ok'] else 'failed'}"
                    )
            child.wait(timeout=10)
        finally:
            watchdog.cancel()
        if child.returncode != 0:
            raise RuntimeError(f"the calibration's load generator exited with {child.returncode}")
        data = json.loads(records.read_text())
        self.calibration_writes = data["writes"]
        calibration = Calibration(data["steps"], self.config.load_fraction or 0.5, share)
        self.writes_rate, self.reads_rate = calibration.rates()
        self.config.echo(f"[{self.mode}] calibration: {calibration.describe()}")
        time.sleep(SETTLE_SECONDS)  # the last step's backlog and connections settle before the warm-up
        return calibration

    def _play(self) -> ModeResult:
        config = self.config
        calibration = self._calibrate() if self.calibrate else None
        records_path = self.out_dir / f"records-{self.mode}.json"
        cfg = self._load_cfg(records_path, self.tag, [[self.duration, self.writes_rate, self.reads_rate]])
        load_before = os.getloadavg()[0]
        monitor = Monitor(stage=self, redis_port=port_of(self.base_redis, 6379))
        monitor.mark("start")  # half a second before t0: the load's start-up is in the figures
        child, self.t0 = self._start_load(cfg, self.mode)
        monitor.generator_pid = child.pid
        # Half a second before the first fault: its first errors must not reach the warm-up's counters.
        monitor.marks_due["warm-up"] = self.t0 + (self.faults[0].start if self.faults else self.duration) - 0.5
        monitor.start()
        wall_t0 = dt.datetime.now() + dt.timedelta(seconds=self.t0 - now())
        config.echo(
            f"[{self.mode}] load ({self.writes_rate:g} writes/s + {self.reads_rate:g} reads/s) starts at "
            f"{wall_t0.strftime('%H:%M:%S.%f')[:-3]} (t = 0 in the logs' local time)"
        )
        reader = threading.Thread(target=self._read_child, args=(child,), name="load-reports", daemon=True)
        reader.start()
        timeline = threading.Thread(target=self._timeline, name="timeline", daemon=True)
        if self.mode == "brownout":
            self.backlog = Backlog(pg_url(self.base_db), self.dbname, self.queue, self.base_rabbit, self.live).start()
        timeline.start()
        hard_stop = self.t0 + self.duration + config.client_timeout + 30
        try:
            with Progress(config.progress, config.echo) as progress:
                while child.poll() is None and now() < hard_stop:
                    self._show(progress)
                    self._run_main_calls(0.25)
                self._show(progress)
            if child.poll() is None:
                raise RuntimeError("the load generator did not stop in time")
            if child.returncode != 0:
                raise RuntimeError(f"the load generator exited with {child.returncode}")
            monitor.mark("end")
            self._stop.set()
            timeline.join(timeout=60)
            drained_after = self._wait_for_drain()
        finally:
            self._stop.set()
            monitor.stop()
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
            reader.join(timeout=5)
            if self.backlog is not None:
                self.backlog.stop()
            timeline.join(timeout=30)
        data = json.loads(records_path.read_text())
        # The calibration's writes went to the same database: audited too (acknowledged ones must be there).
        audit = audit_database(self.base_db, self.dbname, self.mode, self.calibration_writes + data["writes"], data["requests"])
        result = ModeResult(
            mode=self.mode,
            duration=self.duration,
            writes_rate=self.writes_rate,
            reads_rate=self.reads_rate,
            requests=data["requests"],
            writes=data["writes"],
            shed=data["shed"],
            faults=self.records,
            transitions=[(t - self.t0, dyno, old, new) for t, dyno, old, new in self.tracker.transitions],
            backlog=[(t - self.t0, n) for t, n in (self.backlog.samples if self.backlog else [])],
            queue_depth=[(t - self.t0, n) for t, n in (self.backlog.depth if self.backlog else [])],
            audit=audit,
            timings=[],
            drained_after_load=drained_after,
            settings=self.settings,
            load_cpu_seconds=data.get("cpu_seconds", 0.0),
            loadavg=(load_before, os.getloadavg()[0]),
            calibration=calibration,
            calibration_writes=len(self.calibration_writes),
            usage=monitor_usage(monitor),
            sessions=[(t - self.t0, n) for t, n in monitor.sessions],
        )
        for record in self.records:
            if record.kind == "rabbit_node_kill" and "killed_at" in record.details:
                killed_at = record.details["killed_at"]
                acked = [w["td"] for w in data["writes"] if w["status"] == 202 and w["t"] > killed_at]
                record.details["first_ack_after_kill"] = min(acked) - killed_at if acked else None
        result.timings = outage_timings(result)
        return result

    def _read_child(self, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            with contextlib.suppress(ValueError, KeyError):
                self.live.feed(json.loads(line))

    def _show(self, progress: Progress) -> None:
        rate, p99 = self.live.rate_and_p99()
        counts = self.live.counts
        backlog = self.backlog.current if self.backlog is not None else 0
        breaker = self.tracker.summary() if self.mode == "brownout" else "none (naive)"
        progress.show(
            {"mode": self.mode, "t": max(0.0, now() - self.t0), "breaker": breaker, "rate": rate, "p99": p99}
            | counts
            | {"backlog": backlog, "fault": self.current_fault}
        )

    def _wait_for_drain(self) -> float | None:
        """After the load: until nothing acknowledged is left to apply (and the queue is empty); bounded."""
        if self.backlog is None:
            return 0.0
        started = now()
        give_up = started + self.scenario.drain_timeout
        steady = 0
        while now() < give_up:
            if self.backlog.current == 0 and self.backlog.queue_messages == 0 and not self.live.new_queued:
                steady += 1
                if steady >= 8:  # two seconds of nothing left: unacknowledged publishes included
                    return now() - started
            else:
                steady = 0
            time.sleep(0.25)
        return None
