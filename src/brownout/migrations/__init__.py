"""Brownout's own tables, migrated by their own Alembic history into their own version table.

`upgrade(url)` is what `brownout migrate` runs. It runs beside a service's own Alembic set-up: the
service's history is kept in `alembic_version`, Brownout's in `brownout_alembic_version`, and the
service's autogenerate leaves Brownout's tables alone when its env.py passes
`include_object=skip_brownout_tables`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brownout._schema import metadata

MIGRATIONS = Path(__file__).parent
VERSION_TABLE = "brownout_alembic_version"

# Before Brownout had its own history, its tables were created by the reference service's revisions
# 0001-0006 (in `alembic_version`), each of which maps to the revision of this history that builds the
# same tables. A database found that way is stamped, never re-created.
ADOPTED_REVISIONS = {f"000{n}": f"brownout_000{n}" for n in range(1, 7)}


def upgrade(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade` of Brownout's tables against *database_url* (a direct or session-mode connection:
    the DDL and its advisory lock do not go through a transaction pooler)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def alembic_config(database_url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    return config


def skip_brownout_tables(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """An `include_object` for a service's own Alembic env: its autogenerate neither drops nor alters Brownout's tables."""
    if type_ == "table":
        return name not in metadata.tables and name != VERSION_TABLE
    table = getattr(obj, "table", None)
    return getattr(table, "name", None) not in metadata.tables


__all__ = ["ADOPTED_REVISIONS", "MIGRATIONS", "VERSION_TABLE", "alembic_config", "skip_brownout_tables", "upgrade"]
