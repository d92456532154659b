"""Tables, as SQLAlchemy Core: what the code reads and writes, and what the migrations must add up to.

The migrations in app/migrations state their own DDL, frozen as of each revision (they never import
this module); tests/integration/test_migrations.py checks that head equals these tables. A change here
needs a new revision (`alembic revision --autogenerate`, then read and freeze what it wrote).

Brownout's own tables (applied writes, conflicts, dead letters, the outbox and send records) are not
here: they have their own migrations and version table, run first by `upgrade_database`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, MetaData, Table, Text, func
from sqlalchemy.dialects.postgresql import UUID

from brownout import migrations as brownout_migrations

__all__ = ["MIGRATIONS", "metadata", "notifications", "upgrade_database"]

metadata = MetaData()

notifications = Table(
    "notifications",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("user_id", Text, nullable=False),  # Supabase Auth's UUIDs, or another issuer's ids (was a bigint before 0007)
    Column("email", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("read", Boolean, nullable=False, server_default="false"),
    # Stamp of the write that last set `read` (0: never set): last writer wins.
    Column("read_stamp", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),  # acceptance time
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("notifications_user_recent", "user_id", "created_at", "id"),
)

MIGRATIONS = Path(__file__).parent / "migrations"


def upgrade_database(database_url: str, revision: str = "head") -> None:
    """Brownout's migrations, then this service's, to *revision* (what the Procfile's release line runs).

    Brownout's first: a database migrated before Brownout had its own history is recognised by this
    service's revision, which must not have moved yet."""
    from alembic import command
    from alembic.config import Config

    brownout_migrations.upgrade(database_url)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    command.upgrade(config, revision)
