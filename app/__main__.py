"""`python -m app health`: check the configured database once and print the result as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from app.db import Database, check_db_health
from app.settings import ConfigurationError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    health = sub.add_parser("health", help="run SELECT 1 against DATABASE_URL and print the health report")
    health.add_argument(
        "--timeout", type=float, default=None, help="deadline in seconds (default: BROWNOUT_HEALTH_TIMEOUT_SECONDS)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"brownout: {exc}", file=sys.stderr)
        return 2
    database = Database.from_settings(settings)
    try:
        with database.session() as db:
            report = check_db_health(db, timeout=args.timeout or settings.health_timeout_seconds)
    finally:
        database.close()
    print(json.dumps(report, indent=2))
    return 0 if report["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
