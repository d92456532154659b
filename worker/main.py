"""Entry point of the worker dyno: `dramatiq worker.main --processes 1 --threads 8`.

The Dramatiq CLI imports this module in each worker process, so this is the
one place that reads the environment, builds the broker (confirm_delivery on,
bounded queues identical to the publisher's) and sets it before the actor is
declared. Nothing else in worker/ or app/ touches Dramatiq's global broker.
"""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.middleware import CurrentMessage

from app.db import Database
from app.dispatch.envelope import APPLY_ACTOR
from app.dispatch.notifications import build_registry
from app.dispatch.queues import BrownoutRabbitmqBroker
from app.settings import Settings, load_settings
from worker.actors import ApplyRuntime, declare_apply_actor
from worker.drain import AdaptiveDrain
from worker.email import EmailRuntime, declare_email_actor
from worker.health_gate import HealthGate
from worker.outbox import OutboxRelayMiddleware


def build_broker(settings: Settings) -> BrownoutRabbitmqBroker:
    if not settings.rabbitmq_url:
        raise SystemExit("brownout worker: RABBITMQ_URL is required")
    broker = BrownoutRabbitmqBroker(url=settings.rabbitmq_url, max_length=settings.queue_max_length)
    broker.add_middleware(CurrentMessage())
    return broker


def _start() -> tuple[BrownoutRabbitmqBroker, Database]:
    logging.getLogger("pika").setLevel(logging.WARNING)
    settings = load_settings()
    broker = build_broker(settings)
    dramatiq.set_broker(broker)
    database = Database.from_settings(settings)
    broker.add_middleware(
        HealthGate.for_database(
            database,
            base_seconds=settings.worker_gate_base_seconds,
            cap_seconds=settings.worker_gate_cap_seconds,
            timeout=settings.health_timeout_seconds,
        )
    )
    broker.add_middleware(
        AdaptiveDrain.for_database(
            database,
            min_concurrency=settings.worker_min_concurrency,
            max_concurrency=settings.worker_max_concurrency,
            latency_target=settings.worker_latency_target_seconds,
            actor_names={APPLY_ACTOR},
        )
    )
    declare_apply_actor(broker, ApplyRuntime(database=database, registry=build_registry()), queue_name=settings.queue_name)
    if settings.smtp_url:
        if settings.email_queue_name == settings.queue_name:
            raise SystemExit("brownout worker: BROWNOUT_EMAIL_QUEUE_NAME must differ from BROWNOUT_QUEUE_NAME")
        declare_email_actor(broker, EmailRuntime.from_settings(settings, database), queue_name=settings.email_queue_name)
        broker.add_middleware(OutboxRelayMiddleware.from_settings(settings, database))
    return broker, database


broker, database = _start()
