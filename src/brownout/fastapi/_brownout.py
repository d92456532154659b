"""`Brownout`: everything one web process holds, built once when the app starts and closed when it stops.

A service's own pieces (its read and write paths) are built by its own
lifespan, which runs inside Brownout's: they find the database, dispatcher,
cache ready on `app.state.brownout`, and are closed
before them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from brownout._admission import AdmissionControl, AdmissionSettings, Criticality
from brownout._cache.read_cache import ReadCache
from brownout._cache.redis_link import RedisLink, build_redis_link
from brownout._cache.stale_reads import StaleReads
from brownout._db import BreakerState, CircuitOpenError, Database, DeadlineExceeded, HealthMonitor, execute_with_retry
from brownout._db.engine import DeadlineQueuePool
from brownout._db.health_check import pool_figures
from brownout._dispatch.commands import Registry
from brownout._dispatch.dead_letters import count_unreplayed
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.queue_depth import QueueDepth
from brownout._fleet.assembly import build_database, build_monitor, stop_breaker
from brownout._fleet.breaker_override import BreakerOverride
from brownout._fleet.override_record import OverrideRecord
from brownout._fleet.read_only import WriteMode
from brownout._observability.logs import DegradedModeLog, configure_logging
from brownout._observability.metrics import Metrics
from brownout._observability.sentry import init_sentry
from brownout._settings import Settings
from brownout.fastapi._admission import AdmissionGate, CriticalityTable, lag_probe
from brownout.fastapi._auth import Authenticator
from brownout.fastapi._body_limit import BodyLimit
from brownout.fastapi._fast_reads import CachedRoute, CachedRoutes, FastReads
from brownout.fastapi._http_metrics import HttpMetrics
from brownout.fastapi._request_limits import RequestLimits

log = logging.getLogger(__name__)

DEAD_LETTER_REFRESH_SECONDS = 15.0

T = TypeVar("T")


class NotStarted(RuntimeError):
    """A piece was asked for before the app's lifespan started Brownout (or after it stopped)."""


