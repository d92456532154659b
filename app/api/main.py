"""The web entry point: `app_from_environment`, the factory the Procfile's web line serves (`brownout web --factory`)."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.app import create_app
from brownout import CircuitBreaker, configure_logging, init_sentry, load_settings


def app_from_environment() -> FastAPI:
    settings = load_settings()
    configure_logging(settings)
    app: FastAPI | None = None

    def breaker() -> CircuitBreaker | None:  # Brownout's pieces exist once the app has started
        brownout = getattr(app.state, "brownout", None) if app is not None else None
        return brownout.database.breaker if brownout is not None else None

    init_sentry(settings, breaker=breaker, component="web")  # before the app: the integrations wrap it
    app = create_app(settings)
    return app
