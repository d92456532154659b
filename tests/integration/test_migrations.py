"""The migrations against a real PostgreSQL: head is the models, every step walks down and up, rows survive.

Each migration states its own DDL as of its revision. If one read the live models instead, the first
column anyone adds would break every fresh install (the old revision would create it, the new one add it
again) and a downgrade would drop tables as they are now. These tests hold the migrations to that.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from app.schema import MIGRATIONS, metadata
from brownout._settings import normalise_database_url
from tests.conftest import admin_cursor, database_url

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = MIGRATIONS / "versions"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = url
    return config


def revisions_base_to_head() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config("unused"))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


@pytest.fixture
def url(pg_database: str) -> str:
    return database_url(pg_database)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    built = create_engine(normalise_database_url(url))
    yield built
    built.dispose()


def model_differences(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), metadata))


def user_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def schema_of(engine: Engine) -> dict[str, Any]:
    """Tables with their columns, constraints and indexes, as the database reports them."""
    inspector = inspect(engine)
    return {
        table: {
            "columns": [(column["name"], str(column["type"]), column["nullable"]) for column in inspector.get_columns(table)],
            "unique": sorted((c["name"], tuple(c["column_names"])) for c in inspector.get_unique_constraints(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
        }
        for table in sorted(user_tables(engine))
    }


def test_the_migrations_never_import_the_models() -> None:
    """The class of defect, at its root: a migration importing app.* builds from today's models."""
    for path in sorted(VERSIONS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("app", "worker"), f"{path.name} imports {name}"


def test_upgrading_an_empty_database_gives_exactly_the_models(url: str, engine: Engine) -> None:
    command.upgrade(alembic_config(url), "head")
    assert model_differences(engine) == []
    assert user_tables(engine) == set(metadata.tables)


def test_head_is_the_schema_the_models_create_down_to_constraint_names(url: str, engine: Engine, pg_database: str) -> None:
    """A database migrated by earlier releases (whose migrations ran `table.create()` from the models)
    and one migrated now must be the same to the byte in pg_dump, or the next migration would meet
    different constraint or index names in the field."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        if os.environ.get("CI"):
            pytest.fail("pg_dump is needed (postgresql-client)")
        pytest.skip("pg_dump not installed")
    command.upgrade(alembic_config(url), "head")
    from_models = f"{pg_database}_m"
    with admin_cursor() as cur:
        cur.execute(f'CREATE DATABASE "{from_models}"')
    try:
        models_url = database_url(from_models)
        models_engine = create_engine(normalise_database_url(models_url))
        try:
            metadata.create_all(models_engine)
        finally:
            models_engine.dispose()

        def dump(db_url: str) -> str:
            result = subprocess.run(
                [pg_dump, "--schema-only", "--no-owner", "--no-privileges", "--exclude-table=alembic_version", db_url],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            noise = ("--", "\\restrict", "\\unrestrict")  # comments, and pg_dump's per-run random restrict keys
            return "\n".join(line for line in result.stdout.splitlines() if not line.startswith(noise))

        assert dump(url) == dump(models_url)
    finally:
        with admin_cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{from_models}" WITH (FORCE)')


def test_every_revision_walks_down_and_up_again(url: str, engine: Engine) -> None:
    config = alembic_config(url)
    revisions = revisions_base_to_head()
    assert revisions[0] == "0001" and len(revisions) >= 3
    for revision in revisions:
        command.upgrade(config, revision)
        here = schema_of(engine)
        command.downgrade(config, "-1")
        assert schema_of(engine) != here, f"downgrading {revision} changed nothing"
        command.upgrade(config, revision)
        assert schema_of(engine) == here, f"{revision} down and up again is not what it was"
    assert model_differences(engine) == []
    command.downgrade(config, "base")
    assert user_tables(engine) == set()
    with engine.connect() as connection:
        sequences = connection.execute(text("SELECT relname FROM pg_class WHERE relkind = 'S'")).scalars().all()
    assert sequences == []
    command.upgrade(config, "head")
    assert model_differences(engine) == []


def test_rows_survive_every_upgrade_and_every_downgrade_that_keeps_their_table(url: str, engine: Engine) -> None:
    """Rows written at each revision are there, unchanged, after every later step up and every step
    down that keeps their table. The harness the first data-changing migration extends."""
    config = alembic_config(url)
    now = datetime.now(UTC)
    notification_id = uuid.uuid4()
    written: dict[str, tuple[str, dict[str, Any]]] = {
        "0001": (
            "notifications",
            {"id": notification_id, "user_id": 42, "email": "ada@example.com", "subject": "s", "body": "b", "created_at": now},
        ),
        "0002": (
            "dead_letters",
            {"message_id": "m-1", "queue_name": "q", "actor_name": "a", "message": '{"x": 1}', "reason": "r"},
        ),
        "0003": ("outbox", {"id": uuid.uuid4(), "notification_id": notification_id, "kind": "email", "payload": "{}"}),
        "0004": (
            "dead_letters",
            {"message_id": "m-2", "attempt": 1, "queue_name": "q", "actor_name": "a", "message": "{}", "reason": "again"},
        ),
        "0005": (
            "outbox",
            {"id": uuid.uuid4(), "notification_id": notification_id, "kind": "email", "payload": "{}", "claimed_until": now},
        ),
        "0006": (
            "outbox",
            {"id": uuid.uuid4(), "notification_id": notification_id, "kind": "email", "payload": "{}", "sent_at": now},
        ),
    }
    assert set(written) == set(revisions_base_to_head()), "add a row for the new revision here"

    def insert(table: str, row: dict[str, Any]) -> None:
        columns = ", ".join(row)
        values = ", ".join(f":{name}" for name in row)
        with engine.begin() as connection:
            connection.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), row)

    def assert_rows(up_to: str) -> None:
        with engine.connect() as connection:
            for revision, (table, row) in written.items():
                if revision > up_to:
                    continue
                key = next(iter(row))  # each row is found by its first column
                query = text(f"SELECT {', '.join(row)} FROM {table} WHERE {key} = :key")
                found = connection.execute(query, {"key": row[key]}).mappings().all()
                assert len(found) == 1, (table, found)
                for name, value in row.items():
                    expected = json.loads(value) if name in ("message", "payload") else value  # JSONB comes back decoded
                    assert found[0][name] == expected, (table, name)

    for revision in revisions_base_to_head():
        command.upgrade(config, revision)
        insert(*written[revision])
        assert_rows(revision)
    for revision in reversed(revisions_base_to_head()[:-1]):
        command.downgrade(config, revision)
        assert_rows(revision)


def test_a_column_added_to_the_models_later_is_not_created_by_the_old_revisions(url: str, engine: Engine) -> None:
    """What broke fresh installs: with a column added to the models (as the next release will),
    upgrading an empty database must build the tables as the revisions say, without it."""
    script = (
        "import sys\n"
        "from sqlalchemy import Column, Text\n"
        "import app.schema as schema\n"
        "schema.notifications.append_column(Column('added_later', Text, nullable=True))\n"
        "schema.upgrade_database(sys.argv[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, url], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    columns = {column["name"] for column in inspect(engine).get_columns("notifications")}
    assert "added_later" not in columns
    assert "email" in columns


def test_migrate_connects_with_the_migration_url_when_set(url: str, engine: Engine) -> None:
    """What Railway's pre-deploy command runs: DATABASE_URL is the transaction pooler (here: nothing listens),
    MIGRATION_DATABASE_URL the session-mode or direct connection the DDL and the advisory lock need."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BROWNOUT_")}
    env |= {"DATABASE_URL": "postgresql://nobody:x@127.0.0.1:9/none?connect_timeout=1", "MIGRATION_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert user_tables(engine) == set(metadata.tables)


def test_dead_letters_kept_before_attempts_are_numbered_in_the_order_written(url: str, engine: Engine) -> None:
    """0004 keys dead letters by message and attempt: rows of earlier replays that failed again (same message
    id) get attempts 0, 1, ... in the order they were written, and the constraint then holds."""
    config = alembic_config(url)
    command.upgrade(config, "0003")
    insert = text(
        "INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason) VALUES (:m, 'q', 'a', '{}', :r)"
    )
    with engine.begin() as connection:
        for message_id, reason in (("m-1", "first"), ("m-2", "other"), ("m-1", "after a replay"), ("m-1", "third")):
            connection.execute(insert, {"m": message_id, "r": reason})
    command.upgrade(config, "0004")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT message_id, attempt, reason FROM dead_letters ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [
        ("m-1", 0, "first"),
        ("m-2", 0, "other"),
        ("m-1", 1, "after a replay"),
        ("m-1", 2, "third"),
    ]
    command.downgrade(config, "0003")
    command.upgrade(config, "head")
    assert model_differences(engine) == []
