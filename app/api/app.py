"""`create_app(settings)`: the FastAPI service, its routes, and the process's services.

Route handlers that touch PostgreSQL, Redis or RabbitMQ are plain `def`
functions: FastAPI runs them on its thread pool, so database work never
blocks the event loop, and each call carries its own deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.api import errors
from app.api.routes import admin, commands, health, notifications
from app.api.routes import metrics as metrics_route
from app.api.services import Services
from brownout._observability.metrics import Metrics
from brownout._settings import Settings
from brownout.fastapi._body_limit import BodyLimit
from brownout.fastapi._http_metrics import HttpMetrics


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    build_services: Callable[[Settings, Metrics], Services] = Services.build,
) -> FastAPI:
    """Nothing connects until the app starts (lifespan); everything is closed when it stops."""
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await run_in_threadpool(build_services, settings, metrics)
        app.state.services = services
        try:
            yield
        finally:
            await run_in_threadpool(services.close)

    app = FastAPI(
        title="Brownout",
        summary="A service that stays useful while its PostgreSQL is sick, and loses no acknowledged write.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetrics, metrics=metrics)
    errors.install(app)
    for module in (notifications, commands, health, admin, metrics_route):
        app.include_router(module.router)
    return app
