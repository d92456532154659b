"""Entry point of the worker dyno: `dramatiq worker.main --processes 1 --threads 8`.

The Dramatiq CLI imports this module in each worker process, so this is the
one place that reads the environment, builds the broker (confirm_delivery on,
bounded queues identical to the publisher's) and sets it before the actor is
declared. Nothing else in worker/ or app/ touches Dramatiq's global broker.
"""

from __future__ import annotations

import logging

import dramatiq

from app.db import Database
from app.dispatch.queues import BrownoutRabbitmqBroker
from app.settings import load_settings
from worker.assembly import build_worker_broker


def _start() -> tuple[BrownoutRabbitmqBroker, Database]:
    logging.getLogger("pika").setLevel(logging.WARNING)
    settings = load_settings()
    database = Database.from_settings(settings)
    broker = build_worker_broker(settings, database)
    dramatiq.set_broker(broker)
    return broker, database


broker, database = _start()
