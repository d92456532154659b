"""The notification service's reads: Brownout's stale reads (brownout.StaleReads: the database under the
request deadline, Redis read-through, the stale copy while the database cannot answer), and over them
the writes this service accepted and queued (app/api/pending.py): a pending creation appears
with status "pending", a pending mark-read shows as read. A database row supersedes a pending entry by id
(and clears it); entries expire on their own anyway.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from app.api import queries
from app.api.pending import PendingWrites
from app.api.queries import Position
from brownout import (
    CachedRead,
    Database,
    DatabaseUnavailable,
    ReadCache,
    ReadResult,
    StaleReads,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGES_PER_USER = 50
"""Cached list pages kept per user (limits x cursors), the oldest deleted: one user cannot grow Redis unbounded."""


class NotFound(Exception):
    """Raised when neither the database nor a pending write knows the item."""


def public(item: dict[str, Any]) -> dict[str, Any]:
    """The item as clients see it (read_stamp is internal). `user_id` a string, also in what the previous
    release cached, recorded as pending or stored as a command's result (a number then)."""
    return {name: str(value) if name == "user_id" else value for name, value in item.items() if name != "read_stamp"}


class NotificationReads(StaleReads):
    def __init__(
        self,
        *,
        database: Database,
        cache: ReadCache | None,
        pending: PendingWrites | None,
        deadline: float,
        after_load: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(database=database, cache=cache, deadline=deadline, after_load=after_load, clock=clock)
        self._pending = pending
        # A queued creation this process accepted but Redis missed (src/brownout/_cache/pending_replay.py).
        self.unrecorded: Callable[[str], dict[str, Any] | None] | None = None

    # -- keys ---------------------------------------------------------------

    def item_keys(self, notification_id: str) -> tuple[str, str]:
        link = self._require_cache().link
        return link.key("cache", "item", notification_id), link.key("gen", "item", notification_id)

    def list_keys(self, user_id: str, before: Position | None, limit: int) -> tuple[str, str]:
        link = self._require_cache().link
        cursor = before.encode() if before else "-"
        return link.key("cache", "list", user_id, limit, cursor), link.key("gen", "user", user_id)

    # -- routes -------------------------------------------------------------

    async def notification_async(self, notification_id: uuid.UUID) -> ReadResult:
        """`notification`, answered on the event loop when Redis alone can (an entry fresh, or stale while the
        database would not be asked, with no pending mark over it); otherwise in the thread pool, from this lookup."""
        ident = str(notification_id)
        cached = await self.read_cached(self.item_keys(ident) if self._cache else None, extra_keys=self.mark_keys(ident))
        result = cached.result
        if result is None or result.body is None or any(result.extras):  # the database, a pending write, a mark
            return await run_in_threadpool(self.notification, notification_id, prefetched=cached)
        result.body = public(result.body)
        return result

    def mark_keys(self, ident: str) -> tuple[str, ...]:
        """The pending mark of the item, read in the same round trip as its entry."""
        return (self._pending.mark_key(ident),) if self._pending is not None else ()

    def notification(self, notification_id: uuid.UUID, *, prefetched: CachedRead | None = None) -> ReadResult:
        """*prefetched*: what `read_cached` found for this item (not looked up again)."""
        ident = str(notification_id)
        try:
            if prefetched is not None and prefetched.result is not None:
                result = prefetched.result
            else:
                result = self.read(
                    self.item_keys(ident) if self._cache else None,
                    lambda session: queries.get_notification(session, notification_id),
                    extra_keys=self.mark_keys(ident),
                    prefetched=prefetched,
                )
        except DatabaseUnavailable:  # nothing cached: a queued creation may still be shown
            pending_item = (self._pending_items(ident) or {}).get(ident)
            if pending_item is None:
                raise
            result = ReadResult(None, stale=True, age=0, cache_status=f"{self.CACHE_NAME}; hit; detail=pending")
        item: dict[str, Any] | None = result.body
        if item is None:
            pending = self._pending_items(ident) if self._pending is not None else None
            if pending is None and self._pending is not None:
                # Not in the database, and Redis cannot say whether a creation of it is queued:
                # a 404 could deny a write this service acknowledged (202).
                raise DatabaseUnavailable("not in the database, and pending writes are unknown (Redis)", 1.0)
            if ident not in (pending or {}):
                if result.stale:  # the database was not asked: we cannot say it does not exist
                    raise DatabaseUnavailable("database unavailable and nothing cached", self.DEFAULT_RETRY_AFTER)
                raise NotFound(ident)
            item = (pending or {})[ident]
        elif result.from_database:  # the row supersedes a pending creation
            self._pending_call(lambda p: p.clear_items([ident]))
        known = {ident: PendingWrites.parse_mark(result.extras[0])} if result.extras else None
        result.body = public(self._apply_marks([item], known=known)[0])
        return result

    def notifications(self, user_id: str, *, cursor: str | None, limit: int) -> ReadResult:
        before = Position.decode(cursor) if cursor else None
        result = self.read(
            self.list_keys(user_id, before, limit) if self._cache else None,
            lambda session: queries.list_notifications(session, user_id, before=before, limit=limit),
            group=(self._require_cache().link.key("index", "pages", user_id), PAGES_PER_USER) if self._cache else None,
        )
        rows: list[dict[str, Any]] = result.body
        more = len(rows) > limit
        page = rows[:limit]
        if result.stale:
            page = self._patch_from_item_cache(page, result.stored_at or 0.0)
        page, more = self._overlay_recent(user_id, page, before=before, limit=limit, more=more, stale=result.stale)
        page = self._apply_marks(page)
        next_cursor = Position.of(page[-1]).encode() if more and page else None
        result.body = {"items": [public(item) for item in page], "next": next_cursor}
        return result

    def stats(self, user_id: str) -> dict[str, int]:
        return self.read_database(lambda session: queries.notification_stats(session, user_id))

    def command(self, command_id: uuid.UUID) -> ReadResult:
        ident = str(command_id)
        try:
            status = self.read_database(lambda session: queries.command_status(session, command_id))
        except DatabaseUnavailable:
            record = self._pending_call(lambda p: p.command(ident))
            if record is None:
                raise
            return ReadResult(
                record | {"id": ident, "status": "queued"}, stale=True, age=0, cache_status=f"{self.CACHE_NAME}; hit"
            )
        if status is not None:
            if isinstance(status.get("result"), dict):
                status["result"] = public(status["result"])
            return ReadResult(status)
        record = self._pending_call(lambda p: p.command(ident))
        if record is None:
            raise NotFound(ident)
        return ReadResult(record | {"id": ident, "status": "queued"})

    # -- overlays -----------------------------------------------------------

    def _patch_from_item_cache(self, page: list[dict[str, Any]], page_stored: float) -> list[dict[str, Any]]:
        """A stale list page, with each item replaced by a newer cached copy (a write-through since)."""
        cache = self._cache
        if cache is None or not page:
            return page
        keys = [self.item_keys(item["id"])[0] for item in page]
        entries = self._cache_call(lambda: cache.values(keys))
        if not entries:
            return page
        return [
            # An entry holding None is a cached "not found" (a read before the row existed): never an item.
            entry.value if entry is not None and entry.value is not None and entry.stored_at > page_stored else item
            for item, entry in zip(page, entries, strict=True)
        ]

    def _overlay_recent(
        self, user_id: str, page: list[dict[str, Any]], *, before: Position | None, limit: int, more: bool, stale: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        recent = self._pending_call(lambda p: p.recent(user_id)) or []
        if not recent:
            return page, more
        shown = {item["id"] for item in page}
        floor = Position.of(page[-1]) if more and page else None
        wanted = [
            ident
            for ident, created in recent
            if ident not in shown
            and (before is None or Position(created, ident) < before)
            and (floor is None or Position(created, ident) > floor)
        ]
        if not stale:  # the database (or a fill from it) answered: its rows supersede pending entries
            applied = [ident for ident, _ in recent if ident in shown]
            if applied:
                self._pending_call(lambda p: p.clear_items(applied))
        extra = list((self._pending_call(lambda p: p.items(wanted)) or {}).values())
        if stale and self._cache is not None:  # written directly before the outage: the item cache has it
            missing = [ident for ident in wanted if ident not in {item["id"] for item in extra}]
            keys = [self.item_keys(ident)[0] for ident in missing]
            cache = self._cache
            entries = self._cache_call(lambda: cache.values(keys)) or []
            extra += [entry.value for entry in entries if entry is not None and entry.value is not None]  # None: "not found"
        if not extra:
            return page, more
        merged = sorted(page + extra, key=Position.of, reverse=True)
        return merged[:limit], more or len(merged) > limit

    def _apply_marks(
        self, items: list[dict[str, Any]], *, known: dict[str, dict[str, Any] | None] | None = None
    ) -> list[dict[str, Any]]:
        """*known*: marks already read (None: ask Redis for them)."""
        if known is None:
            marks = self._pending_call(lambda p: p.marks([item["id"] for item in items])) or {}
        else:
            marks = {ident: mark for ident, mark in known.items() if mark is not None}
        if not marks:
            return items
        out = []
        for item in items:
            mark = marks.get(item["id"])
            if mark is None or mark.get("user", item["user_id"]) != item["user_id"]:  # another user's: refused when applied
                out.append(item)
                continue
            applied_stamp = int(item.get("read_stamp", 0))
            if applied_stamp >= int(mark["stamp"]):  # the database has it, or a later write
                self._clear_mark(item["id"], applied_stamp)
                out.append(item)
            else:
                out.append(item | {"read": bool(mark["read"]), "status": "pending"})
        return out

    # -- Redis, never in the way ----------------------------------------------

    def _clear_mark(self, notification_id: str, applied_stamp: int) -> None:
        self._pending_call(lambda p: p.clear_mark(notification_id, applied_stamp))

    def _pending_items(self, ident: str) -> dict[str, dict[str, Any]] | None:
        """Pending creations by id: Redis's, or one this process accepted and Redis missed; None: Redis cannot say."""
        if self.unrecorded is not None and (item := self.unrecorded(ident)) is not None:
            return {ident: item | {"status": "pending"}}
        return self._pending_call(lambda p: p.items([ident]))

    def _pending_call(self, fn: Callable[[PendingWrites], T]) -> T | None:
        pending = self._pending
        if pending is None:
            return None
        return self._cache_call(lambda: fn(pending))
