"""The notification service's own pieces, built on Brownout's once it has started, closed before it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.api.pending import PendingWrites
from app.api.reads import NotificationReads
from app.api.writes import NotificationWrites, pending_item
from brownout import PendingReplay
from brownout.fastapi import Brownout

log = logging.getLogger(__name__)


@dataclass
class Services:
    brownout: Brownout
    reads: NotificationReads
    writes: NotificationWrites
    replay: PendingReplay | None = None

    @classmethod
    def build(cls, brownout: Brownout) -> Services:
        settings, metrics = brownout.settings, brownout.metrics
        pending = None
        if brownout.link is not None:
            pending = PendingWrites(brownout.link, ttl_seconds=settings.pending_seconds, clock=brownout.clock)
        reads = NotificationReads(
            database=brownout.database,
            cache=brownout.cache,
            pending=pending,
            deadline=settings.request_db_deadline_seconds,
            clock=brownout.clock,
        )
        reads.on_read = lambda served: metrics.cache_reads.labels(served).inc()
        writes = NotificationWrites(
            dispatcher=brownout.dispatcher,
            link=brownout.link,
            cache=brownout.cache,
            pending=pending,
            key_seconds=settings.cache_stale_seconds,
        )
        writes.on_outcome = lambda outcome: metrics.dispatch.labels(outcome).inc()
        replay = None
        if brownout.link is not None and pending is not None:
            replay = PendingReplay(brownout.link, writes.record_pending, pending_item).start()
            writes.replay = replay
            reads.unrecorded = replay.item
        return cls(brownout=brownout, reads=reads, writes=writes, replay=replay)

    def close(self) -> None:
        if self.replay is not None:
            try:
                self.replay.stop()
            except Exception:
                log.exception("shutdown step failed")
