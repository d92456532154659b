"""`GET /notifications/{notification_id}` as Brownout's fast reads answer it (brownout.fastapi.CachedRoute):
the route's own answer, given before FastAPI's routing when Redis alone holds it. Whatever this declines
(an id not in its canonical form, a pending mark or write, a caller who may not see the item) the route
answers, in its own words."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException

from app.api.access import require_owner, require_reader
from app.api.reads import NotificationReads, public
from brownout import ReadResult
from brownout.fastapi import Caller

PATH = "/notifications/{notification_id}"


class CachedNotification:
    def __init__(self, reads: NotificationReads) -> None:
        self._reads = reads

    def keys(self, params: Mapping[str, str]) -> tuple[tuple[str, str], tuple[str, ...]] | None:
        raw = params["notification_id"]
        try:
            ident = str(uuid.UUID(raw))
        except ValueError:
            return None
        if ident != raw:  # another spelling of a UUID: the route validates it as it always has
            return None
        return self._reads.item_keys(ident), self._reads.mark_keys(ident)

    def body(self, result: ReadResult, caller: Caller) -> dict[str, Any] | None:
        item = result.body
        if not isinstance(item, dict) or any(result.extras):  # a remembered 404, or a pending mark over it
            return None
        try:
            require_reader(caller)
            require_owner(caller, item)
        except HTTPException:
            return None
        return public(item)
