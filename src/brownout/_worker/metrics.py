"""The worker dyno's metrics: counted in every Dramatiq process, served by one forked process.

Dramatiq's own Prometheus middleware reads its settings and makes folders at
import time and counts in milliseconds; this one is built from Settings at the
entry point. Worker processes write their values to `PROMETHEUS_MULTIPROC_DIR`
(set by `brownout worker` before anything imports prometheus_client); the
process Dramatiq forks for `forks` serves them all on `BROWNOUT_METRICS_PORT`.
"""

from __future__ import annotations

import logging
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from brownout._observability.metrics import Metrics, multiprocess_dir, render
from brownout._worker.drain import AdaptiveDrain

log = logging.getLogger(__name__)

PORT_VARIABLE = "BROWNOUT_METRICS_PORT"


class WorkerMetrics(Middleware):
    """Outcome counts and apply times come from the actor's `observe` hook; this adds the exposition."""

    def __init__(self, metrics: Metrics, *, drain: AdaptiveDrain | None = None, port: int = 9191) -> None:
        self.metrics = metrics
        self.drain = drain
        os.environ.setdefault(PORT_VARIABLE, str(port))  # read by the forked exposition process

    @property
    def forks(self) -> list[Any]:
        if multiprocess_dir() is None:
            log.warning("worker metrics are not served: start the worker with `brownout worker`")
            return []
        return [serve_metrics]

    def observe(self, outcome: str, seconds: float) -> None:
        self.metrics.worker_messages.labels(outcome).inc()
        self.metrics.worker_apply_duration.observe(seconds)
        if self.drain is not None:
            self.metrics.worker_concurrency.set(self.drain.limiter.limit)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.metrics.mark_process_dead()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        body, content_type = render(Metrics())
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve_metrics() -> int:
    """Run by Dramatiq in a forked process: serve every worker process's metrics until stopped."""
    port = int(os.environ.get(PORT_VARIABLE, "9191"))
    server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)  # noqa: S104 - the container's metrics port, scraped from outside it
    log.info("worker metrics on :%d/metrics", port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
