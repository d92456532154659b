"""`python -m app migrate`: Brownout's migrations, then this service's (the Procfile's release line).

Every other operator command is Brownout's own: `brownout --help`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from app.schema import upgrade_database
from brownout import ConfigurationError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="Brownout's and this service's migrations, against MIGRATION_DATABASE_URL or DATABASE_URL")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"brownout: {exc}", file=sys.stderr)
        return 2
    upgrade_database(settings.migration_database_url or settings.database_url)
    print("brownout: database schema is at head")
    return 0


if __name__ == "__main__":
    sys.exit(main())
