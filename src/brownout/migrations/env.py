"""Alembic environment of Brownout's own tables: their own version table, one migrator at a time."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, inspect, text

from brownout._schema import metadata
from brownout._settings import load_settings, normalise_database_url
from brownout.migrations import ADOPTED_REVISIONS, VERSION_TABLE

config = context.config

# The same key as the service's own migrations take in the reference service: a fleet's release jobs
# and both histories migrate one at a time.
ADVISORY_LOCK = 726561


def _url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return normalise_database_url(str(url))
    return load_settings().migration_database_url or load_settings().database_url


def _adopted_revision(connection: Connection) -> str | None:
    """The revision to stamp when Brownout's tables exist from before its own history, or None."""
    tables = set(inspect(connection).get_table_names())
    if VERSION_TABLE in tables or "applied_commands" not in tables:
        return None
    heads: list[str] = []
    if "alembic_version" in tables:
        heads = list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    if len(heads) != 1 or heads[0] not in ADOPTED_REVISIONS:
        said = heads[0] if len(heads) == 1 else heads
        raise SystemExit(
            f"brownout migrate: applied_commands exists but {VERSION_TABLE} does not, and alembic_version says "
            f"{said!r}, not one revision Brownout's tables were created by: nothing was changed"
        )
    return ADOPTED_REVISIONS[heads[0]]


def run_migrations_online() -> None:
    engine = create_engine(_url(), connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as connection, connection.begin():
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})")
            adopted = _adopted_revision(connection)
            context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
            if adopted is not None:
                context.get_context().stamp(context.script, adopted)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations_online()
