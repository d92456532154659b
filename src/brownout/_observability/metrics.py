"""Prometheus metrics: one `Metrics` per process, attached at the entry points.

Everything is a listener or a hook: the breaker's listener, the database
layer's `CallObserver`, the health monitor's `on_result`, the read and write
paths' hooks. Names start with `brownout_`, units are base units, labels are
bounded (a kind, an outcome, a route template: never an id).

Several processes (uvicorn `--workers`, Dramatiq `--processes`) each count
on their own; with `PROMETHEUS_MULTIPROC_DIR` set (the launchers
`brownout web` and `brownout worker` do it before anything imports
prometheus_client), prometheus_client's multiprocess mode writes every
process's values to files there and `render()` sums them. Gauges say how
(`multiprocess_mode`): the worst breaker state of any live process, pool
connections summed over live processes, the most recent queue depth.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from brownout._db import BreakerListener, BreakerState, CallObserver, CircuitBreaker, ErrorKind, Resilience
from brownout._fleet.read_only import METRIC_STATES

STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric Brownout exports, registered on *registry* (a test's own, or a private one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.db_call_duration = Histogram(
            "brownout_db_call_duration_seconds",
            "Time of each database attempt (retries are attempts of their own).",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.db_calls = Counter("brownout_db_calls_total", "Database attempts that reached the database.", registry=r)
        self.db_errors = Counter("brownout_db_errors_total", "Failed database attempts, by kind.", ["kind"], registry=r)
        self.db_refused = Counter(
            "brownout_db_refused_total", "Calls the open breaker refused (they never reached the database).", registry=r
        )
        self.db_retries = Counter("brownout_db_retries_total", "Retries of transient failures, by kind.", ["kind"], registry=r)
        self.breaker_state = Gauge(
            "brownout_breaker_state",
            "Breaker state: 0 closed, 1 half_open, 2 open (the worst of the live processes).",
            ["breaker"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.redis_errors = Counter(
            "brownout_redis_errors_total",
            "Redis calls that failed, by kind (connection, timeout, out_of_memory, read_only, other; loop_late: the "
            "event loop ran the deadline late, no verdict on Redis); each is a degraded answer.",
            ["kind"],
            registry=r,
        )
        self.publisher_restarts = Counter(
            "brownout_publisher_restarts_total",
            "Times a web process found its RabbitMQ publisher's I/O thread dead and started a new one.",
            registry=r,
        )
        self.breaker_transitions = Counter(
            "brownout_breaker_transitions_total", "Breaker transitions, by new state.", ["breaker", "to"], registry=r
        )
        self.pool_connections = Gauge(
            "brownout_pool_connections",
            "Pool connections: size, checked_out, overflow (summed over live processes).",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_max_overflow = Gauge(
            "brownout_pool_max_overflow",
            "Connections the pool may open above its size (summed over live processes): with size, the pool's maximum.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.health_up = Gauge(
            "brownout_health_check_up",
            "1 when the last SELECT 1 health check passed (the worst of the live processes).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.health_duration = Histogram(
            "brownout_health_check_duration_seconds", "Time of each health check.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.dispatch = Counter(
            "brownout_dispatch_total", "Writes by outcome: applied, queued, rejected.", ["outcome"], registry=r
        )
        self.queue_messages = Gauge(
            "brownout_queue_messages",
            "Messages waiting in the command queue (read at scrape time).",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.delay_queue_messages = Gauge(
            "brownout_delay_queue_messages",
            "Deferred writes waiting in the delay queue (read at scrape time); same maximum length as the queue.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.queue_max_length = Gauge(
            "brownout_queue_max_length", "The command queue's maximum length.", registry=r, multiprocess_mode="max"
        )
        self.dead_letters = Gauge(
            "brownout_dead_letters", "Dead letters not yet replayed.", registry=r, multiprocess_mode="mostrecent"
        )
        self.emails = Counter(
            "brownout_emails_total",
            "Attempts to send an outbox email, by backend (smtp, resend, postmark) and outcome: sent, failed_transient, "
            "rate_limited, rejected (dead-lettered), bad_credentials (key, account or sender refused: the emails wait).",
            ["backend", "outcome"],
            registry=r,
        )
        self.outbox_oldest_unsent_age = Gauge(
            "brownout_outbox_oldest_unsent_age_seconds",
            "Age of the oldest outbox email neither sent nor dead-lettered (of the last 7 days, which the relay "
            "still publishes); 0: none. Read by the worker's relay every 15 s.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.worker_messages = Counter(
            "brownout_worker_messages_total",
            "Queued writes handled by the worker, by outcome: applied, superseded, duplicate, deferred, dead_lettered, "
            "rejected (to Q.XQ), held.",
            ["outcome"],
            registry=r,
        )
        self.worker_apply_duration = Histogram(
            "brownout_worker_apply_duration_seconds",
            "Time to apply the batch a queued write was in (observed once per write).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_batch_size = Histogram(
            "brownout_worker_batch_size",
            "Queued writes per batch the worker applied in one transaction (full batches: a backlog is draining).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.worker_concurrency = Gauge(
            "brownout_worker_concurrency",
            "Batches of queued writes the adaptive drain lets run at once (summed over live processes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.breaker_shared = Gauge(
            "brownout_breaker_shared",
            "1 while the breaker's state is the fleet's (shared through Redis), 0 while local (the worst process).",
            ["breaker"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.breaker_remote_transitions = Counter(
            "brownout_breaker_remote_transitions_total",
            "Transitions this process learnt from another process of the fleet.",
            ["breaker"],
            registry=r,
        )
        self.retries_denied = Counter(
            "brownout_retries_denied_total", "Transient failures not retried because the retry budget was spent.", registry=r
        )
        self.retry_budget_used = Gauge(
            "brownout_retry_budget_used_ratio",
            "Retries over retries allowed in the budget's window (1: spent; the highest live process).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache_reads = Counter(
            "brownout_cache_reads_total", "Reads by how they were served: hit, miss, stale, bypass.", ["result"], registry=r
        )
        self.pool_wait = Histogram(
            "brownout_db_pool_wait_seconds",
            "Time a database call waited for a connection from this process's pool (part of the call's time).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.admission_shed = Counter(
            "brownout_admission_shed_total",
            "Requests past the admission limit, by route criticality and outcome (refused: 503; cache_only: "
            "answered from the cache with no database work).",
            ["criticality", "outcome"],
            registry=r,
        )
        self.admission_limit = Gauge(
            "brownout_admission_limit",
            "Requests each process admits at once (summed over live processes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_in_flight = Gauge(
            "brownout_admission_in_flight",
            "Requests admitted and not yet answered (summed over live processes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_latency = Gauge(
            "brownout_admission_latency_seconds",
            "Median time in the process of the requests of the last 100 ms judged by admission control (the "
            "highest live process).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.event_loop_lag = Gauge(
            "brownout_event_loop_lag_seconds",
            "Smallest event-loop delay of the last interval (the process's own queueing; the highest live process).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.http_requests = Counter(
            "brownout_http_requests_total",
            "HTTP requests, by method, route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "brownout_http_request_duration_seconds",
            "HTTP request time at the server, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        mode_help = (
            "Write mode: read-write, read-only (the operator's POST /admin/mode or BROWNOUT_READ_ONLY), "
            "read-only-automatic (neither the database nor the queue can take a write)."
        )
        self.mode = Enum("brownout_mode", mode_help, states=list(METRIC_STATES), registry=r)
        # prometheus_client's Enum keeps its value in process memory, which multiprocess mode never reads: there
        # the same series (`brownout_mode{brownout_mode="read-only"} 1`) come from a gauge written to the
        # multiprocess files, each state 1 while any live process is in it.
        self._mode_files = (
            Gauge("brownout_mode", mode_help, ["brownout_mode"], registry=None, multiprocess_mode="livemax")
            if multiprocess_dir()
            else None
        )

    # -- hooks ----------------------------------------------------------------

    def attach_breaker(self, breaker: CircuitBreaker) -> None:
        listener = BreakerMetrics(self)
        breaker.add_listener(listener)
        self.breaker_state.labels(breaker.name).set(STATE_VALUES[breaker.state])
        self.breaker_shared.labels(breaker.name).set(1 if getattr(breaker, "shared", False) else 0)

    def attach_resilience(self, resilience: Resilience) -> None:
        """The breaker's listener and the call observer of one Database."""
        resilience.observers.append(DbCallMetrics(self))
        self.attach_breaker(resilience.breaker)

    def observe_budget(self, resilience: Resilience) -> None:
        if resilience.budget is not None:
            self.retry_budget_used.set(resilience.budget.used())

    def observe_health(self, result: dict[str, Any]) -> None:
        self.health_up.set(1 if result["healthy"] else 0)
        self.health_duration.observe(float(result["latency_ms"]) / 1000)
        pool = result.get("pool") or {}
        self.observe_pool(pool)

    def observe_pool(self, pool: dict[str, int]) -> None:
        for state in ("size", "checked_out", "overflow"):
            if state in pool:
                self.pool_connections.labels(state).set(pool[state])
        if "max_overflow" in pool:
            self.pool_max_overflow.set(pool["max_overflow"])

    def observe_mode(self, state: str) -> None:
        """This process's write mode, one of METRIC_STATES."""
        self.mode.state(state)
        if self._mode_files is not None:
            for each in METRIC_STATES:
                self._mode_files.labels(each).set(1 if each == state else 0)

    def mark_process_dead(self) -> None:
        """At process exit: live gauges stop counting this process."""
        directory = multiprocess_dir()
        if directory:
            multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]


