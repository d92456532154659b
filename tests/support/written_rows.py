"""What tests of the write path read back: the rows a write left, seen from outside the code under test."""

from __future__ import annotations

from sqlalchemy import text

from brownout._db import Database
from tests.conftest import admin_cursor


def committed_ids(dbname: str) -> list[int]:
    """The ids committed in *dbname*'s `items` table, read over an admin connection of its own."""
    with admin_cursor(dbname) as cur:
        cur.execute("SELECT id FROM items ORDER BY id")
        return [row[0] for row in cur.fetchall()]


def row_counts(database: Database) -> tuple[int, int, int]:
    """(notifications, outbox, applied_commands) rows: one write that took effect once adds one of each."""
    with database.session() as s:
        counts = s.execute(
            text(
                "SELECT (SELECT count(*) FROM notifications), (SELECT count(*) FROM outbox),"
                " (SELECT count(*) FROM applied_commands)"
            )
        ).one()
        s.rollback()
    return (int(counts[0]), int(counts[1]), int(counts[2]))
