"""Operator actions: the `admin` scope (a service key with it, or BROWNOUT_ADMIN_TOKEN)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict

from brownout._cache.redis_link import RedisUnavailable
from brownout.fastapi._auth import require_scope
from brownout.fastapi._deps import BrownoutDep

router = APIRouter(tags=["admin"])


class BreakerAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["open", "close", "reset"]


@router.post(
    "/admin/breaker",
    dependencies=[require_scope("admin")],  # refused before its body is looked at
    responses={401: {}, 403: {}, 503: {}},
)
def force_breaker(body: BreakerAction, brownout: BrownoutDep) -> dict[str, Any]:
    """Open, close or reset the database breaker on every web process of the fleet (through Redis)."""
    if brownout.override is None:
        raise HTTPException(503, "REDIS_URL is not set: a forced state could not reach the fleet")
    try:
        record = brownout.override.apply(body.action)
    except RedisUnavailable as exc:
        raise HTTPException(
            503, f"Redis unavailable ({exc}): the fleet cannot be told, nothing was changed", headers={"Retry-After": "5"}
        ) from None
    return {"applied": record, "breaker": brownout.database.breaker.snapshot()}
