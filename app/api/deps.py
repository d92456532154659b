"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.errors import Shed
from app.api.services import Services
from brownout._db import BreakerState


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def non_critical(services: ServicesDep) -> None:
    """Declare a route non-critical: shed at once (503) while the breaker is not CLOSED."""
    breaker = services.database.breaker
    if breaker.state is not BreakerState.CLOSED:
        raise Shed(max(1.0, breaker.retry_after()))


NonCritical = Depends(non_critical)
