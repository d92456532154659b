"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.services import Services


async def get_services(request: Request) -> Services:  # async: FastAPI runs a plain function in the thread pool
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
