"""What the notification service's read side learns when a worker applies one of its queued writes.

The worker writes the row it committed through to the item's cache entry,
stamped with the row's `read_stamp`: if a web process wrote a later version
meanwhile, the later one stays (the version compare in read_cache.py). Without
it, an item created while the database was down was in no cache once applied
(its pending entry cleared), and a read in the next outage answered 503. It
bumps the user's generation (lists cannot be written through: the next read
asks the database) and clears the pending entries the write superseded. A
duplicate only invalidates: its result is the first apply's, possibly older
than the row. Best effort: with Redis down the entries still expire
(`pending_seconds`) and cached copies stop being fresh after
`cache_fresh_seconds` (and at once, fleet-wide, through the missed-write epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from app.api.pending import PendingWrites
from brownout import ReadCache, RedisLink, RedisUnavailable, Settings, build_redis_link

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

    def __call__(self, item: dict[str, Any], *, current: bool = True) -> None:
        """*item*: the notification as the apply step returned it (with read_stamp); *current*: it is
        the row as this write left it (False for a duplicate, whose result is the first apply's)."""
        self.many([(item, current)])

    def many(self, applied: Sequence[tuple[dict[str, Any], bool]]) -> None:
        """`__call__` for a batch's (item, current) pairs, in one round trip."""
        if not applied:
            return

        def tell(client: Any) -> None:  # one round trip per batch the worker applies
            with client.pipeline(transaction=False) as pipe:
                for item, current in applied:
                    ident = str(item["id"])
                    generations = [self._link.key("gen", "item", ident), self._link.key("gen", "user", item["user_id"])]
                    key = self._link.key("cache", "item", ident) if current else None
                    stamp = int(item.get("read_stamp", 0))
                    self._cache.queue_write_through(pipe, key, generations, item, version=stamp)
                    self._pending.queue_clear_applied(pipe, ident, stamp)
                pipe.execute()

        try:
            self._link.run(tell)
        except RedisUnavailable:
            self._link.missed_write()

    def close(self) -> None:
        self._link.close()


def tell_readers(settings: Settings) -> Callable[[Sequence[tuple[dict[str, Any], bool]]], None] | None:
    """The registry's after-apply hook (the worker builds it once, from its settings): None without Redis."""
    told = AppliedElsewhere.from_settings(settings)
    return told.many if told is not None else None
