"""Assemble the worker's broker: middleware and actors, from explicit settings and database.

Used by brownout._worker.main (the dyno's entry point) and by benchmarks and tests that
run the production worker in-process. Importing it reads nothing and connects
nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from dramatiq.middleware import CurrentMessage, Middleware, Retries, TimeLimit

from brownout._cache.redis_link import build_redis_link
from brownout._db import Database
from brownout._dispatch.commands import Registry
from brownout._dispatch.queues import BrownoutRabbitmqBroker
from brownout._dispatch.waiting import WaitLimits
from brownout._fleet.read_only import WriteMode
from brownout._observability.metrics import Metrics
from brownout._settings import Settings
from brownout._worker.actors import APPLY_BATCH_ACTOR, ApplyRuntime, declare_apply_actor
from brownout._worker.drain import AdaptiveDrain
from brownout._worker.email import EmailRuntime, declare_email_actor
from brownout._worker.health_gate import HealthGate
from brownout._worker.metrics import WorkerMetrics
from brownout._worker.outbox import OutboxRelayMiddleware
from brownout._worker.override import FollowOperator


def dramatiq_middleware() -> list[Middleware]:
    """Dramatiq's defaults minus the ones whose message options nobody here sets.

    Why: every middleware's hooks run for every message, no-ops included (`Broker.emit_*`
    calls each one); AgeLimit (`max_age`), Callbacks (`on_success`/`on_failure`), Pipelines
    (`pipe_target`, which also imports a module per message) and ShutdownNotifications
    (`notify_shutdown`) act only on options that neither the publisher nor these actors
    use. TimeLimit (a stuck apply is interrupted) and Retries (`throws`, the backoff
    options) are kept."""
    return [TimeLimit(), Retries()]


def build_worker_broker(
    settings: Settings, database: Database, *, registry: Registry, metrics: Metrics | None = None
) -> BrownoutRabbitmqBroker:
    """The worker's broker with its middleware and actors, applying *registry*'s commands; connects nothing until consumed.

    With *metrics*, database calls, breaker transitions, health checks and outcomes are counted,
    and served on BROWNOUT_METRICS_PORT by a process Dramatiq forks."""
    if not settings.rabbitmq_url:
        raise SystemExit("brownout worker: RABBITMQ_URL is required")
    broker = BrownoutRabbitmqBroker(
        url=settings.rabbitmq_urls,
        max_length=settings.queue_max_length,
        queue_type=settings.queue_type,
        delivery_limit=settings.queue_delivery_limit,
        middleware=dramatiq_middleware(),
    )
    broker.add_middleware(CurrentMessage())
    mode = WriteMode.from_settings(settings)  # no automatic state here: the worker has no queue of its own to ask
    gate = HealthGate.for_database(
        database,
        base_seconds=settings.worker_gate_base_seconds,
        cap_seconds=settings.worker_gate_cap_seconds,
        timeout=settings.health_timeout_seconds,
        hold=lambda: mode.refusing,
    )
    mode.add_listener(lambda state: gate.check_now())  # the gate pauses or resumes within one poll of the switch
    if metrics is not None:
        mode.add_listener(lambda state: metrics.observe_mode(state.metric_state))
    override_link = build_redis_link(settings)
    if override_link is not None:  # before the gate: the standing records apply before its first check
        follow = FollowOperator(
            override_link, database.breaker, gate=gate, mode=mode, poll_seconds=settings.override_poll_seconds
        )
        broker.add_middleware(follow)
    broker.add_middleware(gate)
    drain = AdaptiveDrain.for_database(
        database,
        min_concurrency=settings.worker_min_concurrency,
        max_concurrency=settings.worker_max_concurrency,
        latency_target=settings.worker_latency_target_seconds,
        actor_names={APPLY_BATCH_ACTOR},
    )
    broker.add_middleware(drain)
    after_apply = registry.after_apply(settings) if registry.after_apply is not None else None
    runtime = ApplyRuntime(
        database=database,
        registry=registry,
        limits=WaitLimits(
            unknown_version_seconds=settings.worker_wait_unknown_version_hours * 3600,
            dependency_seconds=settings.worker_wait_dependency_minutes * 60,
        ),
        on_applied=after_apply,
        batch_max=settings.worker_batch_max,
        mode=mode,
    )
    if metrics is not None:
        metrics.attach_resilience(database.resilience)
        runtime.on_batch = metrics.worker_batch_size.observe
        exposition = WorkerMetrics(metrics, drain=drain, port=settings.metrics_port)
        broker.add_middleware(exposition)
        runtime.observe = exposition.observe
    declare_apply_actor(broker, runtime, queue_name=settings.queue_name)
    if settings.email_target_url:
        if settings.email_queue_name == settings.queue_name:
            raise SystemExit("brownout worker: BROWNOUT_EMAIL_QUEUE_NAME must differ from BROWNOUT_QUEUE_NAME")
        email = EmailRuntime.from_settings(settings, database)
        oldest: Callable[[float], None] | None = None
        if metrics is not None:
            email.on_outcome = lambda backend, outcome: metrics.emails.labels(backend, outcome).inc()
            oldest = metrics.outbox_oldest_unsent_age.set
        declare_email_actor(broker, email, queue_name=settings.email_queue_name)
        broker.add_middleware(OutboxRelayMiddleware.from_settings(settings, database, on_oldest_unsent=oldest))
    return broker
