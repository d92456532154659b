"""The read path: database under the request deadline, Redis read-through, stale fallback, pending overlay.

    fresh entry in Redis          -> served from Redis (Cache-Status: hit)
    else the database answers     -> served, and filled into Redis (fwd=miss; stored)
    else (breaker open, transient
    failure, deadline passed)     -> the stale entry with its Age (X-Brownout: stale),
                                     or DatabaseUnavailable (503 + Retry-After) on a miss
    Redis down                    -> straight to the database; both down -> 503

Whatever the source, queued writes this service accepted are laid over the
answer (src/brownout/_cache/pending.py): a pending creation appears with status
"pending", a pending mark-read shows as read. A database row supersedes a
pending entry by id (and clears it); entries expire on their own anyway.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.api import queries
from app.api.queries import Position
from brownout import (
    CircuitOpenError,
    Database,
    DeadlineExceeded,
    Entry,
    Lookup,
    PendingWrites,
    ReadCache,
    RedisUnavailable,
    SingleFlight,
    classify,
    execute_with_retry,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_NAME = "Brownout"
DEFAULT_RETRY_AFTER = 5.0
_POLL_SECONDS = 0.01


class DatabaseUnavailable(Exception):
    """Raised when a read needs the database and it cannot answer within the request deadline."""

    def __init__(self, reason: str, retry_after: float) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


class NotFound(Exception):
    """Raised when neither the database nor a pending write knows the item."""


@dataclass
class ReadResult:
    body: Any
    stale: bool = False
    age: float | None = None
    cache_status: str = ""
    from_database: bool = False
    extras: tuple[str | None, ...] = ()
    stored_at: float | None = None  # when a cached answer was stored

    def headers(self) -> dict[str, str]:
        headers = {"Cache-Status": self.cache_status} if self.cache_status else {}
        if self.stale:
            headers["X-Brownout"] = "stale"
            headers["Age"] = str(math.floor(self.age or 0))
        elif self.age is not None:
            headers["Age"] = str(math.floor(self.age))
        return headers


def public(item: dict[str, Any]) -> dict[str, Any]:
    """The item as clients see it (read_stamp is internal)."""
    return {name: value for name, value in item.items() if name != "read_stamp"}


class NotificationReads:
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
        self._database = database
        self._clock = clock  # wall clock, as the cache's (entries are shared by processes)
        self._cache = cache
        self._pending = pending
        self._deadline = deadline
        self._flights: SingleFlight[Any] = SingleFlight()
        # A seam for tests that force an interleaving between a fill's database read and its store.
        self.after_load = after_load
        self.on_read: Callable[[str], None] | None = None  # metrics: hit, miss, stale, bypass
        # A queued creation this process accepted but Redis missed (src/brownout/_cache/pending_replay.py).
        self.unrecorded: Callable[[str], dict[str, Any] | None] | None = None

    # -- keys ---------------------------------------------------------------

    def item_keys(self, notification_id: str) -> tuple[str, str]:
        link = self._require_cache().link
        return link.key("cache", "item", notification_id), link.key("gen", "item", notification_id)

    def list_keys(self, user_id: int, before: Position | None, limit: int) -> tuple[str, str]:
        link = self._require_cache().link
        cursor = before.encode() if before else "-"
        return link.key("cache", "list", user_id, limit, cursor), link.key("gen", "user", user_id)

    def _require_cache(self) -> ReadCache:
        assert self._cache is not None
        return self._cache

    # -- routes -------------------------------------------------------------

    def notification(self, notification_id: uuid.UUID) -> ReadResult:
        ident = str(notification_id)
        mark_keys = (self._pending.mark_key(ident),) if self._pending is not None else ()
        try:
            result = self._read(
                self.item_keys(ident) if self._cache else None,
                lambda session: queries.get_notification(session, notification_id),
                extra_keys=mark_keys,  # the pending mark comes in the same round trip
            )
        except DatabaseUnavailable:  # nothing cached: a queued creation may still be shown
            pending_item = (self._pending_items(ident) or {}).get(ident)
            if pending_item is None:
                raise
            result = ReadResult(None, stale=True, age=0, cache_status=f"{CACHE_NAME}; hit; detail=pending")
        item: dict[str, Any] | None = result.body
        if item is None:
            pending = self._pending_items(ident) if self._pending is not None else None
            if pending is None and self._pending is not None:
                # Not in the database, and Redis cannot say whether a creation of it is queued:
                # a 404 could deny a write this service acknowledged (202).
                raise DatabaseUnavailable("not in the database, and pending writes are unknown (Redis)", 1.0)
            if ident not in (pending or {}):
                if result.stale:  # the database was not asked: we cannot say it does not exist
                    raise DatabaseUnavailable("database unavailable and nothing cached", DEFAULT_RETRY_AFTER)
                raise NotFound(ident)
            item = (pending or {})[ident]
        elif result.from_database:  # the row supersedes a pending creation
            self._pending_call(lambda p: p.clear_items([ident]))
        known = {ident: PendingWrites.parse_mark(result.extras[0])} if result.extras else None
        result.body = public(self._apply_marks([item], known=known)[0])
        return result

    def notifications(self, user_id: int, *, cursor: str | None, limit: int) -> ReadResult:
        before = Position.decode(cursor) if cursor else None
        result = self._read(
            self.list_keys(user_id, before, limit) if self._cache else None,
            lambda session: queries.list_notifications(session, user_id, before=before, limit=limit),
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

    def stats(self, user_id: int) -> dict[str, int]:
        return self._database_read(lambda session: queries.notification_stats(session, user_id))

    def command(self, command_id: uuid.UUID) -> ReadResult:
        ident = str(command_id)
        try:
            status = self._database_read(lambda session: queries.command_status(session, command_id))
        except DatabaseUnavailable:
            record = self._pending_call(lambda p: p.command(ident))
            if record is None:
                raise
            return ReadResult(record | {"id": ident, "status": "queued"}, stale=True, age=0, cache_status=f"{CACHE_NAME}; hit")
        if status is not None:
            if isinstance(status.get("result"), dict):
                status["result"] = public(status["result"])
            return ReadResult(status)
        record = self._pending_call(lambda p: p.command(ident))
        if record is None:
            raise NotFound(ident)
        return ReadResult(record | {"id": ident, "status": "queued"})

    # -- the read-through core ----------------------------------------------

    def _read(
        self, keys: tuple[str, str] | None, query: Callable[[Session], T], *, extra_keys: tuple[str, ...] = ()
    ) -> ReadResult:
        lookup = self._lookup(keys, extra_keys)
        result = self._read_through(keys, lookup, query)
        result.extras = lookup.extras if lookup is not None else ()
        if self.on_read is not None:
            served = "stale" if result.stale else ("hit" if not result.from_database else "bypass" if lookup is None else "miss")
            self.on_read(served)
        return result

    def _read_through(self, keys: tuple[str, str] | None, lookup: Lookup | None, query: Callable[[Session], T]) -> ReadResult:
        now = self._clock()
        cache = self._cache
        if lookup is not None and lookup.entry is not None and cache is not None:
            entry = lookup.entry
            if entry.fresh(now, cache.fresh_seconds):
                ttl = math.floor(cache.fresh_seconds - entry.age(now))
                return ReadResult(entry.value, age=entry.age(now), cache_status=f"{CACHE_NAME}; hit; ttl={ttl}")
        try:
            self._refuse_while_open()  # before any lock: a stale answer needs no loader
            if keys is None or lookup is None:
                value = self._database_read(query)
                detail = "; detail=cache-unavailable" if self._cache is not None else ""
                status = f"{CACHE_NAME}; fwd=miss{detail}" if self._cache else ""
                return ReadResult(value, cache_status=status, from_database=True)
            value, stored = self._flights.run(keys[0], lambda: self._load(keys, lookup, query), wait=self._deadline)
            status = f"{CACHE_NAME}; fwd=miss" + ("; stored" if stored else "")
            return ReadResult(value, cache_status=status, from_database=True)
        except DatabaseUnavailable:
            if lookup is None or lookup.entry is None or cache is None:
                raise
            return self._stale(lookup.entry, self._clock())

    def _stale(self, entry: Entry, now: float) -> ReadResult:
        assert self._cache is not None
        age = entry.age(now)
        ttl = math.floor(self._cache.fresh_seconds - age)
        status = f"{CACHE_NAME}; hit; ttl={ttl}; detail=database-unavailable"
        return ReadResult(entry.value, stale=True, age=age, cache_status=status, stored_at=entry.stored_at)

    def _load(self, keys: tuple[str, str], lookup: Lookup, query: Callable[[Session], T]) -> tuple[T, bool]:
        """The leader's load: fleet-wide lock, database read, fill unless a write came in between."""
        cache = self._require_cache()
        key, gen_key = keys
        lock_key = key + ":loading"
        try:
            token = cache.try_lock(lock_key, self._deadline)
        except RedisUnavailable:
            token = ""  # no fleet-wide lock without Redis; the in-process one still holds
        if token is None:  # another process is loading this key: wait briefly for its fill
            waited = self._wait_for_fill(key, gen_key)
            if waited is not None:
                return waited, False
        try:
            value = self._database_read(query)
            if self.after_load is not None:
                self.after_load(key)
            observed = {"observed_gen": lookup.gen, "observed_epoch": lookup.epoch}
            stored = bool(self._cache_call(lambda: cache.fill(key, gen_key, value, **observed)))
            return value, stored
        finally:
            if token:
                self._cache_call(lambda: cache.unlock(lock_key, token))

    def _wait_for_fill(self, key: str, gen_key: str) -> Any | None:
        cache = self._require_cache()
        give_up = time.monotonic() + self._deadline
        while time.monotonic() < give_up:
            time.sleep(_POLL_SECONDS)
            lookup = self._cache_call(lambda: cache.lookup(key, gen_key))
            if lookup is None:
                return None
            if lookup.entry is not None and lookup.entry.fresh(self._clock(), cache.fresh_seconds):
                return lookup.entry.value
        return None

    def _refuse_while_open(self) -> None:
        refused = self._database.breaker.refuse_now()
        if refused is not None:
            raise DatabaseUnavailable(f"circuit breaker {refused.state}", max(refused.retry_after, 1.0))

    def _database_read(self, query: Callable[[Session], T]) -> T:
        with self._database.session() as session:
            try:
                return execute_with_retry(session, lambda: query(session), deadline=self._deadline, idempotent=True)
            except CircuitOpenError as exc:
                raise DatabaseUnavailable("circuit breaker open", max(exc.retry_after, 1.0)) from None
            except DeadlineExceeded:
                raise DatabaseUnavailable("database past the request deadline", DEFAULT_RETRY_AFTER) from None
            except Exception as exc:
                if not classify(exc).is_transient:
                    raise
                raise DatabaseUnavailable(f"database failed: {classify(exc).value}", DEFAULT_RETRY_AFTER) from None

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
        self, user_id: int, page: list[dict[str, Any]], *, before: Position | None, limit: int, more: bool, stale: bool
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
            if mark is None:
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

    def _lookup(self, keys: tuple[str, str] | None, extra_keys: tuple[str, ...] = ()) -> Lookup | None:
        cache = self._cache
        if keys is None or cache is None:
            return None
        return self._cache_call(lambda: cache.lookup(*keys, extra_keys))

    @staticmethod
    def _cache_call(fn: Callable[[], T]) -> T | None:
        """None when Redis is unavailable: the caller goes on without it."""
        try:
            return fn()
        except RedisUnavailable:
            return None

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
