"""The `brownout` command, as an operator runs it: a real process, the environment, a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from brownout import __version__
from brownout._dispatch.commands import Registry, RegistryNotFound, load_registry
from brownout._settings import normalise_database_url
from tests.conftest import database_url

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("web", "worker", "migrate", "health", "dead-letters", "purge-applied")


def brownout(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("BROWNOUT_") and key != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "brownout", *argv],
        cwd=ROOT,
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_every_command_and_needs_no_settings() -> None:
    result = brownout("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_version() -> None:
    result = brownout("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"brownout {__version__}"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["worker", "--help"]])
def test_version_and_help_load_none_of_the_heavy_dependencies(argv: list[str]) -> None:
    """They answer at once: no SQLAlchemy, Dramatiq, pika, pydantic or redis behind them."""
    probe = (
        "import sys\n"
        "from brownout.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('sqlalchemy', 'dramatiq', 'pika', 'pydantic', 'redis')\n"
        "print('loaded:', sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip().splitlines()[-1] == "loaded: []"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_and_starts_nothing(command: str) -> None:
    result = brownout(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: brownout {command}")


def test_an_app_that_is_not_an_import_string_is_refused_before_anything_starts() -> None:
    result = brownout("web", "app/api/main.py")
    assert result.returncode == 2
    assert "expected module:attribute" in result.stderr


def test_a_missing_setting_is_named() -> None:
    result = brownout("health")
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        ((), "name the command registry"),
        (("nosuch.module:registry",), "cannot import nosuch.module"),
        (("app.dispatch.notifications:nothing",), "has no attribute 'nothing'"),
        (("app.dispatch.notifications:CREATE",), "not a brownout Registry"),
    ],
)
def test_the_worker_refuses_commands_it_cannot_find(pg_database: str, argv: tuple[str, ...], reason: str) -> None:
    result = brownout("worker", *argv, env={"DATABASE_URL": database_url(pg_database), "RABBITMQ_URL": "amqp://127.0.0.1"})
    assert result.returncode == 2
    assert reason in result.stderr


def test_load_registry_takes_a_registry_or_a_function_returning_one() -> None:
    assert isinstance(load_registry("app.dispatch.notifications:build_registry"), Registry)
    with pytest.raises(RegistryNotFound, match="expected module:attribute"):
        load_registry("app.dispatch.notifications")


def test_migrate_creates_brownout_tables_only_and_health_and_purge_run(pg_database: str) -> None:
    env = {"DATABASE_URL": database_url(pg_database)}
    migrated = brownout("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    engine = create_engine(normalise_database_url(database_url(pg_database)))
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"applied_commands", "dead_letters", "outbox", "brownout_alembic_version"} <= tables
    assert "notifications" not in tables and "alembic_version" not in tables
    health = brownout("health", env=env)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["healthy"] is True
    purged = brownout("purge-applied", env=env)
    assert purged.returncode == 0 and "purged 0 applied-command records" in purged.stdout
    listed = brownout("dead-letters", "list", env=env)
    assert listed.returncode == 0, listed.stderr


def test_the_worker_refuses_a_password_sent_in_clear_before_starting(pg_database: str) -> None:
    env = {
        "DATABASE_URL": database_url(pg_database),
        "RABBITMQ_URL": "amqp://127.0.0.1",
        "SMTP_URL": "smtp://app:hunter2@mail.example.com:25",
    }
    result = brownout("worker", "app.dispatch.notifications:build_registry", env=env)
    assert result.returncode == 2 and "in clear" in result.stderr and "hunter2" not in result.stderr


@pytest.mark.parametrize(
    ("email", "says"),
    [
        ({"EMAIL_URL": "resend://re_Cli7secretKey0123?base_url=http://mail.example.com"}, "in clear"),
        ({"EMAIL_URL": "postmark://re_Cli7secretKey0123/email"}, "nothing but the query"),
        ({"EMAIL_URL": "resend://re_Cli7secretKey0123", "SMTP_URL": "smtp://127.0.0.1:25"}, "both set"),
    ],
)
def test_the_worker_refuses_an_unusable_email_url_before_starting(pg_database: str, email: dict[str, str], says: str) -> None:
    env = {"DATABASE_URL": database_url(pg_database), "RABBITMQ_URL": "amqp://127.0.0.1", **email}
    result = brownout("worker", "app.dispatch.notifications:build_registry", env=env)
    assert result.returncode == 2 and says in result.stderr and "re_Cli7secretKey0123" not in result.stderr, result.stderr


def test_migrate_against_a_database_that_does_not_exist_says_so_in_one_line() -> None:
    env = {"DATABASE_URL": database_url("no_such_database_here")}
    failed = brownout("migrate", env=env)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr, failed.stderr  # it was a 130-line traceback
    assert failed.stderr.strip().splitlines() == [
        'brownout: migration failed: OperationalError: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  database "no_such_database_here" does not exist'
    ]
