"""The read side's SQL: plain SELECTs, run by `reads.py` under the request deadline.

Reads never write. Items carry `read_stamp` (internal, never sent to clients)
so a pending mark-read can be compared with what the database already has.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from app.dispatch.notifications import row_to_json
from app.schema import notifications
from brownout import applied_commands, command_conflicts, dead_letters, reason_summary

MAX_PAGE = 100


class BadCursor(ValueError):
    """Raised when a pagination cursor was not made by this service."""


@dataclass(frozen=True, order=True)
class Position:
    """Where an item sits in a newest-first list: (created_at in µs, id)."""

    created_us: int
    id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.created_us}:{self.id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> Position:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            created, _, ident = raw.partition(":")
            position = cls(int(created), str(uuid.UUID(ident)))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise BadCursor("cursor is not one this service handed out") from None
        if not 0 <= position.created_us <= _LATEST_US:  # decodes, but no time this service stamps
            raise BadCursor("cursor is not one this service handed out")
        return position

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> Position:
        return cls(micros(datetime.fromisoformat(item["created_at"])), item["id"])


def micros(moment: datetime) -> int:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return round(aware.timestamp() * 1_000_000)


_LATEST_US = micros(datetime(9999, 12, 31, tzinfo=UTC))  # the last day datetime (and a cursor) can name


_COLUMNS = (
    notifications.c.id,
    notifications.c.user_id,
    notifications.c.email,
    notifications.c.subject,
    notifications.c.body,
    notifications.c.read,
    notifications.c.read_stamp,
    notifications.c.created_at,
)


def get_notification(session: Session, notification_id: uuid.UUID) -> dict[str, Any] | None:
    row = session.execute(select(*_COLUMNS).where(notifications.c.id == notification_id)).mappings().one_or_none()
    return None if row is None else row_to_json(row)


def list_notifications(session: Session, user_id: str, *, before: Position | None, limit: int) -> list[dict[str, Any]]:
    """Newest first, strictly older than *before*; one more than *limit* tells whether a next page exists."""
    query = select(*_COLUMNS).where(notifications.c.user_id == user_id)
    if before is not None:
        created = datetime.fromtimestamp(before.created_us / 1_000_000, UTC)
        query = query.where(tuple_(notifications.c.created_at, notifications.c.id) < tuple_(created, uuid.UUID(before.id)))
    query = query.order_by(notifications.c.created_at.desc(), notifications.c.id.desc()).limit(limit + 1)
    return [row_to_json(row) for row in session.execute(query).mappings()]


def notification_stats(session: Session, user_id: str) -> dict[str, int]:
    read = func.count().filter(notifications.c.read)
    row = session.execute(select(func.count().label("total"), read.label("read")).where(notifications.c.user_id == user_id)).one()
    return {"total": row.total, "read": row.read, "unread": row.total - row.read}


def command_status(session: Session, command_id: uuid.UUID) -> dict[str, Any] | None:
    """applied (or superseded), dropped, conflict or failed, from the database; None when it holds nothing yet.
    `caller` is who submitted it (None: not kept), for the route to decide who may see it."""
    applied = session.execute(
        select(
            applied_commands.c.caller,
            applied_commands.c.name,
            applied_commands.c.outcome,
            applied_commands.c.path,
            applied_commands.c.applied_at,
            applied_commands.c.entity_key,
            applied_commands.c.result,
        ).where(applied_commands.c.command_id == command_id)
    ).one_or_none()
    conflict = session.execute(
        select(command_conflicts.c.recorded_at, command_conflicts.c.envelope["caller"].astext.label("caller"))
        .where(command_conflicts.c.command_id == command_id)
        .limit(1)
    ).one_or_none()
    if applied is not None:
        return {
            "caller": applied.caller,
            "id": str(command_id),
            "status": "dropped" if applied.outcome == "dropped" else "applied",
            "command": applied.name,
            "outcome": applied.outcome,
            "path": applied.path,
            "applied_at": applied.applied_at.isoformat(),
            "result": applied.result,
            "conflicts": conflict is not None,  # a later reuse of the key with another body was refused
        }
    if conflict is not None:
        return {
            "caller": conflict.caller,
            "id": str(command_id),
            "status": "conflict",
            "recorded_at": conflict.recorded_at.isoformat(),
        }
    failed = session.execute(
        select(
            dead_letters.c.reason,
            dead_letters.c.failed_at,
            dead_letters.c.replayed_at,
            dead_letters.c.message[("args", 0, "caller")].astext.label("caller"),  # the envelope it holds
        )
        .where(dead_letters.c.message_id == str(command_id))
        .order_by(dead_letters.c.failed_at.desc())
        .limit(1)
    ).one_or_none()
    if failed is not None:
        return {
            "caller": failed.caller,
            "id": str(command_id),
            "status": "failed" if failed.replayed_at is None else "queued",
            "reason": reason_summary(failed.reason),
            "failed_at": failed.failed_at.isoformat(),
        }
    return None
