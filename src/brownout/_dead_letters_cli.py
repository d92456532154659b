"""`brownout dead-letters list | show ID | replay ID | purge`: look at and recover dead letters."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by run(): building the parser (`brownout --help`) must stay cheap
    import random

    from brownout._db import Database
    from brownout._settings import Settings


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("dead-letters", help="list, show, replay or purge dead letters")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the newest dead letters")
    listing.add_argument("--limit", type=int, default=50)
    show = actions.add_parser("show", help="one dead letter, with its message")
    show.add_argument("id", type=int)
    replay = actions.add_parser("replay", help="publish the message again, its replay count one higher (once its cause is fixed)")
    replay.add_argument("id", type=int)
    purge = actions.add_parser("purge", help="delete dead letters older than the retention")
    purge.add_argument("--older-than-days", type=float, default=None, help="default: BROWNOUT_DEAD_LETTER_RETENTION_DAYS")


def run(args: argparse.Namespace, settings: Settings, database: Database, *, rng: random.Random | None = None) -> int:
    """Run one action; *rng* shuffles RabbitMQ's nodes for a replay (tests pass their own)."""
    from brownout._dispatch import dead_letters

    with database.session() as session:
        if args.action == "list":
            for row in dead_letters.listing(session, limit=args.limit):
                replayed = f" (replayed {row['replayed_at']:%Y-%m-%d %H:%M})" if row["replayed_at"] else ""
                print(f"#{row['id']} {row['failed_at']:%Y-%m-%d %H:%M:%S} {row['message_id']}{replayed}: {row['reason']}")
            return 0
        if args.action == "purge":
            days = args.older_than_days if args.older_than_days is not None else settings.dead_letter_retention_days
            print(f"brownout: purged {dead_letters.purge(session, older_than=timedelta(days=days))} dead letters")
            return 0
        found = dead_letters.fetch(session, args.id)
        if found is None:
            print(f"brownout: no dead letter #{args.id}")
            return 1
        if args.action == "show":
            print(json.dumps(found, indent=2, default=str))
            return 0
        return _replay(settings, session, found, rng=rng)


def _replay(settings: Settings, session: Any, row: dict[str, Any], *, rng: random.Random | None) -> int:
    from brownout._dispatch import dead_letters
    from brownout._dispatch.publisher import Publisher, PublishRejected

    if not settings.rabbitmq_url:
        print("brownout: RABBITMQ_URL is required to replay")
        return 2
    if dead_letters.kept_as_text(row):
        print(f"brownout: dead letter #{row['id']} was kept as text (PostgreSQL refused it as JSON): `show` prints it;"
              " publish a corrected message yourself")  # fmt: skip
        return 1
    message = dead_letters.for_replay(row)
    with Publisher(
        url=settings.rabbitmq_urls,
        queue_name=message.queue_name,
        max_length=settings.queue_max_length,
        queue_type=settings.queue_type,
        delivery_limit=settings.queue_delivery_limit,
        confirm_timeout=settings.publish_timeout_seconds,
        rng=rng,
    ) as publisher:
        try:
            publisher.publish(message, timeout=max(5.0, settings.publish_timeout_seconds))
        except PublishRejected as rejected:
            print(f"brownout: replay of #{row['id']} rejected ({rejected.reason}); nothing changed")
            return 1
    dead_letters.mark_replayed(session, row["id"])
    print(f"brownout: dead letter #{row['id']} published again to {message.queue_name}")
    return 0
