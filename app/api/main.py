"""The web entry point: `app_from_environment`, the factory the Procfile's web line serves (`brownout web --factory`)."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.app import create_app
from brownout import load_settings


def app_from_environment() -> FastAPI:
    """The app with this process's logging and Sentry configured from the environment."""
    return create_app(load_settings(), observability=True)
