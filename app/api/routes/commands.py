"""Where a write stands: queued, applied, failed (dead-lettered) or conflict."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response

from app.api.access import require_issuer, require_reader
from app.api.deps import ServicesDep
from brownout.fastapi import CallerDep

router = APIRouter(tags=["commands"])


@router.get("/commands/{command_id}")
def get_command(command_id: uuid.UUID, services: ServicesDep, caller: CallerDep, response: Response) -> dict[str, Any]:
    """A service with `read` sees any command; an end user only those they issued (another's is 404)."""
    require_reader(caller)
    result = services.reads.command(command_id)
    body: dict[str, Any] = result.body
    require_issuer(caller, body.pop("caller", None))  # kept for this check, never shown
    response.headers.update(result.headers())
    return body
