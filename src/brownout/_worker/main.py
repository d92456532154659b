"""Entry point of each worker process: `dramatiq brownout._worker.main ...`, as `brownout worker` runs it.

The Dramatiq CLI imports this module in each worker process, so this is the
one place that reads the environment, builds the broker (confirm_delivery on,
bounded queues identical to the publisher's) and sets it before the actor is
declared. Nothing else in Brownout touches Dramatiq's global broker.
"""

from __future__ import annotations

import dramatiq

from brownout._db import Database
from brownout._dispatch.commands import RegistryNotFound, load_registry
from brownout._dispatch.queues import BrownoutRabbitmqBroker
from brownout._fleet.assembly import build_database, build_monitor
from brownout._fleet.shared_breaker import SharedBreaker
from brownout._observability.logs import configure_logging
from brownout._observability.metrics import Metrics
from brownout._observability.sentry import init_sentry
from brownout._settings import load_settings
from brownout._worker.assembly import build_worker_broker


def _start() -> tuple[BrownoutRabbitmqBroker, Database]:
    settings = load_settings()
    configure_logging(settings)
    if not settings.commands:
        raise SystemExit("brownout worker: BROWNOUT_COMMANDS (module:attribute of the command registry) is required")
    try:
        registry = load_registry(settings.commands)
    except RegistryNotFound as exc:
        raise SystemExit(f"brownout worker: BROWNOUT_COMMANDS={exc}") from None
    database = build_database(settings)
    init_sentry(settings, breaker=database.breaker, component="worker")
    metrics = Metrics()
    broker = build_worker_broker(settings, database, registry=registry, metrics=metrics)
    dramatiq.set_broker(broker)
    if isinstance(database.breaker, SharedBreaker) and database.breaker.probe_gated:
        # Probe-gated recovery needs someone's health checks: a fleet of workers alone must recover too.
        build_monitor(settings, database, on_result=[metrics.observe_health]).start()
    return broker, database


broker, database = _start()
