"""The worker dyno's metrics: counted in every Dramatiq process, served by one forked process.

Dramatiq's own Prometheus middleware reads its settings and makes folders at
import time and counts in milliseconds; this one is built from Settings at the
entry point. Worker processes write their values to `PROMETHEUS_MULTIPROC_DIR`
(set by `brownout worker` before anything imports prometheus_client); the
process Dramatiq forks for `forks` serves them all on `BROWNOUT_METRICS_PORT`,
to a service key with the `metrics` scope (as the web's /metrics), so the port
can be reached by Prometheus by name without being open to whoever else can.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from brownout._auth.keys import KeyRing, bearer, parse_keys
from brownout._observability.metrics import Metrics, multiprocess_dir, render
from brownout._settings import load_settings
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
    refusal: Callable[[str | None], tuple[int, str] | None] = staticmethod(lambda authorization: None)
    """(status, detail) for a request that may not read the metrics, None when it may."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?")[0]
        if path == "/health":  # the container's liveness probe: open, says nothing
            self._answer(200, b'{"status":"ok"}', "application/json")
            return
        if path != "/metrics":
            self.send_error(404)
            return
        refused = type(self).refusal(self.headers.get("Authorization"))
        if refused is not None:
            self._refuse(*refused)
            return
        body, content_type = render(Metrics())
        self._answer(200, body, content_type)

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: int, detail: str) -> None:
        challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        self._answer(status, json.dumps({"detail": detail}).encode(), "application/json", challenge)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve_metrics() -> int:
    """Run by Dramatiq in a forked process: serve every worker process's metrics until stopped."""
    port = int(os.environ.get(PORT_VARIABLE, "9191"))
    _Handler.refusal = staticmethod(metrics_refusal(load_settings()))
    server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)  # noqa: S104 - the container's metrics port, scraped from outside it
    log.info("worker metrics on :%d/metrics", port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def metrics_refusal(settings: Any) -> Callable[[str | None], tuple[int, str] | None]:
    """Who may read the worker's metrics: a service key with the `metrics` scope (anyone with BROWNOUT_AUTH=disabled)."""
    if settings.auth == "disabled":
        return lambda authorization: None
    keys = parse_keys(settings.api_keys)
    ring = KeyRing(keys)
    if not any("metrics" in key.scopes for key in keys):
        log.warning("worker metrics: no key in BROWNOUT_API_KEYS has the metrics scope; every scrape is refused")

    def refusal(authorization: str | None) -> tuple[int, str] | None:
        key = ring.find(bearer(authorization))
        if key is None:
            return 401, "credentials required: Authorization: Bearer <service key with the metrics scope>"
        return None if "metrics" in key.scopes else (403, "this credential lacks the metrics scope")

    return refusal
