"""What the read side learns when a worker applies a queued write.

The worker does not write its result through (a direct write in a web process
may have stored a later version meanwhile); it bumps the item's and the
user's generations, so cached copies stop being fresh and the next read asks
the database, and clears the pending entries the write superseded. Best
effort: with Redis down the entries still expire (`pending_seconds`) and
cached copies stop being fresh after `cache_fresh_seconds`.
"""

from __future__ import annotations

import logging
from typing import Any

from app.cache.pending import PendingWrites
from app.cache.read_cache import ReadCache
from app.cache.redis_link import RedisLink, RedisUnavailable, build_redis_link
from app.settings import Settings

log = logging.getLogger(__name__)


class AppliedElsewhere:
    def __init__(self, link: RedisLink, *, cache: ReadCache, pending: PendingWrites) -> None:
        self._link = link
        self._cache = cache
        self._pending = pending

    @classmethod
    def from_settings(cls, settings: Settings) -> AppliedElsewhere | None:
        link = build_redis_link(settings)
        if link is None:
            return None
        cache = ReadCache(link, fresh_seconds=settings.cache_fresh_seconds, stale_seconds=settings.cache_stale_seconds)
        return cls(link, cache=cache, pending=PendingWrites(link, ttl_seconds=settings.pending_seconds))

    def __call__(self, item: dict[str, Any]) -> None:
        """*item*: the notification as the apply step returned it (with read_stamp)."""
        ident = str(item["id"])
        try:
            generations = [self._link.key("gen", "item", ident), self._link.key("gen", "user", item["user_id"])]
            self._cache.write_through(None, generations)
            self._pending.clear_items([ident])
            self._pending.clear_mark(ident, int(item.get("read_stamp", 0)))
        except RedisUnavailable:
            self._link.missed_write()

    def close(self) -> None:
        self._link.close()
