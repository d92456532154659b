"""Alembic environment: the URL comes from the caller or from DATABASE_URL (validated settings)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from app.schema import metadata
from brownout._settings import load_settings, normalise_database_url

config = context.config


def _url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return normalise_database_url(str(url))
    return load_settings().database_url


def run_migrations_online() -> None:
    engine = create_engine(_url(), connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as connection, connection.begin():
            # One migrator at a time across the fleet (two release jobs, or tests);
            # the lock and the DDL share one transaction, committed on success.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(726561)")
            context.configure(connection=connection, target_metadata=metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations_online()
