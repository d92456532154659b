"""`brownout`: run a service's web and worker dynos, migrate Brownout's tables, look after its write path.

    brownout web myservice.main:app          uvicorn, BROWNOUT_WEB_PROCESSES processes on $PORT
    brownout worker myservice.commands:registry
                                             Dramatiq applying queued writes (and sending emails)
    brownout migrate                         Brownout's own tables (before the service's migrations)
    brownout health                          SELECT 1 against DATABASE_URL, as JSON
    brownout dead-letters list|show|replay|purge
    brownout purge-applied                   applied idempotency keys past their retention
    brownout keys new NAME SCOPES            a service key, and its BROWNOUT_API_KEYS entry

Settings come from the environment (DATABASE_URL, RABBITMQ_URL, REDIS_URL, BROWNOUT_*). Uvicorn,
Dramatiq and Alembic are imported by the command that uses them, so `--help` and `--version` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from brownout import __version__

THREADS = 8  # Dramatiq threads per worker process
WORKER_SHUTDOWN_TIMEOUT_MS = 10_000  # SIGTERM: in-flight applies get this long, the rest goes back to RabbitMQ
WEB_GRACEFUL_SHUTDOWN_SECONDS = 10
WEB_HTTP_PROTOCOL = "brownout.fastapi._head_limit:HeadLimitedHttpToolsProtocol"


def import_string(value: str) -> str:
    """An argparse type: `module:attribute`, checked for shape only (the import happens where it runs)."""
    module, _, attribute = value.partition(":")
    if not module or not attribute or not all(part.isidentifier() for part in (*module.split("."), *attribute.split("."))):
        raise argparse.ArgumentTypeError(f"{value!r}: expected module:attribute, e.g. myservice.main:app")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brownout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"brownout {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    web = sub.add_parser("web", help="serve an ASGI app with uvicorn (the web dyno)")
    web.add_argument("app", type=import_string, metavar="APP", help="the app, module:attribute (e.g. myservice.main:app)")
    web.add_argument("--factory", action="store_true", help="APP is a function that returns the app")
    web.add_argument("--host", default="0.0.0.0", help="default: 0.0.0.0")  # noqa: S104 - a dyno serves on every interface, the platform routes to it; --host narrows it
    web.add_argument("--port", type=int, default=None, help="default: $PORT, else 8000")
    web.add_argument("--processes", type=int, default=None, help="default: BROWNOUT_WEB_PROCESSES")
    web.set_defaults(run=_web)

    worker = sub.add_parser("worker", help="apply queued writes with Dramatiq (the worker dyno)")
    worker.add_argument(
        "commands",
        type=import_string,
        nargs="?",
        metavar="COMMANDS",
        help="the command registry, module:attribute (a Registry or a function returning one); default: BROWNOUT_COMMANDS",
    )
    worker.add_argument("--processes", type=int, default=None, help="default: BROWNOUT_WORKER_PROCESSES")
    worker.add_argument("--threads", type=int, default=THREADS, help=f"per process (default: {THREADS})")
    worker.set_defaults(run=_worker)

    migrate = sub.add_parser("migrate", help="upgrade Brownout's own tables (MIGRATION_DATABASE_URL, else DATABASE_URL)")
    migrate.set_defaults(run=_migrate)

    health = sub.add_parser("health", help="run SELECT 1 against DATABASE_URL and print the health report")
    health.add_argument("--timeout", type=float, default=None, help="seconds (default: BROWNOUT_HEALTH_TIMEOUT_SECONDS)")
    health.set_defaults(run=_with_database(_health))

    purge = sub.add_parser("purge-applied", help="delete applied idempotency keys older than the retention")
    purge.add_argument("--older-than-days", type=float, default=None, help="default: BROWNOUT_APPLIED_RETENTION_DAYS")
    purge.set_defaults(run=_with_database(_purge_applied))

    keys = sub.add_parser("keys", help="service keys (BROWNOUT_API_KEYS)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = keys_sub.add_parser("new", help="make a key: prints the key (line 1) and its BROWNOUT_API_KEYS entry (line 2)")
    new.add_argument("name", metavar="NAME", help="the caller's name, as logs and metrics will show it (e.g. orders)")
    new.add_argument("scopes", metavar="SCOPES", help="write, read, metrics, admin, joined by + (e.g. write+read)")
    new.set_defaults(run=_keys_new, needs_settings=False)

    from brownout import _dead_letters_cli

    _dead_letters_cli.add_parser(sub)
    sub.choices["dead-letters"].set_defaults(run=_with_database(_dead_letters_cli.run))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace, Any], int] = args.run
    if not getattr(args, "needs_settings", True):
        return run(args, None)
    settings = _settings()
    if settings is None:
        return 2
    return run(args, settings)


def _settings() -> Any:
    from brownout._settings import ConfigurationError, load_settings

    try:
        return load_settings()
    except ConfigurationError as exc:
        print(f"brownout: {exc}", file=sys.stderr)
        return None


def _prepare_dyno(settings: Any, metrics_prefix: str) -> None:
    from brownout import _metrics_dir
    from brownout._observability.logs import configure_logging
    from brownout._pool_budget import warn_if_over_budget

    configure_logging(settings)
    warn_if_over_budget(settings)  # the whole fleet's pools against the pooler's limit, said once per dyno
    _metrics_dir.prepare(metrics_prefix)  # before any process imports prometheus_client


def _keys_new(args: argparse.Namespace, settings: Any) -> int:
    from brownout._auth.keys import entry_for, new_key

    key = new_key()
    try:
        entry = entry_for(args.name, key, args.scopes.split("+"))
    except ValueError as exc:
        print(f"brownout keys new: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(entry)
    print(
        f"brownout: line 1 is {args.name}'s key: give it to that caller, it is shown once and kept nowhere; "
        "line 2 goes into BROWNOUT_API_KEYS (comma-separated with the other entries)",
        file=sys.stderr,
    )
    return 0


def _web(args: argparse.Namespace, settings: Any) -> int:
    from brownout._settings import ConfigurationError
    from brownout.fastapi._auth import Authenticator

    try:
        Authenticator(settings).check()  # here, so the dyno stops with one line instead of in each uvicorn process
    except ConfigurationError as exc:
        print(f"brownout web: {exc}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else int(os.environ.get("PORT", "8000"))
    processes = args.processes or settings.web_processes
    _prepare_dyno(settings, "brownout-web-metrics-")
    argv = [
        sys.executable, "-m", "uvicorn", args.app, *(["--factory"] if args.factory else []),
        "--host", args.host, "--port", str(port), "--workers", str(processes),
        "--proxy-headers", "--timeout-graceful-shutdown", str(WEB_GRACEFUL_SHUTDOWN_SECONDS), "--no-server-header",
        # httptools with a bound on the whole request head (431 past it), which uvicorn gives only h11
        "--http", WEB_HTTP_PROTOCOL, "--h11-max-incomplete-event-size", str(settings.max_head_bytes),
        *([] if settings.access_log else ["--no-access-log"]),
    ]  # fmt: skip
    os.execv(sys.executable, argv)  # noqa: S606 - becomes our own interpreter with a fixed argv, no shell
    return 0  # not reached


def _worker(args: argparse.Namespace, settings: Any) -> int:
    from brownout._dispatch.commands import RegistryNotFound, load_registry

    spec = args.commands or settings.commands
    if not spec:
        print("brownout worker: name the command registry (COMMANDS, or BROWNOUT_COMMANDS)", file=sys.stderr)
        return 2
    sys.path.insert(0, os.getcwd())  # as Dramatiq's own --path ".": the service's package from where it runs
    try:
        load_registry(spec)  # here, so a typo stops the dyno with its reason instead of in each worker process
    except RegistryNotFound as exc:
        print(f"brownout worker: {exc}", file=sys.stderr)
        return 2
    if settings.email_target_url:
        from brownout._worker.email_url import parse_email_url

        try:
            parse_email_url(settings.email_target_url)  # here too: a refused EMAIL_URL stops the dyno with its reason
        except ValueError as exc:
            print(f"brownout worker: {exc}", file=sys.stderr)
            return 2
    os.environ["BROWNOUT_COMMANDS"] = spec
    processes = args.processes or settings.worker_processes
    _prepare_dyno(settings, "brownout-worker-metrics-")
    argv = [
        sys.executable, "-m", "dramatiq", "brownout._worker.main",
        "--processes", str(processes), "--threads", str(args.threads),
        "--worker-shutdown-timeout", str(WORKER_SHUTDOWN_TIMEOUT_MS), "--skip-logging",
        "--queues", settings.queue_name, settings.email_queue_name,
    ]  # fmt: skip
    _lower_priority(settings.worker_nice)
    os.execv(sys.executable, argv)  # noqa: S606 - becomes our own interpreter with a fixed argv, no shell
    return 0  # not reached


def _lower_priority(nice: int) -> None:
    """At least *nice* for this process and the worker processes it becomes (inherited), never less than it had:
    on a machine it shares with web processes, the web answers first and the backlog drains on what is left
    (a drain signal fed by the web's latency would need the two to talk; the kernel's scheduler already knows)."""
    current = os.nice(0)
    if nice > current:
        os.nice(nice - current)
    # With the kernel's autogroups (on by default), the CPU is shared fairly between sessions first and a nice
    # value counts only within its session: a worker in a session of its own (a container's first process,
    # a process manager's child) must lower its session's group too. Only as the session's leader, so a web
    # process sharing the session is never slowed with it.
    if nice > 0 and os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError):  # no autogroups (or no /proc): the nice value above is all there is
            Path("/proc/self/autogroup").write_text(str(nice))


def _migrate(args: argparse.Namespace, settings: Any) -> int:
    from sqlalchemy.exc import DBAPIError

    from brownout import migrations
    from brownout._db.errors import describe

    try:
        migrations.upgrade(settings.migration_database_url or settings.database_url)
    except DBAPIError as exc:  # the database said no (a wrong name, a password, a refused link): one line
        print(f"brownout: migration failed: {describe(exc)}", file=sys.stderr)
        return 1
    print("brownout: Brownout's tables are at head")
    return 0


def _with_database(command: Callable[[argparse.Namespace, Any, Any], int]) -> Callable[[argparse.Namespace, Any], int]:
    def run(args: argparse.Namespace, settings: Any) -> int:
        from brownout._db import Database

        database = Database.from_settings(settings)
        try:
            return command(args, settings, database)
        finally:
            database.close()

    return run


def _health(args: argparse.Namespace, settings: Any, database: Any) -> int:
    from brownout._db import check_db_health

    with database.session() as session:
        report = check_db_health(session, timeout=args.timeout or settings.health_timeout_seconds)
    print(json.dumps(report, indent=2))
    return 0 if report["healthy"] else 1


def _purge_applied(args: argparse.Namespace, settings: Any, database: Any) -> int:
    from brownout._dispatch.retention import purge_applied

    days = args.older_than_days if args.older_than_days is not None else settings.applied_retention_days
    with database.session() as session:
        removed = purge_applied(session, older_than=timedelta(days=days))
    print(f"brownout: purged {removed} applied-command records older than {days:g} days")
    return 0
