"""The routes Brownout brings: liveness and readiness, Prometheus metrics, the operator's fleet-wide records (breaker, mode)."""

from __future__ import annotations

from fastapi import APIRouter

from brownout.fastapi._routes import admin, health, metrics


def routers() -> list[APIRouter]:
    return [health.router, admin.router, metrics.router]
