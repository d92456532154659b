"""The web entry point: `uvicorn --factory app.api.main:app_from_environment` (the Procfile's web line)."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from app.api.app import create_app
from app.settings import load_settings


def app_from_environment() -> FastAPI:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # pika logs an ERROR with a traceback for every failed connect; the publisher says it once.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    return create_app(load_settings())
