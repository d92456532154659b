"""Operator actions: the `admin` scope (a service key with it, or BROWNOUT_ADMIN_TOKEN)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict

from brownout._cache.redis_link import RedisUnavailable
from brownout._fleet.read_only import iso
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


class ModeChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["read-only", "read-write"]


@router.post(
    "/admin/mode",
    dependencies=[require_scope("admin")],  # refused before its body is looked at
    responses={401: {}, 403: {}, 503: {}},
)
def set_mode(body: ModeChange, brownout: BrownoutDep) -> dict[str, Any]:
    """Make the whole fleet read-only (writes refused with 503, the worker's drain held) or read-write again,
    through Redis. The answer is this process's mode and since when: a process started with
    BROWNOUT_READ_ONLY=true stays read-only whatever the fleet's mode."""
    unshared = {"Retry-After": "5"}
    if brownout.mode_override is None:
        raise HTTPException(503, "REDIS_URL is not set: a mode could not reach the fleet, nothing was changed", headers=unshared)
    try:
        record = brownout.mode_override.record(body.mode)
    except RedisUnavailable as exc:
        raise HTTPException(
            503, f"Redis unavailable ({exc}): the fleet cannot be told, nothing was changed", headers=unshared
        ) from None
    state = brownout.write_mode.state
    answer = state.as_json() | {"fleet": {"mode": record["mode"], "since": iso(record["since"]), "seq": record["seq"]}}
    if state.reason == "setting" and body.mode == "read-write":
        answer["detail"] = "BROWNOUT_READ_ONLY=true keeps this process read-only: the fleet's mode does not lift it"
    return answer
