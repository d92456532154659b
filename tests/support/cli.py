"""The dead-letters command, run in-process with a test's settings and database (as `brownout dead-letters` runs it)."""

from __future__ import annotations

import argparse
from typing import Any

from brownout._db import Database


def dead_letters_cli_run(settings: Any, db: Database, argv: list[str]) -> int:
    from brownout import _dead_letters_cli as dead_letters_cli

    parser = argparse.ArgumentParser()
    dead_letters_cli.add_parser(parser.add_subparsers(dest="command"))
    return dead_letters_cli.run(parser.parse_args(argv), settings, db)
