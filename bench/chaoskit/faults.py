"""The fault timeline, played on the real services from a thread of its own while the load runs."""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable

from bench.chaoskit.config import Fault
from bench.chaoskit.helpers import now, wait_for
from bench.chaoskit.results import FaultRecord
from bench.chaoskit.stage import ModeStage
from bench.chaoskit.urls import admin_connect


class FaultTimeline(ModeStage):
    """Each fault at its time; processes it restarts are started by the main thread (_on_main_thread)."""

    def _run_main_calls(self, wait: float) -> None:
        """Run what the timeline asked of the main thread (starting processes), waiting up to *wait* s for it."""
        try:
            fn, done = self._main_calls.get(timeout=wait)
        except queue.Empty:
            return
        try:
            fn()
        finally:
            done.set()

    def _on_main_thread(self, fn: Callable[[], None], timeout: float = 30.0) -> bool:
        done = threading.Event()
        self._main_calls.put((fn, done))
        return done.wait(timeout)

    def _sleep_until(self, t: float) -> bool:
        """Sleep until t0 + t; False when the run is stopping."""
        while now() < self.t0 + t:
            if self._stop.wait(min(0.05, self.t0 + t - now())):
                return False
        return True

    def _timeline(self) -> None:
        for fault in self.faults:
            if not self._sleep_until(fault.start):
                return
            record = FaultRecord(fault.kind, fault.label, now() - self.t0, fault.end)
            self.records.append(record)
            self.current_fault = fault.label
            try:
                getattr(self, f"_fault_{fault.kind}")(fault, record)  # sets record.end when the fault is undone
            finally:
                self.current_fault = ""

    def _outage(self, service: str, seconds: float, record: FaultRecord, style: str = "refuse") -> bool:
        """Break *service* for *seconds* (proxy, or the operator's commands) and restore it; False if stopping."""
        end = now() - self.t0 + seconds
        if service in self.config.commands:
            self._command(service, up=False)
            record.details["via"] = "command"
            try:
                return self._sleep_until(end)
            finally:
                self._command(service, up=True)
                record.end = now() - self.t0
        proxy = self.proxies.get(service)
        if proxy is None:  # naive mode has no RabbitMQ or Redis: the fault is a no-op there
            record.details["via"] = "not used by this mode"
            try:
                return self._sleep_until(end)
            finally:
                record.end = now() - self.t0
        record.details["via"] = f"proxy {style}"
        if style == "silence":
            proxy.silence()
        else:
            proxy.refuse()
            proxy.reset_existing()
        try:
            return self._sleep_until(end)
        finally:
            proxy.pass_through()
            record.end = now() - self.t0

    def _fault_ssl_kills(self, fault: Fault, record: FaultRecord) -> None:
        killed: list[int] = []
        t = fault.start
        while t < fault.end and self._sleep_until(t):
            killed.append(self._terminate_backends())
            t += fault.every
        record.details["killed_per_round"] = killed
        record.end = max(now() - self.t0, fault.end)

    def _terminate_backends(self) -> int:
        conn = admin_connect(self.base_db, "postgres")
        try:
            with conn.cursor() as cur:  # an sslmode=require admin link, as the seed's error came
                cur.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                    (self.dbname, self.app_name),
                )
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def _fault_db_outage(self, fault: Fault, record: FaultRecord) -> None:
        self._outage("db", fault.duration, record, self.config.outage_style)

    def _fault_rabbit_outage(self, fault: Fault, record: FaultRecord) -> None:
        self._outage("rabbit", fault.duration, record)

    def _fault_redis_outage(self, fault: Fault, record: FaultRecord) -> None:
        self._outage("redis", fault.duration, record)

    def _fault_worker_kill(self, fault: Fault, record: FaultRecord) -> None:
        if not self._outage("db", fault.duration, record, self.config.outage_style):
            return
        if self.worker is None or self.backlog is None:
            record.details["kill"] = "no worker in this mode"
            return
        # Mid-drain: once the worker has applied some of the backlog, and while some is left.
        peak = max(self.backlog.current, 1)
        mid = wait_for(lambda: 0 < self.backlog.current <= 0.85 * peak or self._stop.is_set(), 20, 0.05)  # type: ignore[union-attr]
        if self._stop.is_set():
            return
        record.details |= {"backlog_at_kill": self.backlog.current, "peak_before": peak, "mid_drain": mid}
        record.details["killed_at"] = now() - self.t0
        self.worker.kill(signal.SIGKILL)
        self.worker.process.wait(timeout=10)  # type: ignore[union-attr]
        if not self._sleep_until(now() - self.t0 + 2.0):
            return
        worker = self.worker
        if not self._on_main_thread(lambda: None if worker.start() else None):  # PDEATHSIG follows the starting thread
            return
        record.details["restarted_at"] = now() - self.t0
        record.details["ready_at"] = (now() - self.t0) if self._worker_ready(60) else None
        record.details["worker_alive"] = self.worker.alive
