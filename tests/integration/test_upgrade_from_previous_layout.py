"""An upgrade as a deployment lives it: the previous release's code migrated the database and queued writes
while the database was refused; the new release migrates (adopting Brownout's tables into their own
history) and its worker dyno drains the queue. Every write is applied exactly once, in order per entity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout._dispatch.envelope import command_id_for
from brownout._settings import normalise_database_url
from tests.conftest import database_url
from tests.support import previous_layout
from tests.support.api_server import free_port
from tests.support.polling import wait_until
from tests.support.processes import stop
from tests.support.rabbit import RABBITMQ_URL, ready_count

WRITES = 12  # notifications created while the database was refused; every other one then marked read

# Runs under the previous layout (its own app/, worker/ and src/brownout/ first on sys.path): migrate the
# database to that release's head, apply one write directly, then queue the rest with the breaker open.
PREVIOUS_RELEASE_SCRIPT = """
import json, sys
import brownout
from app.dispatch.notifications import CREATE, MARK_READ, build_registry
from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout._dispatch.envelope import command_id_for
from brownout._db import Database
from brownout._dispatch.dispatcher import Applied, Dispatcher, Queued
from brownout._settings import load_settings

settings = load_settings()
upgrade_database(settings.database_url)
database = Database.from_settings(settings)
dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
note = lambda n: {"user_id": 100 + n, "email": f"user{n}@example.com", "subject": "s", "body": "b"}
direct = dispatcher.submit(CREATE, note(0), idempotency_key="direct")
assert isinstance(direct, Applied), direct
database.breaker.force_open()
created = []
for n in range(1, int(sys.argv[1]) + 1):
    result = dispatcher.submit(CREATE, note(n), idempotency_key=f"create-{n}")
    assert isinstance(result, Queued), result
    created.append(str(result.id))
    if n % 2 == 0:
        mark = dispatcher.submit(MARK_READ, {"notification_id": str(result.id)}, idempotency_key=f"read-{n}")
        assert isinstance(mark, Queued), mark
dispatcher.close()
database.close()
print(json.dumps({"brownout": brownout.__file__, "created": created}))
"""


@pytest.fixture
def url(pg_database: str) -> str:
    return database_url(pg_database)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    built = create_engine(normalise_database_url(url))
    yield built
    built.dispose()


def settings_env(url: str, queue_name: str) -> dict[str, str]:
    return {
        "DATABASE_URL": url,
        "RABBITMQ_URL": RABBITMQ_URL,
        "BROWNOUT_QUEUE_NAME": queue_name,
        "BROWNOUT_EMAIL_QUEUE_NAME": f"{queue_name}-email",
        "BROWNOUT_METRICS_PORT": str(free_port()),
    }


def test_writes_queued_by_the_previous_release_are_applied_once_after_the_upgrade(
    url: str, engine: Engine, queue_name: str, tmp_path: Path
) -> None:
    tree = previous_layout.extract(tmp_path / "previous")
    before = subprocess.run(
        [sys.executable, "-c", PREVIOUS_RELEASE_SCRIPT, str(WRITES)],
        cwd=tree,
        env=previous_layout.environment(tree, settings_env(url, queue_name)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert before.returncode == 0, before.stderr[-3000:]
    published: dict[str, Any] = json.loads(before.stdout.strip().splitlines()[-1])
    assert Path(published["brownout"]).is_relative_to(tree), "the previous release's own code must have run"
    queued = WRITES + WRITES // 2
    assert wait_until(lambda: ready_count(queue_name) == queued, timeout=10)

    upgrade_database(url)  # the new release's release step, on the database the previous one left
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "brownout", "worker", "app.dispatch.notifications:build_registry"],
            cwd=previous_layout.REPOSITORY,
            env={key: value for key, value in os.environ.items() if not key.startswith("BROWNOUT_")}
            | settings_env(url, queue_name)
            | {"BROWNOUT_WORKER_PROCESSES": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        drained = wait_until(lambda: applied_count(engine) == 1 + queued and ready_count(queue_name) == 0, timeout=60)
        assert drained, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.5)  # a duplicate apply would show as a second row: give it the time to
    finally:
        stop(worker)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id::text, read FROM notifications")).all()
        per_key = connection.execute(text("SELECT idempotency_key, count(*) FROM applied_commands GROUP BY 1")).all()
        paths = connection.execute(text("SELECT path, count(*) FROM applied_commands GROUP BY 1")).all()
        users = connection.execute(text("SELECT id::text, user_id FROM notifications")).all()
        creations = connection.execute(
            text("SELECT idempotency_key, command_id FROM applied_commands WHERE name = :name"), {"name": CREATE}
        ).all()
    assert all(count == 1 for _, count in per_key) and len(per_key) == 1 + queued
    assert dict(paths) == {"direct": 1, "queued": queued}
    read = {ident: was_read for ident, was_read in rows}
    assert len(read) == 1 + WRITES
    assert [read[ident] for ident in published["created"]] == [n % 2 == 0 for n in range(1, WRITES + 1)]
    # The previous release queued `"user_id": 100 + n` (an int); the rows hold its decimal string, and the
    # ids the new code derives from the string are those the previous one derived from the int.
    by_id = dict(users)
    assert [by_id[ident] for ident in published["created"]] == [str(100 + n) for n in range(1, WRITES + 1)]
    assert dict(creations) == {key: new_command_id(n, key) for n, key in enumerate(["direct", *published_keys()])}


def published_keys() -> list[str]:
    return [f"create-{n}" for n in range(1, WRITES + 1)]


def new_command_id(n: int, key: str) -> uuid.UUID:
    """The command id this release gives the previous script's note *n* with its user id as a string."""
    command = build_registry().get(CREATE)
    payload = {"user_id": str(100 + n), "email": f"user{n}@example.com", "subject": "s", "body": "b"}
    return command_id_for(CREATE, command.scope(command.parse(1, payload)), key)


def applied_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM applied_commands")).scalar_one())
