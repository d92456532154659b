"""Operator commands: `python -m app health | migrate | purge-applied | dead-letters ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import timedelta

from app.schema import upgrade_database
from brownout import _dead_letters_cli as dead_letters_cli
from brownout._db import Database, check_db_health
from brownout._dispatch.retention import purge_applied
from brownout._settings import ConfigurationError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    health = sub.add_parser("health", help="run SELECT 1 against DATABASE_URL and print the health report")
    health.add_argument(
        "--timeout", type=float, default=None, help="deadline in seconds (default: BROWNOUT_HEALTH_TIMEOUT_SECONDS)"
    )
    sub.add_parser(
        "migrate", help="alembic upgrade head against MIGRATION_DATABASE_URL or DATABASE_URL (the Procfile's release line)"
    )
    purge = sub.add_parser("purge-applied", help="delete applied idempotency keys older than the retention")
    purge.add_argument("--older-than-days", type=float, default=None, help="default: BROWNOUT_APPLIED_RETENTION_DAYS")
    dead_letters_cli.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"brownout: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        upgrade_database(settings.migration_database_url or settings.database_url)
        print("brownout: database schema is at head")
        return 0
    database = Database.from_settings(settings)
    try:
        with database.session() as db:
            if args.command == "dead-letters":
                return dead_letters_cli.run(args, settings, database)
            if args.command == "purge-applied":
                days = args.older_than_days if args.older_than_days is not None else settings.applied_retention_days
                removed = purge_applied(db, older_than=timedelta(days=days))
                print(f"brownout: purged {removed} applied-command records older than {days:g} days")
                return 0
            report = check_db_health(db, timeout=args.timeout or settings.health_timeout_seconds)
    finally:
        database.close()
    print(json.dumps(report, indent=2))
    return 0 if report["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
