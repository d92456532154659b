"""Operator actions, behind BROWNOUT_ADMIN_TOKEN (the route is off without one)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException
from pydantic import BaseModel, ConfigDict

from brownout._cache.redis_link import RedisUnavailable
from brownout.fastapi._credentials import is_operator
from brownout.fastapi._deps import BrownoutDep

router = APIRouter(tags=["admin"])


class BreakerAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["open", "close", "reset"]


def require_admin(brownout: BrownoutDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """A dependency, so a request without the token is refused before its body is looked at."""
    if brownout.settings.admin_token is None:
        raise HTTPException(404, "Not Found")
    if not is_operator(brownout.settings, authorization):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


@router.post(
    "/admin/breaker",
    dependencies=[Depends(require_admin)],
    responses={401: {}, 404: {"description": "BROWNOUT_ADMIN_TOKEN is not set"}, 503: {}},
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