class BreakerMetrics(BreakerListener):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        self._metrics.breaker_state.labels(breaker.name).set(STATE_VALUES[new])
        self._metrics.breaker_transitions.labels(breaker.name, new.value).inc()
        if getattr(breaker, "last_transition_remote", False):
            self._metrics.breaker_remote_transitions.labels(breaker.name).inc()

    def on_mode(self, breaker: CircuitBreaker, shared: bool) -> None:
        self._metrics.breaker_shared.labels(breaker.name).set(1 if shared else 0)

    def on_rejected(self, breaker: CircuitBreaker) -> None:
        self._metrics.db_refused.inc()


class DbCallMetrics(CallObserver):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._ok = metrics.db_call_duration.labels("ok")
        self._error = metrics.db_call_duration.labels("error")

    def on_attempt(self, seconds: float, kind: ErrorKind | None) -> None:
        self._metrics.db_calls.inc()
        if kind is None:
            self._ok.observe(seconds)
        else:
            self._error.observe(seconds)
            self._metrics.db_errors.labels(kind.value).inc()

    def on_retry(self, kind: ErrorKind, wait: float) -> None:
        self._metrics.db_retries.labels(kind.value).inc()

    def on_retry_denied(self, kind: ErrorKind) -> None:
        self._metrics.retries_denied.inc()


def render(metrics: Metrics) -> tuple[bytes, str]:
    """The exposition text: every process's values in multiprocess mode, else this process's."""
    directory = multiprocess_dir()
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST


def metric_names() -> set[str]:
    """The names this code exports (for the dashboard and alert rule checks)."""
    return {metric.name if metric.type != "counter" else metric.name + "_total" for metric in Metrics().registry.collect()}
