"""The migrations against a real PostgreSQL: head is the models, every step walks down and up, rows survive.

Two histories: Brownout's own tables (brownout/migrations, version table `brownout_alembic_version`)
and the notification service's (app/migrations, `alembic_version`), which `upgrade_database` runs in
that order.

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
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Engine

from app.schema import MIGRATIONS, upgrade_database
from app.schema import metadata as app_metadata
from brownout import migrations as brownout_migrations
from brownout._schema import metadata as brownout_metadata
from brownout._settings import normalise_database_url
from tests.conftest import admin_cursor, database_url
from tests.support import previous_layout

ROOT = Path(__file__).resolve().parents[2]
VERSION_TABLES = {"alembic_version", brownout_migrations.VERSION_TABLE}
# The service's revisions whose tables moved to Brownout's history: kept, and empty.
MOVED_TO_BROWNOUT = set(brownout_migrations.ADOPTED_REVISIONS) - {"0001"}


def combined(*metadatas: MetaData) -> MetaData:
    out = MetaData()
    for metadata in metadatas:
        for table in metadata.tables.values():
            table.to_metadata(out)
    return out


metadata = combined(brownout_metadata, app_metadata)


def alembic_config(url: str) -> Config:
    """The service's own history (app/migrations)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = url
    return config


def brownout_config(url: str) -> Config:
    config: Config = brownout_migrations.alembic_config(url)
    return config


HISTORIES = {"brownout": brownout_config, "service": alembic_config}


def revisions_base_to_head(config: Config | None = None) -> list[str]:
    script = ScriptDirectory.from_config(config or alembic_config("unused"))
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
        context = MigrationContext.configure(connection, opts={"include_object": not_a_version_table})
        return list(compare_metadata(context, metadata))


