"""The reference domain over HTTP."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from app.api.access import require_list_of, require_marker, require_owner, require_reader
from app.api.deps import ServicesDep
from app.api.queries import MAX_PAGE
from app.api.writes import WriteResult
from app.dispatch.notifications import (
    CREATE,
    MARK_READ,
    MARK_UNREAD,
    USER_ID_PATTERN,
    CreateNotificationV1,
    not_a_dot_segment,
)
from brownout import ReadResult
from brownout.fastapi import CallerDep, NonCritical, require_scope

router = APIRouter(tags=["notifications"])
WRITE = require_scope("write")

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Names the write: a replay returns the first outcome; another body with the same key is 422.",
    ),
]
UserId = Annotated[str, Path(min_length=1, max_length=128, pattern=USER_ID_PATTERN), AfterValidator(not_a_dot_segment)]

_WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "Queued durably (the database is unavailable); Location: /commands/{command_id}"},
    422: {"description": "Invalid body, or Idempotency-Key reused with another body"},
    503: {"description": "Could not be made durable in time: retry with the same Idempotency-Key after Retry-After"},
}

_MARK_RESPONSES: dict[int | str, dict[str, Any]] = _WRITE_RESPONSES | {
    404: {
        "description": "No such notification, and no creation of it queued (when Redis cannot tell: 202); "
        "or, for an end user, not theirs (a queued one is then recorded dropped)"
    },
}


def _respond(result: WriteResult) -> JSONResponse:
    return JSONResponse(result.body, status_code=result.status_code, headers=result.headers)


@router.post("/notifications", status_code=201, responses=_WRITE_RESPONSES, dependencies=[WRITE])
def create_notification(
    body: CreateNotificationV1, services: ServicesDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Create a notification: 201 when applied, 202 when queued, 503 when neither can be made sure of."""
    payload = body.model_dump(mode="json")
    return _respond(services.writes.submit(CREATE, payload, idempotency_key=idempotency_key, caller=caller.name))


@router.post("/notifications/{notification_id}/read", responses=_MARK_RESPONSES)
def mark_read(
    notification_id: uuid.UUID, services: ServicesDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Mark read: the last write accepted wins, whichever path each took. A service with `write` marks any
    notification, an end user their own (another's is 404, as one that does not exist)."""
    require_marker(caller)
    payload = {"notification_id": str(notification_id)}
    return _respond(services.writes.submit(MARK_READ, payload, idempotency_key=idempotency_key, caller=caller.name))


@router.post("/notifications/{notification_id}/unread", responses=_MARK_RESPONSES)
def mark_unread(
    notification_id: uuid.UUID, services: ServicesDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    require_marker(caller)
    payload = {"notification_id": str(notification_id)}
    return _respond(services.writes.submit(MARK_UNREAD, payload, idempotency_key=idempotency_key, caller=caller.name))


def _read_response(result: ReadResult) -> JSONResponse:
    # A JSONResponse of the body as is: FastAPI's encoder would walk the dict again on the hot path.
    return JSONResponse(result.body, headers=result.headers())


@router.get("/notifications/{notification_id}")
async def get_notification(notification_id: uuid.UUID, services: ServicesDep, caller: CallerDep) -> JSONResponse:
    """From the database or the cache; stale (Age, X-Brownout: stale) while the database is sick.
    An end user sees only their own (another's is 404, as one that does not exist)."""
    require_reader(caller)
    result = await services.reads.notification_async(notification_id)
    require_owner(caller, result.body if isinstance(result.body, dict) else None)
    return _read_response(result)


@router.get("/users/{user_id}/notifications")
def list_notifications(
    user_id: UserId,
    services: ServicesDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="`next` of the previous page")] = None,
) -> JSONResponse:
    """Newest first, pending items included; `next` is the cursor of the following page, or null."""
    require_list_of(caller, str(user_id))
    return _read_response(services.reads.notifications(user_id, cursor=cursor, limit=limit))


@router.get("/users/{user_id}/notifications/stats", dependencies=[NonCritical])
def notification_stats(user_id: UserId, services: ServicesDep, caller: CallerDep) -> dict[str, int]:
    """Read and unread counts. Non-critical: shed (503) while the breaker is not CLOSED."""
    require_list_of(caller, str(user_id))
    return services.reads.stats(user_id)
