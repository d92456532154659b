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

from bench.chaoskit.audit import audit_database
from bench.chaoskit.backlog import Backlog
from bench.chaoskit.config import ROOT
from bench.chaoskit.faults import FaultTimeline
from bench.chaoskit.figures import outage_timings
from bench.chaoskit.helpers import now
from bench.chaoskit.processes import ENTRY_POINT, die_with_parent
from bench.chaoskit.progress import Progress
from bench.chaoskit.results import ModeResult
from bench.chaoskit.urls import pg_url


class ModeRun(FaultTimeline):
    """One mode, start to end: run() sets the stage up, plays load and timeline, waits for the drain, audits."""

    def run(self) -> ModeResult:
        with contextlib.ExitStack() as stack:
            self._set_up(stack)
            return self._play()
        raise AssertionError("unreachable")

    def _play(self) -> ModeResult:
        config = self.config
        records_path = self.out_dir / f"records-{self.mode}.json"
        cfg = {
            "urls": [web.url for web in self.webs],
            "headers": self.auth,
            "t0": now() + 1.0,
            "duration": self.duration,
            "writes": self.writes_rate,
            "reads": self.reads_rate,
            "users": self.scenario.users,
            "hot": self.scenario.hot,
            "seed": config.seed,
            "run_id": self.tag,
            "timeout": config.client_timeout,
            "max_inflight": 512,
            "records": str(records_path),
        }
        self.t0 = float(cfg["t0"])  # type: ignore[arg-type]
        load_before = os.getloadavg()[0]
        wall_t0 = dt.datetime.now() + dt.timedelta(seconds=self.t0 - now())
        config.echo(f"[{self.mode}] load starts at {wall_t0.strftime('%H:%M:%S.%f')[:-3]} (t = 0 in the logs' local time)")
        cfg_path = self.out_dir / f"load-{self.mode}.json"
        cfg_path.write_text(json.dumps(cfg))
        child = subprocess.Popen(
            [sys.executable, str(ENTRY_POINT), "--load-child", str(cfg_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
            text=True,
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
            self._stop.set()
            timeline.join(timeout=60)
            drained_after = self._wait_for_drain()
        finally:
            self._stop.set()
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
            reader.join(timeout=5)
            if self.backlog is not None:
                self.backlog.stop()
            timeline.join(timeout=30)
        data = json.loads(records_path.read_text())
        audit = audit_database(self.base_db, self.dbname, self.mode, data["writes"], data["requests"])
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
        )
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
