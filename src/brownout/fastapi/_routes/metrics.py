"""`GET /metrics`: Prometheus exposition of every web process of this replica."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from brownout._observability.metrics import render
from brownout.fastapi._auth import require_scope
from brownout.fastapi._deps import BrownoutDep

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False, dependencies=[require_scope("metrics")])
def metrics(brownout: BrownoutDep) -> Response:
    brownout.refresh_gauges()
    body, content_type = render(brownout.metrics)
    return Response(body, media_type=content_type)