class Brownout:
    """The database with its breaker, the dispatcher, the Redis link and cache, the health monitor.

    Nothing connects until `start()` (which the lifespan calls on a worker thread: building
    the pieces does blocking I/O); `close()` stops them in reverse order, each step on its own
    so one failing does not leave the rest running."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """*registry*: the commands this service writes; *clock*: the wall clock of the cache's ages
        (tests age entries with a clock of their own)."""
        self.settings = settings
        self.authenticator = Authenticator(settings)
        self.authenticator.check()  # no credential configured: refuse now, with one line, not on the first request
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.link: RedisLink | None = None
        self.cache: ReadCache | None = None
        self.override: BreakerOverride | None = None
        self.mode_override: OverrideRecord | None = None
        """The fleet's read-only mode record (`POST /admin/mode`); None without REDIS_URL."""
        self.queue_depth: QueueDepth | None = None
        self._database: Database | None = None
        self._dispatcher: Dispatcher | None = None
        self._monitor: HealthMonitor | None = None
        self._reads: StaleReads | None = None
        self._write_mode: WriteMode | None = None
        self._dead_letters_read_at = -1e9
        self.admission: AdmissionControl | None = None
        if settings.admission:
            self.admission = AdmissionControl(
                AdmissionSettings(
                    min_limit=settings.admission_min_in_flight,
                    max_limit=settings.admission_max_in_flight,
                    lag_target=settings.admission_lag_target_seconds,
                    latency_floor=settings.admission_target_seconds,
                )
            )
            self.admission.on_change = self._admission_changed
        self.criticality_table = CriticalityTable()
        self.cached_routes = CachedRoutes()
        exempt = [("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"), ("POST", "/admin/breaker")]
        for method, path in [*exempt, ("POST", "/admin/mode")]:
            self.criticality(method, path, Criticality.EXEMPT)  # probes, scrapes and the operator: whatever the load

    @property
    def database(self) -> Database:
        return _started(self._database)

    @property
    def dispatcher(self) -> Dispatcher:
        return _started(self._dispatcher)

    @property
    def monitor(self) -> HealthMonitor:
        return _started(self._monitor)

    @property
    def write_mode(self) -> WriteMode:
        """Whether this process accepts writes: the fleet's mode, BROWNOUT_READ_ONLY, the automatic state."""
        return _started(self._write_mode)

    @property
    def reads(self) -> StaleReads:
        """Reads that answer from the cache, stale if need be, while the database cannot."""
        return _started(self._reads)

    @property
    def reads_if_started(self) -> StaleReads | None:
        return self._reads

    def start(self) -> Brownout:
        """Build every piece; if one fails, those already built are closed before the error is raised."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> Brownout:
        settings, metrics = self.settings, self.metrics
        self.link = link = build_redis_link(settings)
        self.authenticator.start(link)
        if link is not None:
            link.on_error = lambda kind: metrics.redis_errors.labels(kind).inc()
        self._database = database = build_database(settings, link=link)
        metrics.attach_resilience(database.resilience)
        if isinstance(database.engine.pool, DeadlineQueuePool):
            database.engine.pool.on_wait = metrics.pool_wait.observe
        database.breaker.add_listener(DegradedModeLog())
        metrics.queue_max_length.set(settings.queue_max_length)
        self._write_mode = mode = WriteMode.from_settings(settings, automatic=self._no_write_can_be_made_durable)
        mode.add_listener(lambda state: metrics.observe_mode(state.metric_state))
        self._dispatcher = dispatcher = Dispatcher.from_settings(settings, database, registry=self.registry, mode=mode, link=link)
        dispatcher.on_publisher_restart(metrics.publisher_restarts.inc)
        if link is not None:
            self.cache = ReadCache(
                link, fresh_seconds=settings.cache_fresh_seconds, stale_seconds=settings.cache_stale_seconds, clock=self.clock
            )
            self.override = BreakerOverride(link, database.breaker, poll_seconds=settings.override_poll_seconds).start()
            self.mode_override = OverrideRecord(
                link, "mode", field="mode", poll_seconds=settings.override_poll_seconds, follow=mode.follow, each_poll=mode.watch
            ).start()
        self._monitor = build_monitor(settings, database, on_result=[metrics.observe_health]).start()
        self._reads = StaleReads(
            database=database, cache=self.cache, deadline=settings.request_db_deadline_seconds, clock=self.clock
        )
        self._reads.on_read = lambda served: metrics.cache_reads.labels(served).inc()
        if settings.rabbitmq_url:
            self.queue_depth = QueueDepth(
                url=settings.rabbitmq_urls, queue_name=settings.queue_name, timeout=settings.publish_timeout_seconds
            )
        return self

    def close(self) -> None:
        self.metrics.mark_process_dead()
        steps = (
            self.authenticator.close,
            self._monitor.stop if self._monitor else None,
            self.override.stop if self.override else None,
            self.mode_override.stop if self.mode_override else None,
            self._dispatcher.close if self._dispatcher else None,
            self.link.close if self.link else None,
            (lambda: stop_breaker(self.database.breaker)) if self._database else None,
            self._database.close if self._database else None,
        )
        for step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                log.exception("shutdown step failed")
        self.link = self.cache = self.override = self.mode_override = self.queue_depth = None
        self._database = self._dispatcher = self._monitor = self._reads = self._write_mode = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(self.start)
        app.state.brownout = self
        try:
            if self.admission is None:
                yield
            else:
                self.metrics.admission_limit.set(self.admission.limit)
                async with lag_probe(self.admission):
                    yield
        finally:
            if self.link is not None:
                try:
                    await self.link.aclose()  # on the loop its connections were made on
                except Exception:
                    log.exception("shutdown step failed")
            await run_in_threadpool(self.close)

    def criticality(self, method: str, path: str, level: Criticality | str, *, cached: bool = False) -> None:
        """Declare how much a route matters when the process is past its capacity (undeclared: critical).

        *level*: `critical` (writes, item reads: refused last), `sheddable` (list reads: refused before
        critical work), `optional` (refused first), `exempt` (never refused; keep it cheap). *cached*: the
        route reads through Brownout's stale reads, so past its share it is still answered from the cache
        alone. *path* is the route's template: `brownout.criticality("GET", "/users/{user_id}/orders",
        "sheddable", cached=True)`."""
        self.criticality_table.declare(method, path, level, cached=cached)

    def cached_route(self, path: str, route: CachedRoute) -> None:
        """Answer `GET path` from Redis before FastAPI's routing when Redis alone can (a fresh entry, or a stale
        one while the database would not be asked): one round trip for the caller's rate and the entry, no
        thread pool. Anything else goes on to the route, which must exist and stays the reference: *route*
        (`brownout.fastapi.CachedRoute`) names the item's keys and shapes its body as the route would. The
        route's own dependencies (`require_scope`, `NonCritical`, yours) do not run on this path: `body`
        makes the same checks, and returns None where the route would refuse. Paths are matched without
        the app's root_path (a mounted app is not served this way)."""
        self.cached_routes.declare(path, route)

    def queue_accepts(self) -> bool:
        """Whether a write could be queued now: the publisher connected and the queue not full (its depth is
        read at most every few seconds, and only asked when the publisher is ready)."""
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.publisher_state != "ready":
            return False
        depth = self.queue_depth.read() if self.queue_depth is not None else {}
        return not (depth.get("ok") and depth["messages"] >= self.settings.queue_max_length)

    def _no_write_can_be_made_durable(self) -> bool:
        """Automatic read-only: the breaker refuses the database and the queue cannot take a write."""
        database = self._database
        if database is None or database.breaker.state is BreakerState.CLOSED:
            return False
        return not self.queue_accepts()

    def _admission_changed(self, limit: int, why: str) -> None:
        self.metrics.admission_limit.set(limit)
        log.debug("admission limit %d (%s)", limit, why)  # the gauge shows it; a line per change would flood

    def init_app(self, app: FastAPI, *, routes: bool = True, observability: bool = True) -> FastAPI:
        """Wire Brownout into *app*: its lifespan around the app's own, the body limit, per-route
        metrics, the error mapping, and (with *routes*) `/health`, `/ready`, `/metrics`, `/admin/breaker`,
        `/admin/mode`.

        *observability*: configure this process's logging (BROWNOUT_LOG_FORMAT, BROWNOUT_LOG_PROFILE) and
        Sentry (SENTRY_DSN), as `brownout web` runs the app in processes of its own; False when the service
        configures them itself."""
        from brownout.fastapi import _errors, _routes  # here: the routes' dependencies import this module

        if getattr(app.state, "brownout_wired", False):
            raise RuntimeError("Brownout.init_app was called twice for this app")
        app.state.brownout_wired = True
        if observability:
            self.observe()
        app.add_middleware(BodyLimit, max_bytes=self.settings.max_body_bytes)
        app.add_middleware(
            RequestLimits, max_query_bytes=self.settings.max_query_bytes, max_header_bytes=self.settings.max_header_bytes
        )
        app.add_middleware(HttpMetrics, metrics=self.metrics)
        self._wrap_stack(app)
        _errors.install(app)
        if routes:
            for router in _routes.routers():
                app.include_router(router)
        own = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
            async with self.lifespan(app), own(app) as state:
                yield state

        app.router.lifespan_context = lifespan
        return app

    def _wrap_stack(self, app: FastAPI) -> None:
        """The admission gate, and CORS around it, outside Starlette's own middleware (its error handler and
        everything added with `add_middleware`, the HTTP metrics included): a refusal is the process's
        cheapest answer, and past capacity it is most of what the process does (a refusal through the whole
        stack cost about half a cached read; uvicorn alone answers a 503 in about 25 us). Refusals are
        counted by `brownout_admission_shed_total`, not in the HTTP metrics. A browser's preflight is
        answered first, and a refusal carries the CORS headers a browser needs to read it."""
        origins = [origin.strip() for origin in (self.settings.cors_origins or "").split(",") if origin.strip()]
        build = app.build_middleware_stack

        def wrapped() -> ASGIApp:
            stack: ASGIApp = self._with_fast_reads(app, build)
            if self.admission is not None:
                stack = AdmissionGate(stack, control=self.admission, table=self.criticality_table, metrics=self.metrics)
            if origins:
                stack = CORSMiddleware(
                    stack,
                    allow_origins=origins,
                    allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                    allow_headers=["Authorization", "Idempotency-Key", "Content-Type"],
                    expose_headers=["Location", "Retry-After", "Age", "X-Brownout", "Cache-Status"],
                    allow_credentials=False,  # bearer tokens in a header, never cookies
                    max_age=600,
                )
            return stack

        app.build_middleware_stack = wrapped  # type: ignore[method-assign]  # Starlette builds it on the first call

    def _with_fast_reads(self, app: FastAPI, build: Callable[[], ASGIApp]) -> ASGIApp:
        """The built stack with the fast reads innermost, just before routing: a cached read passes every
        middleware the service added, before `init_app` or after it (`add_middleware` puts each new one
        outermost, so one added before would otherwise sit inside Brownout's and never see a cached read).
        Decided when the stack is built (the lifespan or the first request), when the list is final."""
        app.user_middleware.append(Middleware(FastReads, brownout=self))
        try:
            return build()
        finally:
            app.user_middleware.pop()

    def observe(self) -> None:
        """Logs as the settings say, and Sentry when SENTRY_DSN is set, its events tagged with the breaker's state."""
        configure_logging(self.settings)
        init_sentry(self.settings, breaker=lambda: self._database.breaker if self._database else None, component="web")

    def refresh_gauges(self) -> None:
        """At scrape time: this process's pool, the queue depth (cached a few seconds), dead letters (15 s)."""
        database = self.database
        self.write_mode.watch()  # the automatic state as of this scrape
        self.metrics.observe_pool(pool_figures(database.engine))
        if self.admission is not None:
            self.metrics.admission_in_flight.set(self.admission.in_flight)
            self.metrics.event_loop_lag.set(self.admission.lag)
            self.metrics.admission_latency.set(self.admission.latency)
        self.metrics.observe_budget(database.resilience)
        if self.queue_depth is not None:
            depth = self.queue_depth.read()
            if depth.get("ok"):
                self.metrics.queue_messages.set(depth["messages"])
                self.metrics.delay_queue_messages.set(depth.get("delayed", 0))
        now = time.monotonic()
        # Not while the breaker refuses: a scrape is no user call, it must not count as a refusal.
        due = now - self._dead_letters_read_at >= DEAD_LETTER_REFRESH_SECONDS
        if due and database.breaker.retry_after() == 0:
            self._dead_letters_read_at = now
            try:
                with database.session() as session:
                    count = execute_with_retry(
                        session,
                        lambda: count_unreplayed(session),
                        deadline=self.settings.request_db_deadline_seconds,
                        idempotent=True,
                    )
                self.metrics.dead_letters.set(count)
            except (CircuitOpenError, DeadlineExceeded):
                pass
            except Exception:
                log.warning("dead letters not counted", exc_info=True)


def _started(piece: T | None) -> T:
    if piece is None:
        raise NotStarted("Brownout has not started: use it inside the app's lifespan (Brownout.init_app)")
    return piece
