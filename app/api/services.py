"""Everything one web process holds, built once at start-up from Settings and closed at shutdown."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from app.api.breaker_override import BreakerOverride
from app.api.reads import NotificationReads
from app.api.writes import NotificationWrites
from app.cache.pending import PendingWrites
from app.cache.read_cache import ReadCache
from app.cache.redis_link import RedisLink, build_redis_link
from app.db import Database, HealthMonitor
from app.dispatch.dispatcher import Dispatcher
from app.dispatch.queue_depth import QueueDepth
from app.settings import Settings

log = logging.getLogger(__name__)


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
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        database = Database.from_settings(settings)
        dispatcher = Dispatcher.from_settings(settings, database)
        link = build_redis_link(settings)
        cache = pending = override = None
        if link is not None:
            cache = ReadCache(link, fresh_seconds=settings.cache_fresh_seconds, stale_seconds=settings.cache_stale_seconds)
            pending = PendingWrites(link, ttl_seconds=settings.pending_seconds)
            override = BreakerOverride(link, database.breaker, poll_seconds=settings.override_poll_seconds).start()
        monitor = HealthMonitor(
            database.session, interval=settings.health_interval_seconds, timeout=settings.health_timeout_seconds
        ).start()
        queue_depth = None
        if settings.rabbitmq_url:
            queue_depth = QueueDepth(
                url=settings.rabbitmq_url, queue_name=settings.queue_name, timeout=settings.publish_timeout_seconds
            )
        return cls(
            settings=settings,
            database=database,
            dispatcher=dispatcher,
            monitor=monitor,
            reads=NotificationReads(
                database=database, cache=cache, pending=pending, deadline=settings.request_db_deadline_seconds
            ),
            writes=NotificationWrites(
                dispatcher=dispatcher, link=link, cache=cache, pending=pending, key_seconds=settings.cache_stale_seconds
            ),
            link=link,
            override=override,
            queue_depth=queue_depth,
        )

    def close(self) -> None:
        for step in (self.monitor.stop, self.override.stop if self.override else None, self.dispatcher.close):
            if step is None:
                continue
            try:
                step()
            except Exception:
                log.exception("shutdown step failed")
        if self.link is not None:
            self.link.close()
        self.database.close()
