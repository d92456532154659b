"""Entry point of each worker process: `dramatiq worker.main ...`, as `python -m worker.serve` runs it.

The Dramatiq CLI imports this module in each worker process, so this is the
one place that reads the environment, builds the broker (confirm_delivery on,
bounded queues identical to the publisher's) and sets it before the actor is
declared. Nothing else in worker/ or app/ touches Dramatiq's global broker.
"""

from __future__ import annotations

import dramatiq

from app.db import Database
from app.dispatch.queues import BrownoutRabbitmqBroker
from app.observability.logs import configure_logging
from app.observability.metrics import Metrics
from app.observability.sentry import init_sentry
from app.settings import load_settings
from worker.assembly import build_worker_broker


def _start() -> tuple[BrownoutRabbitmqBroker, Database]:
    settings = load_settings()
    configure_logging(settings)
    database = Database.from_settings(settings)
    init_sentry(settings, breaker=database.breaker, component="worker")
    broker = build_worker_broker(settings, database, metrics=Metrics())
    dramatiq.set_broker(broker)
    return broker, database


broker, database = _start()
