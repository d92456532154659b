"""`create_app(settings)`: the notification service, its routes, on Brownout's lifespan and middleware.

Route handlers that touch PostgreSQL or RabbitMQ are plain `def` functions:
FastAPI runs them on its thread pool, so database work never blocks the event
loop, and each call carries its own deadline. The item read is `async`: a
cache hit is answered on the loop, and before routing at all when Redis alone
holds it (app/api/cached_item.py); a miss goes to the thread pool.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.api import cached_item, errors
from app.api.routes import commands, notifications
from app.api.services import Services
from app.dispatch.notifications import build_registry
from brownout import Metrics, Settings
from brownout import __version__ as brownout_version
from brownout.fastapi import Brownout


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    observability: bool = False,
) -> FastAPI:
    """Nothing connects until the app starts (lifespan); everything is closed when it stops.

    *clock*: the wall clock of the cache's ages (tests age entries with a clock of their own);
    *observability*: configure the process's logging and Sentry (the dyno's entry point does)."""
    brownout = Brownout(settings, registry=build_registry(), metrics=metrics, clock=clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:  # runs inside Brownout's: its pieces are ready
        services = await run_in_threadpool(Services.build, brownout)
        app.state.services = services
        brownout.cached_route(cached_item.PATH, cached_item.CachedNotification(services.reads))
        try:
            yield
        finally:
            await run_in_threadpool(services.close)

    app = FastAPI(
        title="Brownout",
        summary="A service that stays useful while its PostgreSQL is sick, and loses no acknowledged write.",
        version=brownout_version,
        lifespan=lifespan,
    )
    brownout.init_app(app, observability=observability)
    # Under overload: item reads stay critical and can fall back on the cache, lists go before them, stats first.
    brownout.criticality("GET", "/notifications/{notification_id}", "critical", cached=True)
    brownout.criticality("GET", "/users/{user_id}/notifications", "sheddable", cached=True)
    brownout.criticality("GET", "/users/{user_id}/notifications/stats", "optional")
    errors.install(app)
    for module in (notifications, commands):
        app.include_router(module.router)
    return app
