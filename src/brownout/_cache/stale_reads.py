"""Reads that keep answering while the database is sick: the database under the request deadline, a
Redis read-through in front of it, and the last value stored when the database cannot answer.

    fresh entry in Redis          -> served from Redis (Cache-Status: hit)
    else the database answers     -> served, and filled into Redis (fwd=miss; stored)
    else (breaker open, transient
    failure, deadline passed)     -> the stale entry with its Age (X-Brownout: stale),
                                     or DatabaseUnavailable (503 + Retry-After) on a miss
    Redis down                    -> straight to the database; both down -> 503

One loader per key (in-process single flight and a fleet-wide Redis lock), and a fill is dropped
when a write bumped the key's generation while it was loading, so a cache never holds an answer
older than a write it has seen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from brownout._admission import database_shed
from brownout._cache.read_cache import Entry, Lookup, ReadCache
from brownout._cache.redis_link import RedisUnavailable
from brownout._cache.single_flight import SingleFlight
from brownout._db import CircuitOpenError, Database, DeadlineExceeded, classify, execute_with_retry

T = TypeVar("T")

CACHE_NAME = "Brownout"
DEFAULT_RETRY_AFTER = 5.0
SHED_REASON = "overloaded: this process is past its capacity"
SHED_RETRY_AFTER = 1.0
_POLL_SECONDS = 0.01


class DatabaseUnavailable(Exception):
    """Raised when a read needs the database and it cannot answer within the request deadline."""

    def __init__(self, reason: str, retry_after: float) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


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


@dataclass(frozen=True)
class CachedRead:
    """What Redis alone answered, on the event loop: the result, or (None) the lookup `read` goes on from."""

    result: ReadResult | None
    lookup: Lookup | None  # None: no cache, or Redis did not answer


class StaleReads:
    """The read path of a service's items: `read(keys, query)` with `keys` from `keys(...)`."""

    CACHE_NAME = CACHE_NAME  # the Cache-Status header's cache name
    DEFAULT_RETRY_AFTER = DEFAULT_RETRY_AFTER  # seconds, when nothing better is known

    def __init__(
        self,
        *,
        database: Database,
        cache: ReadCache | None,
        deadline: float,
        after_load: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._database = database
        self._clock = clock  # wall clock, as the cache's (entries are shared by processes)
        self._cache = cache
        self._deadline = deadline
        self._flights: SingleFlight[Any] = SingleFlight()
        # A seam for tests that force an interleaving between a fill's database read and its store.
        self.after_load = after_load
        self.on_read: Callable[[str], None] | None = None  # metrics: hit, miss, stale, bypass

    def keys(self, kind: str, *parts: object) -> tuple[str, str] | None:
        """The cache and generation keys of one item (None without Redis: reads go to the database)."""
        if self._cache is None:
            return None
        link = self._cache.link
        return link.key("cache", kind, *parts), link.key("gen", kind, *parts)

    def written(self, keys: tuple[str, str] | None) -> None:
        """After a committed write of the item: its cached copy stops being fresh (the next read asks the
        database), and stays servable stale. Best effort: with Redis down, every cached copy in the fleet
        stops being fresh once Redis answers again."""
        cache = self._cache
        if keys is None or cache is None:
            return
        try:
            cache.write_through(None, [keys[1]])
        except RedisUnavailable:
            cache.link.missed_write()

    def _require_cache(self) -> ReadCache:
        assert self._cache is not None  # noqa: S101 - narrows the type for mypy: called only on the paths that have a cache
        return self._cache

    def read(
        self,
        keys: tuple[str, str] | None,
        query: Callable[[Session], T],
        *,
        extra_keys: tuple[str, ...] = (),
        group: tuple[str, int] | None = None,
        prefetched: CachedRead | None = None,
    ) -> ReadResult:
        """*group*: (index key, most entries kept) this entry counts against, e.g. one user's pages (read_cache.py).
        *prefetched*: `read_cached`'s lookup for the same keys, which this read goes on from (no second round trip)."""
        lookup = prefetched.lookup if prefetched is not None else self._lookup(keys, extra_keys)
        result = self._read_through(keys, lookup, query, group)
        result.extras = lookup.extras if lookup is not None else ()
        self._count(result, lookup)
        return result

    async def read_cached(self, keys: tuple[str, str] | None, *, extra_keys: tuple[str, ...] = ()) -> CachedRead:
        """On the event loop, from Redis alone: a fresh entry, or a stale one when the database would not be
        asked anyway (its breaker refuses, or the process is shedding). Otherwise `result` is None: run
        `read(..., prefetched=this)` in the thread pool. A hit so costs no thread-pool hop, and no
        in-process copy is ever served: every answer is checked against Redis's generations."""
        cache = self._cache
        if keys is None or cache is None:
            return CachedRead(None, None)
        try:
            lookup = await cache.alookup(*keys, extra_keys)
        except RedisUnavailable:
            return CachedRead(None, None)
        return CachedRead(self.answer(lookup), lookup)

    def answer(self, lookup: Lookup, *, count: bool = True) -> ReadResult | None:
        """What *lookup* answers with no database call (no I/O at all): a fresh entry, or a stale one while the
        database would not be asked anyway (its breaker refuses, or the process is shedding); else None.
        *count* False: the caller may still not serve it, and counts it with `served` if it does."""
        cache, entry, now = self._cache, lookup.entry, self._clock()
        if entry is None or cache is None:
            return None
        if entry.fresh(now, cache.fresh_seconds):
            result = self._hit(entry, now)
        elif database_shed():
            result = self._stale(entry, now, shed=True)
        elif self._database.breaker.refuse_now() is not None:
            result = self._stale(entry, now)
        else:
            return None
        result.extras = lookup.extras
        if count:
            self._count(result, lookup)
        return result

    def served(self, result: ReadResult) -> None:
        """Count a result of `answer(..., count=False)` that was served."""
        self._count(result, None)  # from the cache: hit or stale

    def _count(self, result: ReadResult, lookup: Lookup | None) -> None:
        if self.on_read is not None:
            served = "stale" if result.stale else ("hit" if not result.from_database else "bypass" if lookup is None else "miss")
            self.on_read(served)

    def _hit(self, entry: Entry, now: float) -> ReadResult:
        ttl = math.floor(self._require_cache().fresh_seconds - entry.age(now))
        return ReadResult(entry.value, age=entry.age(now), cache_status=f"{CACHE_NAME}; hit; ttl={ttl}")

    def _read_through(
        self, keys: tuple[str, str] | None, lookup: Lookup | None, query: Callable[[Session], T], group: tuple[str, int] | None
    ) -> ReadResult:
        now = self._clock()
        cache = self._cache
        if lookup is not None and lookup.entry is not None and cache is not None:
            entry = lookup.entry
            if entry.fresh(now, cache.fresh_seconds):
                return self._hit(entry, now)
        try:
            if database_shed():  # admitted past the process's limit on condition of asking the database nothing
                raise DatabaseUnavailable(SHED_REASON, SHED_RETRY_AFTER)
            self._refuse_while_open()  # before any lock: a stale answer needs no loader
            if keys is None or lookup is None:
                value = self.read_database(query)
                # Redis is away (not merely late: a reply the loop read late trips nothing): held for later
                if keys is not None and cache is not None and group is None and not cache.link.available:
                    cache.hold_read(keys[0], value)
                detail = "; detail=cache-unavailable" if self._cache is not None else ""
                status = f"{CACHE_NAME}; fwd=miss{detail}" if self._cache else ""
                return ReadResult(value, cache_status=status, from_database=True)
            value, stored = self._flights.run(keys[0], lambda: self._load(keys, lookup, query, group), wait=self._deadline)
            status = f"{CACHE_NAME}; fwd=miss" + ("; stored" if stored else "")
            return ReadResult(value, cache_status=status, from_database=True)
        except DatabaseUnavailable as unavailable:
            if lookup is None or lookup.entry is None or cache is None:
                raise
            return self._stale(lookup.entry, self._clock(), shed=unavailable.reason == SHED_REASON)

    def _stale(self, entry: Entry, now: float, *, shed: bool = False) -> ReadResult:
        assert self._cache is not None  # noqa: S101 - narrows the type for mypy: a stale entry exists only where a cache does
        age = entry.age(now)
        ttl = math.floor(self._cache.fresh_seconds - age)
        status = f"{CACHE_NAME}; hit; ttl={ttl}; detail=" + ("overloaded" if shed else "database-unavailable")
        return ReadResult(entry.value, stale=True, age=age, cache_status=status, stored_at=entry.stored_at)

    def _load(
        self, keys: tuple[str, str], lookup: Lookup, query: Callable[[Session], T], group: tuple[str, int] | None = None
    ) -> tuple[T, bool]:
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
            value = self.read_database(query)
            if self.after_load is not None:
                self.after_load(key)
            observed = {"observed_gen": lookup.gen, "observed_epoch": lookup.epoch}
            stored = bool(self._cache_call(lambda: cache.fill(key, gen_key, value, group=group, **observed)))
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

    def read_database(self, query: Callable[[Session], T]) -> T:
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


def invalidate_after_apply(kind: str, ident: Callable[[dict[str, Any]], object]) -> Callable[[Any], Any]:
    """A Registry's `after_apply`: each write the worker applies makes the cached copy of its item, keyed as
    `StaleReads.keys(kind, ident(result))`, stop being fresh. *ident*: the item's id from the apply's result."""

    def build(settings: Any) -> Callable[[Sequence[tuple[dict[str, Any], bool]]], None] | None:
        from brownout._cache.redis_link import build_redis_link

        link = build_redis_link(settings)
        if link is None:
            return None
        cache = ReadCache(link, fresh_seconds=settings.cache_fresh_seconds, stale_seconds=settings.cache_stale_seconds)

        def invalidate(applied: Sequence[tuple[dict[str, Any], bool]]) -> None:
            gen_keys = [link.key("gen", kind, ident(result)) for result, _ in applied]
            try:
                cache.write_through(None, gen_keys)
            except RedisUnavailable:
                link.missed_write()

        return invalidate

    return build
