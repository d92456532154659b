"""The fault timeline, played on the real services from a thread of its own while the load runs."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

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
            with conn.cursor() as cur:  # an sslmode=require admin link, as the SSL error comes
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

    def _fault_rabbit_node_kill(self, fault: Fault, record: FaultRecord) -> None:
        """A database outage (every write queued) with the node leading the command queue SIGKILLed 2 s in and
        started again on its data 2 s before the outage ends (it rejoins the cluster by itself)."""
        cluster = self.cluster
        if cluster is None:
            record.details["kill"] = "no RabbitMQ cluster in this mode"
            self._outage("db", fault.duration, record, self.config.outage_style)
            return
        killer = threading.Thread(target=self._kill_leader, args=(fault, record), name="node-kill", daemon=True)
        killer.start()
        self._outage("db", fault.duration, record, self.config.outage_style)
        killer.join(timeout=150)

    def _kill_leader(self, fault: Fault, record: FaultRecord) -> None:
        cluster = self.cluster
        assert cluster is not None  # noqa: S101 - narrows the type: the fault checked it
        if not self._sleep_until(fault.start + 2.0):
            return
        node = cluster.leader(self.queue)
        node.kill()
        record.details |= {"node": node.node, "killed_at": now() - self.t0}
        if not self._sleep_until(max(fault.end - 2.0, now() - self.t0 + 1.0)):
            return  # the run is stopping: the cluster is stopped with it
        node.launch()
        node.wait_ready()
        record.details["back_at"] = now() - self.t0
        with contextlib.suppress(Exception):
            record.details["leader_after"] = cluster.leader(self.queue).node

    @staticmethod
    def _queued_applied(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM applied_commands WHERE path = 'queued'")
            return int(cur.fetchone()[0])

    def _fault_rabbit_alarm(self, fault: Fault, record: FaultRecord) -> None:
        """A memory alarm: RabbitMQ blocks every publishing connection (consumers go on) until it clears."""
        node = self.alarm_node
        end = now() - self.t0 + fault.duration
        if node is None:
            record.details["via"] = "not played (no RabbitMQ node of the run's own)"
            self._sleep_until(end)
            record.end = now() - self.t0
            return
        record.details["via"] = "rabbitmqctl set_vm_memory_high_watermark 0 on the run's own node"
        node.ctl("set_vm_memory_high_watermark", "0")
        try:
            self._sleep_until(end)
        finally:
            node.ctl("set_vm_memory_high_watermark", "0.4")
            record.end = now() - self.t0

    def _fault_publisher_kill(self, fault: Fault, record: FaultRecord) -> None:
        """Each web dyno's publisher I/O thread dies (bench/chaoskit/inject/sitecustomize.py); it must be restarted."""
        if self.mode != "brownout":
            record.details["via"] = "not used by this mode"
            record.end = now() - self.t0
            return
        before = {web.name: self._publisher_restarts(web.url) for web in self.webs}
        for web in self.webs:
            if web.alive and web.process is not None:
                os.kill(web.process.pid, signal.SIGUSR2)  # the uvicorn process itself (one per replica)
        record.details["via"] = "SIGUSR2 to each web dyno"
        restarted = {
            web.name: wait_for(lambda web=web: (self._publisher_restarts(web.url) or 0) > (before[web.name] or 0), 15, 0.2)
            for web in self.webs
        }
        record.details["restarted"] = restarted
        record.details["restarts"] = {web.name: self._publisher_restarts(web.url) for web in self.webs}
        record.end = now() - self.t0

    def _publisher_restarts(self, url: str) -> int | None:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/ready", headers=self.auth), timeout=2) as answer:  # noqa: S310 - the http:// URL of a dyno this run started
                body = json.load(answer)
        except urllib.error.HTTPError as error:  # 503 while not ready: the body still says
            body = json.load(error)
        except (OSError, ValueError):
            return None
        return int(body["rabbitmq"]["publisher_restarts"])

    def _fault_redis_outage(self, fault: Fault, record: FaultRecord) -> None:
        self._outage("redis", fault.duration, record)

    def _fault_worker_kill(self, fault: Fault, record: FaultRecord) -> None:
        if not self._outage("db", fault.duration, record, self.config.outage_style):
            return
        if self.worker is None or self.backlog is None:
            record.details["kill"] = "no worker in this mode"
            return
        # Mid-drain: once the worker has committed its first queued writes, while some are left. Watched on a
        # connection of its own every 10 ms: the batched worker drains a few hundred writes in a fraction of a
        # second, between two of the backlog's samples (0.25 s).
        peak = max(self.backlog.current, 1)
        conn = admin_connect(self.base_db, self.dbname)
        try:
            applied_before = self._queued_applied(conn)
            started = wait_for(lambda: self._queued_applied(conn) > applied_before or self._stop.is_set(), 20, 0.01)
            applied = self._queued_applied(conn) - applied_before
        finally:
            conn.close()
        if self._stop.is_set():
            return
        mid = started and 0 < applied < peak
        record.details |= {"backlog_at_kill": peak - applied, "peak_before": peak, "mid_drain": mid}
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
