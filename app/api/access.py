"""Who may see what in the notification service, on top of Brownout's scopes.

Services hold scopes: `write` creates notifications and marks any of them, `read` reads any
user's. An end user (a verified token) may read their own list, mark their own notifications
and see the commands they issued, and nothing of anyone else's: another user's list,
notification or command answers 404, as if it did not exist, so ids cannot be probed. Whose a
notification is, a mark's apply decides (app/dispatch/notifications.py), on either path.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from app.api.reads import NotFound
from brownout.fastapi import Caller


def require_reader(caller: Caller) -> None:
    """A service with `read`, or an end user (who may then see only their own: `require_owner`)."""
    if not caller.may("read") and not caller.is_user:
        raise HTTPException(403, "this credential lacks the read scope")


def require_marker(caller: Caller) -> None:
    """A service with `write`, or an end user (whose mark then takes effect only on their own notification)."""
    if not caller.may("write") and not caller.is_user:
        raise HTTPException(403, "this credential lacks the write scope")


def require_issuer(caller: Caller, issuer: str | None) -> None:
    """404 for an end user's look at a command someone else issued (or one whose issuer was not kept)."""
    if caller.may("read"):
        return
    if issuer is None or issuer != caller.name:
        raise NotFound(issuer or "")


def require_owner(caller: Caller, item: dict[str, Any] | None) -> None:
    """404 for an end user's read of someone else's notification, as for one that does not exist."""
    if caller.may("read") or item is None:
        return
    if str(item.get("user_id")) != caller.user_id:
        raise HTTPException(404, "Not Found")


def require_list_of(caller: Caller, user_id: str) -> None:
    if caller.may("read"):
        return
    if caller.is_user:
        if caller.user_id != user_id:
            raise HTTPException(404, "Not Found")
        return
    raise HTTPException(403, "this credential lacks the read scope")
