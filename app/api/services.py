"""Everything one web process holds, built once at start-up from Settings and closed at shutdown."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.api.reads import NotificationReads
from app.api.writes import NotificationWrites, pending_item
from app.dispatch.notifications import build_registry
from brownout._cache.pending import PendingWrites
from brownout._cache.pending_replay import PendingReplay
from brownout._cache.read_cache import ReadCache
from brownout._cache.redis_link import RedisLink, build_redis_link
from brownout._db import CircuitOpenError, Database, DeadlineExceeded, HealthMonitor, execute_with_retry
from brownout._db.health_check import pool_figures
from brownout._dispatch.dead_letters import count_unreplayed
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.queue_depth import QueueDepth
from brownout._fleet.assembly import build_database, build_monitor, stop_breaker
from brownout._fleet.breaker_override import BreakerOverride
from brownout._observability.logs import DegradedModeLog
from brownout._observability.metrics import Metrics
from brownout._settings import Settings

log = logging.getLogger(__name__)

DEAD_LETTER_REFRESH_SECONDS = 15.0


@dataclass
class Services:
    settings: Settings
    database: Database
    dispatcher: Dispatcher
    monitor: HealthMonitor
    reads: NotificationReads
    writes: NotificationWrites
    link: RedisLink | None = None
    override: BreakerOverride | None = None
    queue_depth: QueueDepth | None = None
    replay: PendingReplay | None = None
    metrics: Metrics = field(default_factory=Metrics)
    _dead_letters_read_at: float = -1e9

    @classmethod
    def build(cls, settings: Settings, metrics: Metrics | None = None, *, clock: Callable[[], float] = time.time) -> Services:
        """*clock*: the wall clock of the cache's ages (tests age entries with a clock of their own)."""
        metrics = metrics or Metrics()
        link = build_redis_link(settings)
        database = build_database(settings, link=link)
        metrics.attach_resilience(database.resilience)
        database.breaker.add_listener(DegradedModeLog())
        metrics.queue_max_length.set(settings.queue_max_length)
        dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
        dispatcher.on_publisher_restart(metrics.publisher_restarts.inc)
        cache = pending = override = None
        if link is not None:
            cache = ReadCache(
                link, fresh_seconds=settings.cache_fresh_seconds, stale_seconds=settings.cache_stale_seconds, clock=clock
            )
            pending = PendingWrites(link, ttl_seconds=settings.pending_seconds, clock=clock)
            override = BreakerOverride(link, database.breaker, poll_seconds=settings.override_poll_seconds).start()
        monitor = build_monitor(settings, database, on_result=[metrics.observe_health]).start()
        queue_depth = None
        if settings.rabbitmq_url:
            queue_depth = QueueDepth(
                url=settings.rabbitmq_url, queue_name=settings.queue_name, timeout=settings.publish_timeout_seconds
            )
        reads = NotificationReads(
            database=database, cache=cache, pending=pending, deadline=settings.request_db_deadline_seconds, clock=clock
        )
        reads.on_read = lambda served: metrics.cache_reads.labels(served).inc()
        writes = NotificationWrites(
            dispatcher=dispatcher, link=link, cache=cache, pending=pending, key_seconds=settings.cache_stale_seconds
        )
        writes.on_outcome = lambda outcome: metrics.dispatch.labels(outcome).inc()
        replay = None
        if link is not None and pending is not None:
            replay = PendingReplay(link, writes.record_pending, pending_item).start()
            writes.replay = replay
            reads.unrecorded = replay.item
        return cls(
            settings=settings,
            database=database,
            dispatcher=dispatcher,
            monitor=monitor,
            reads=reads,
            writes=writes,
            link=link,
            override=override,
            queue_depth=queue_depth,
            metrics=metrics,
            replay=replay,
        )

    def refresh_gauges(self) -> None:
        """At scrape time: this process's pool, the queue depth (cached a few seconds), dead letters (15 s)."""
        self.metrics.observe_pool(pool_figures(self.database.engine))
        self.metrics.observe_budget(self.database.resilience)
        if self.queue_depth is not None:
            depth = self.queue_depth.read()
            if depth.get("ok"):
                self.metrics.queue_messages.set(depth["messages"])
                self.metrics.delay_queue_messages.set(depth.get("delayed", 0))
        now = time.monotonic()
        # Not while the breaker refuses: a scrape is no user call, it must not count as a refusal.
        due = now - self._dead_letters_read_at >= DEAD_LETTER_REFRESH_SECONDS
        if due and self.database.breaker.retry_after() == 0:
            self._dead_letters_read_at = now
            try:
                with self.database.session() as session:
                    count = execute_with_retry(
                        session,
                        lambda: count_unreplayed(session),
                        deadline=self.settings.request_db_deadline_seconds,
                        idempotent=True,
                    )
                self.metrics.dead_letters.set(count)
            except (CircuitOpenError, DeadlineExceeded):
                pass
            except Exception:
                log.warning("dead letters not counted", exc_info=True)

    def close(self) -> None:
        self.metrics.mark_process_dead()
        steps = (self.monitor.stop, self.override.stop if self.override else None, self.replay.stop if self.replay else None)
        for step in (*steps, self.dispatcher.close):
            if step is None:
                continue
            try:
                step()
            except Exception:
                log.exception("shutdown step failed")
        if self.link is not None:
            self.link.close()
        stop_breaker(self.database.breaker)
        self.database.close()
