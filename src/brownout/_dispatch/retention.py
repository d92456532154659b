"""Purge old applied-command records: keys cannot be kept forever.

A purged key is forgotten: a client replaying it after the retention period
would apply the write again. So the retention must exceed the longest a
client retries plus the longest a write may wait in the queue; 30 days by
default (BROWNOUT_APPLIED_RETENTION_DAYS). Deletes in batches so a large
purge never holds long locks.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from brownout._schema import applied_commands, command_conflicts


def purge_applied(session: Session, *, older_than: timedelta, batch_size: int = 5000) -> int:
    """Delete applied commands and conflicts older than *older_than*; return how many rows went."""
    removed = 0
    cutoff = func.now() - older_than
    for table, column in (
        (applied_commands, applied_commands.c.applied_at),
        (command_conflicts, command_conflicts.c.recorded_at),
    ):
        key = next(iter(table.primary_key.columns))
        while True:
            doomed = select(key).where(column < cutoff).limit(batch_size).scalar_subquery()
            deleted = session.execute(delete(table).where(key.in_(doomed))).rowcount  # type: ignore[attr-defined]
            session.commit()
            removed += deleted
            if deleted < batch_size:
                break
    return removed
