"""Where a write stands: queued, applied, failed (dead-lettered) or conflict."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response

from app.api.deps import ServicesDep
from brownout.fastapi import require_scope

router = APIRouter(tags=["commands"])


@router.get("/commands/{command_id}", dependencies=[require_scope("read")])
def get_command(command_id: uuid.UUID, services: ServicesDep, response: Response) -> dict[str, Any]:
    result = services.reads.command(command_id)
    response.headers.update(result.headers())
    body: dict[str, Any] = result.body
    return body