def not_a_version_table(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    return not (type_ == "table" and name in VERSION_TABLES)


def user_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - VERSION_TABLES


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
    """The class of defect, at its root: a migration importing app.* or brownout.* builds from today's models."""
    paths = [*MIGRATIONS.glob("versions/*.py"), *brownout_migrations.MIGRATIONS.glob("versions/*.py")]
    assert len(paths) >= 12
    for path in sorted(paths):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("app", "worker", "brownout"), f"{path.name} imports {name}"


def test_upgrading_an_empty_database_gives_exactly_the_models(url: str, engine: Engine) -> None:
    upgrade_database(url)
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
    upgrade_database(url)
    from_models = f"{pg_database}_m"
    with admin_cursor() as cur:
        cur.execute(f'CREATE DATABASE "{from_models}"')
    try:
        models_url = database_url(from_models)
        models_engine = create_engine(normalise_database_url(models_url))
        try:
            brownout_metadata.create_all(models_engine)
            app_metadata.create_all(models_engine)
        finally:
            models_engine.dispose()

        def dump(db_url: str) -> str:
            result = subprocess.run(
                [pg_dump, "--schema-only", "--no-owner", "--no-privileges", "--exclude-table=*alembic_version", db_url],
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


@pytest.mark.parametrize("history", sorted(HISTORIES))
def test_every_revision_walks_down_and_up_again(history: str, url: str, engine: Engine) -> None:
    config = HISTORIES[history](url)
    revisions = revisions_base_to_head(config)
    assert revisions[0].endswith("0001") and len(revisions) >= 6
    for revision in revisions:
        command.upgrade(config, revision)
        here = schema_of(engine)
        command.downgrade(config, "-1")
        if revision not in MOVED_TO_BROWNOUT:
            assert schema_of(engine) != here, f"downgrading {revision} changed nothing"
        command.upgrade(config, revision)
        assert schema_of(engine) == here, f"{revision} down and up again is not what it was"
    own = brownout_metadata if history == "brownout" else app_metadata
    assert user_tables(engine) == set(own.tables)
    command.downgrade(config, "base")
    assert user_tables(engine) == set()
    with engine.connect() as connection:
        sequences = connection.execute(text("SELECT relname FROM pg_class WHERE relkind = 'S'")).scalars().all()
    assert sequences == []


def test_rows_survive_every_upgrade_and_every_downgrade_that_keeps_their_table(url: str, engine: Engine) -> None:
    """Rows written at each revision are there, unchanged, after every later step up and every step
    down that keeps their table. The harness the first data-changing migration extends."""
    config = brownout_config(url)
    now = datetime.now(UTC)
    notification_id = uuid.uuid4()
    command.upgrade(alembic_config(url), "head")  # the service's history first (its table), then Brownout's step by step
    written: dict[str, tuple[str, dict[str, Any]]] = {
        "brownout_0001": (
            "applied_commands",
            {
                "command_id": uuid.uuid4(),
                "name": "create_notification",
                "version": 1,
                "scope": "user:42",
                "idempotency_key": "k",
                "payload_hash": "h",
                "entity_key": f"notification:{notification_id}",
                "accepted_stamp": 1,
                "accepted_at": now,
                "apply_seq": 1,
                "path": "direct",
                "outcome": "applied",
                "result": '{"id": 1}',
            },
        ),
        "brownout_0002": (
            "dead_letters",
            {"message_id": "m-1", "queue_name": "q", "actor_name": "a", "message": '{"x": 1}', "reason": "r"},
        ),
        "brownout_0003": ("outbox", {"id": uuid.uuid4(), "notification_id": notification_id, "kind": "email", "payload": "{}"}),
        "brownout_0004": (
            "dead_letters",
            {"message_id": "m-2", "attempt": 1, "queue_name": "q", "actor_name": "a", "message": "{}", "reason": "again"},
        ),
        "brownout_0005": (
            "outbox",
            {"id": uuid.uuid4(), "notification_id": notification_id, "kind": "email", "payload": "{}", "claimed_until": now},
        ),
        "brownout_0006": (
            "outbox",
            {"id": uuid.uuid4(), "notification_id": notification_id, "kind": "email", "payload": "{}", "sent_at": now},
        ),
        "brownout_0007": (
            "applied_commands",
            {
                "command_id": uuid.uuid4(),
                "name": "mark_notification_read",
                "version": 1,
                "scope": "notification:1",
                "idempotency_key": "k",
                "payload_hash": "h",
                "entity_key": f"notification:{notification_id}",
                "accepted_stamp": 2,
                "accepted_at": now,
                "apply_seq": 2,
                "path": "queued",
                "outcome": "dropped",
                "result": '{"dropped": "not the caller\'s notification"}',
                "caller": "user:ada",
            },
        ),
    }
    assert set(written) == set(revisions_base_to_head(config)), "add a row for the new revision here"

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
                    expected = (
                        json.loads(value) if name in ("message", "payload", "result") else value
                    )  # JSONB comes back decoded
                    assert found[0][name] == expected, (table, name)

    for revision in revisions_base_to_head(config):
        command.upgrade(config, revision)
        insert(*written[revision])
        assert_rows(revision)
    for revision in reversed(revisions_base_to_head(config)[:-1]):
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
    config = brownout_config(url)
    command.upgrade(config, "brownout_0003")
    insert = text(
        "INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason) VALUES (:m, 'q', 'a', '{}', :r)"
    )
    with engine.begin() as connection:
        for message_id, reason in (("m-1", "first"), ("m-2", "other"), ("m-1", "after a replay"), ("m-1", "third")):
            connection.execute(insert, {"m": message_id, "r": reason})
    command.upgrade(config, "brownout_0004")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT message_id, attempt, reason FROM dead_letters ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [
        ("m-1", 0, "first"),
        ("m-2", 0, "other"),
        ("m-1", 1, "after a replay"),
        ("m-1", 2, "third"),
    ]
    command.downgrade(config, "brownout_0003")
    upgrade_database(url)
    assert model_differences(engine) == []


def test_0007_makes_user_ids_text_and_back_while_every_one_is_a_number(url: str, engine: Engine) -> None:
    """Rows in the table: 0007 turns each user id into its decimal string (the list index kept); down turns
    them back only when every one is a bigint's decimal form, and otherwise refuses, changing nothing."""
    upgrade_database(url, "0006")
    insert = text(
        "INSERT INTO notifications (id, user_id, email, subject, body, created_at)"
        " VALUES (:id, :user, 'a@x.org', 's', 'b', now())"
    )
    numbers = [42, 7, 2**63 - 1]
    with engine.begin() as connection:
        for number in numbers:
            connection.execute(insert, {"id": uuid.uuid4(), "user": number})

    def user_ids() -> list[Any]:
        with engine.connect() as connection:
            return sorted(connection.execute(text("SELECT user_id FROM notifications")).scalars(), key=str)

    def user_id_type() -> str:
        column = next(c for c in inspect(engine).get_columns("notifications") if c["name"] == "user_id")
        return str(column["type"])

    command.upgrade(alembic_config(url), "0007")
    assert user_id_type() == "TEXT"
    assert user_ids() == sorted(str(number) for number in numbers)
    indexes = {index["name"]: index["column_names"] for index in inspect(engine).get_indexes("notifications")}
    assert indexes["notifications_user_recent"] == ["user_id", "created_at", "id"]

    command.downgrade(alembic_config(url), "0006")
    assert user_id_type() == "BIGINT"
    assert user_ids() == sorted(numbers, key=str)

    command.upgrade(alembic_config(url), "0007")
    for user in (str(uuid.uuid4()), "042", "9223372036854775808"):  # not a bigint's decimal form
        with engine.begin() as connection:
            row = connection.execute(insert, {"id": uuid.uuid4(), "user": user})
        with pytest.raises(RuntimeError, match="1 notification"):
            command.downgrade(alembic_config(url), "0006")
        assert user_id_type() == "TEXT" and versions(engine)["alembic_version"] == ["0007"]
        with engine.begin() as connection:
            row = connection.execute(text("DELETE FROM notifications WHERE user_id = :user"), {"user": user})
            assert row.rowcount == 1
    command.downgrade(alembic_config(url), "0006")
    assert user_ids() == sorted(numbers, key=str)


@pytest.fixture(scope="module")
def previous_migrations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single history that created the service's and Brownout's tables together, as deployed before."""
    return previous_layout.extract(tmp_path_factory.mktemp("previous")) / "app" / "migrations"


def previous_config(url: str, migrations: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations))
    config.attributes["database_url"] = url
    return config


def versions(engine: Engine) -> dict[str, list[str]]:
    with engine.connect() as connection:
        tables = set(inspect(connection).get_table_names())
        return {
            table: list(connection.execute(text(f"SELECT version_num FROM {table}")).scalars())
            for table in sorted(VERSION_TABLES & tables)
        }


@pytest.mark.parametrize("revision", ["0003", "0006"])
def test_a_database_migrated_by_the_shared_history_is_adopted_not_recreated(
    revision: str, url: str, engine: Engine, previous_migrations: Path
) -> None:
    """A database migrated before Brownout had its own history: Brownout's history is stamped at the revision
    that built the same tables, then upgraded from there; no table is re-created and every row stays."""
    command.upgrade(previous_config(url, previous_migrations), revision)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO notifications (id, user_id, email, subject, body, created_at)"
                " VALUES (:id, 1, 'a@x.org', 's', 'b', now())"
            ),
            {"id": uuid.uuid4()},
        )
        connection.execute(
            text(
                "INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason) VALUES ('m', 'q', 'a', '{}', 'r')"
            )
        )
        oid_before = connection.execute(text("SELECT 'dead_letters'::regclass::oid")).scalar_one()
    upgrade_database(url)
    head = revisions_base_to_head()[-1]
    assert versions(engine) == {"alembic_version": [head], brownout_migrations.VERSION_TABLE: ["brownout_0007"]}
    assert model_differences(engine) == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM notifications")).scalar_one() == 1
        assert connection.execute(text("SELECT reason FROM dead_letters")).scalars().all() == ["r"]
        assert connection.execute(text("SELECT 'dead_letters'::regclass::oid")).scalar_one() == oid_before


def test_the_service_history_alone_refuses_a_database_brownout_has_not_adopted(
    url: str, engine: Engine, previous_migrations: Path
) -> None:
    """Run first, the service's history would move `alembic_version` past the revision Brownout's adoption
    reads: it refuses, and changes nothing."""
    command.upgrade(previous_config(url, previous_migrations), "0003")
    with pytest.raises(SystemExit, match="brownout migrate"):
        command.upgrade(alembic_config(url), "head")
    assert versions(engine) == {"alembic_version": ["0003"]}


def test_brownout_tables_with_an_unknown_history_are_refused(url: str, engine: Engine) -> None:
    command.upgrade(brownout_config(url), "head")
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE {brownout_migrations.VERSION_TABLE}"))
        connection.execute(text("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)"))
        connection.execute(text("INSERT INTO alembic_version VALUES ('a1b2c3d4')"))
    with pytest.raises(SystemExit, match="'a1b2c3d4'"):
        upgrade_database(url)
    assert versions(engine) == {"alembic_version": ["a1b2c3d4"]}
