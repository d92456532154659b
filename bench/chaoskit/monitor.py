"""What the run cost the machine, sampled once a second beside the load.

CPU per process group (cpu.py), the run database's new PostgreSQL sessions (pg_stat_database.sessions) and,
at the marks (load start, end of the warm-up, end), each web process's /metrics (database errors by kind,
breaker transitions) and the 1-minute load average."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

from bench.chaoskit.cpu import CpuGroups, descendants, find_roots
from bench.chaoskit.helpers import now
from bench.chaoskit.urls import admin_connect

SAMPLE = re.compile(
    r"^(brownout_db_errors_total|brownout_breaker_transitions_total|brownout_admission_shed_total)\{([^}]*)\}\s+([0-9.eE+-]+)"
)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(url: str, headers: dict[str, str]) -> dict[str, float] | None:
    """`errors kind`, `transitions breaker to` and `admission criticality outcome` counters from one /metrics,
    or None if it did not answer."""
    request = urllib.request.Request(f"{url}/metrics", headers=headers)  # noqa: S310 - a loopback http URL of the run's own
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - as above
            text = response.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(LABEL.findall(match.group(2)))
        if match.group(1) == "brownout_db_errors_total":
            key = f"errors {labels.get('kind', '?')}"
        elif match.group(1) == "brownout_admission_shed_total":
            key = f"admission {labels.get('criticality', '?')} {labels.get('outcome', '?')}"
        else:
            key = f"transitions {labels.get('breaker', '?')} -> {labels.get('to', '?')}"
        found[key] = found.get(key, 0.0) + float(match.group(3))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Monitor:
    """A thread: samples every second and takes the marks scheduled on the load's clock."""

    def __init__(self, *, stage: Any, redis_port: int) -> None:
        self.stage = stage
        self.marks_due: dict[str, float] = {}  # name -> monotonic time, taken by the thread
        self.marks: dict[str, dict[str, Any]] = {}
        self.sessions: list[tuple[float, int]] = []  # (monotonic, pg_stat_database.sessions)
        self.generator_pid: int | None = None
        harness = os.getpid()
        groups: dict[str, Callable[[Any], set[int]]] = {}
        for web in stage.webs:
            groups[web.name] = lambda table, web=web: {web.process.pid} if web.process else set()
        if stage.worker is not None:
            groups["worker"] = lambda table: {stage.worker.process.pid} if stage.worker.process else set()
        groups["generator"] = lambda table: {self.generator_pid} if self.generator_pid else set()
        groups["proxies"] = lambda table: {stage.hub.pid} if stage.hub else set()
        groups["PostgreSQL"] = lambda table: find_roots(table, "postgres")
        # With the memory alarm in the timeline the run's broker is a node of its own (stage.py), else the machine's.
        groups["RabbitMQ, the machine's (beam.smp)"] = lambda table: find_roots(table, "beam.smp", outside=harness)
        groups["RabbitMQ, the run's own node"] = lambda table: find_roots(table, "beam.smp") & descendants(table, {harness})
        groups["Redis"] = lambda table: {pid for pid in find_roots(table, "redis-server") if f":{redis_port}" in _cmdline(pid)}
        self.cpu = CpuGroups(groups)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._conn: Any = None

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            for name, due in list(self.marks_due.items()):
                if now() >= due:
                    del self.marks_due[name]
                    self.mark(name)
            wake = min([now() + 1.0, *self.marks_due.values()])  # a mark on time, not up to a second late
            self._stop.wait(max(0.0, wake - now()))

    def _sample(self) -> None:
        self.cpu.sample()
        sessions = self._sessions()
        if sessions is not None:
            self.sessions.append((now(), sessions))

    def _sessions(self) -> int | None:
        try:
            if self._conn is None:
                self._conn = admin_connect(self.stage.base_db, "postgres")
            with self._conn.cursor() as cur:
                cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.stage.dbname,))
                row = cur.fetchone()
            return int(row[0]) if row and row[0] is not None else None
        except Exception:  # noqa: BLE001 - a missed sample, the link rebuilt next time
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
            return None

    def mark(self, name: str) -> dict[str, Any]:
        """A snapshot: CPU per group (and the harness's own), sessions, each web's counters, load average."""
        totals = self.cpu.sample()
        times = os.times()
        snapshot = {
            "t": now(),
            "cpu": totals | {"harness": times.user + times.system},
            "sessions": self._sessions(),
            "metrics": {web.name: scrape(web.url, self.stage.auth) for web in self.stage.webs},
            "loadavg": os.getloadavg()[0],
        }
        self.marks[name] = snapshot
        return snapshot


def usage_between(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds and % of one core per group, new sessions, counter deltas, from one mark to another."""
    wall = max(1e-9, last["t"] - first["t"])
    cpu = {name: last["cpu"][name] - first["cpu"].get(name, 0.0) for name in last["cpu"]}
    sessions = None
    if first["sessions"] is not None and last["sessions"] is not None:
        sessions = last["sessions"] - first["sessions"]
    counters: dict[str, float] = {}
    for web, values in last["metrics"].items():
        before = first["metrics"].get(web) or {}
        for key, value in (values or {}).items():
            counters[key] = counters.get(key, 0.0) + value - before.get(key, 0.0)
    return {
        "wall": wall,
        "cpu": {name: (seconds, 100 * seconds / wall) for name, seconds in cpu.items()},
        "sessions": sessions,
        "sessions_per_s": None if sessions is None else sessions / wall,
        "counters": {key: value for key, value in sorted(counters.items()) if value},
        "loadavg": (first["loadavg"], last["loadavg"]),
        "scraped": all(v is not None for v in last["metrics"].values()),
    }
