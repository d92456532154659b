"""`GET /metrics`: Prometheus exposition of every web process of this replica."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.deps import ServicesDep
from brownout._observability.metrics import render

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def metrics(services: ServicesDep) -> Response:
    services.refresh_gauges()
    body, content_type = render(services.metrics)
    return Response(body, media_type=content_type)
