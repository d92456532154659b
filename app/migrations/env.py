"""Alembic environment: the URL comes from the caller or from DATABASE_URL (validated settings)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, inspect

from app.schema import metadata
from brownout import load_settings, normalise_database_url
from brownout.migrations import VERSION_TABLE, skip_brownout_tables

config = context.config


def _url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return normalise_database_url(str(url))
    return load_settings().database_url


def _require_brownout_history(connection: Connection) -> None:
    """Brownout's tables without Brownout's version table: its migrations must run first (they recognise
    such a database by this history's revision, which must not move before they do)."""
    tables = set(inspect(connection).get_table_names())
    if "applied_commands" in tables and VERSION_TABLE not in tables:
        raise SystemExit("migrate: run Brownout's migrations first (brownout migrate): nothing was changed")


def run_migrations_online() -> None:
    engine = create_engine(_url(), connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as connection, connection.begin():
            # One migrator at a time across the fleet (two release jobs, or tests);
            # the lock and the DDL share one transaction, committed on success.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(726561)")
            _require_brownout_history(connection)
            context.configure(connection=connection, target_metadata=metadata, include_object=skip_brownout_tables)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations_online()
