"""Copies of items that Redis missed while it was away, stored once it answers, as stale-only entries.

Why: an item written, or read from the database, while Redis was down has no cached copy, and it gets one
only when someone reads it again with both Redis and the database up. If the database fails first, every
read of it is a 503, although this process held its value a moment before. Seen in the chaos run: Redis
down 15 s, then the database down 10 s, ten seconds later: 45 reads failed, each of an item created or read
during the Redis outage (32 of the 39 created then and never read since).

So the cache holds such copies in memory (bounded, oldest dropped first) and a thread stores them once the
link's skip window is over. A held copy is stored as never fresh (generation -1, which no generation key
ever holds): it is served only when the database would not be asked anyway (an outage, the breaker
refusing, the process shedding), marked stale with its true age, and never as a hit. A write the fleet
applied meanwhile, whose invalidation Redis also missed, can therefore never be hidden by it. It lands
only where no newer copy is (compared by when each copy was taken, then by the write's version).

What is still possible: a process that dies with copies held loses them (the database stays the truth),
and list pages are not held (their entries count against a capped index, read_cache.py).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from brownout._cache.redis_link import RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

# KEYS[1] value key, KEYS[2] the epoch key; ARGV: value JSON, stored_at, ttl ms, version ('' for a read).
# The entry has read_cache.py's format with generation -1 (never fresh). An existing entry taken at the same
# time or later, or holding a later version, stays.
_STORE_HELD = """
local old = redis.call('GET', KEYS[1])
if old then
  local taken = tonumber(string.match(old, '"stored_at":([^,}]+)'))
  if taken and taken >= tonumber(ARGV[2]) then return 0 end
  local version = string.match(old, '"version":"(%d+)"')
  if ARGV[4] ~= '' and version and version > ARGV[4] then return 0 end
end
local epoch = redis.call('GET', KEYS[2]) or '0'
local version = ''
if ARGV[4] ~= '' then version = ',"version":"' .. ARGV[4] .. '"' end
redis.call('SET', KEYS[1], '{"gen":-1,"epoch":' .. epoch .. ',"stored_at":' .. ARGV[2] .. version ..
  ',"value":' .. ARGV[1] .. '}', 'PX', ARGV[3])
return 1
"""


class _Held(NamedTuple):
    payload: str  # the value's JSON
    taken_at: float  # wall clock, as entries' stored_at
    version: str  # zero-padded, or '' (a database read: no write version known)


class HeldCopies:
    def __init__(
        self,
        link: RedisLink,
        *,
        stale_seconds: float,
        clock: Callable[[], float] = time.time,
        limit: int = 5_000,
        batch: int = 200,
        interval_seconds: float = 0.2,
    ) -> None:
        self._link = link
        self._stale_seconds = stale_seconds
        self._clock = clock
        self._limit = limit
        self._batch = batch
        self._interval = interval_seconds
        self._held: OrderedDict[str, _Held] = OrderedDict()  # key -> latest copy, oldest first
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def hold(self, key: str, payload: str, *, taken_at: float, version: int | None = None) -> None:
        """Keep *payload* (the value's JSON) for *key*, to store once Redis answers; replaces an older copy."""
        held = _Held(payload, taken_at, "" if version is None else f"{version:020d}")
        with self._lock:
            self._held.pop(key, None)
            self._held[key] = held
            while len(self._held) > self._limit:
                self._held.popitem(last=False)
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("held cache copies full (%d): the oldest are dropped", self._limit)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="brownout-held-copies", daemon=True)
                self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def flush(self) -> int:
        """Store what is held, oldest first, a batch per round trip; stop at the first Redis failure.
        Returns how many were handled (stored, or left alone for a newer copy already there)."""
        done = 0
        while self._link.available:
            with self._lock:
                batch = list(itertools.islice(self._held.items(), self._batch))
            if not batch:
                break
            try:
                self._link.run(functools.partial(self._store, batch=batch))
            except RedisUnavailable:
                break
            with self._lock:
                for key, held in batch:
                    if self._held.get(key) is held:  # not replaced by a newer copy meanwhile
                        del self._held[key]
            done += len(batch)
        if done:
            log.info("stored %d cached copies that Redis had missed, as stale-only (%d still held)", done, len(self))
        return done

    def _store(self, client: Any, batch: list[tuple[str, _Held]]) -> None:
        now = self._clock()
        pipe = client.pipeline(transaction=False)
        epoch_key = self._link.epoch_key
        for key, held in batch:
            ttl_ms = int((self._stale_seconds - (now - held.taken_at)) * 1000)
            if ttl_ms > 0:  # else too old to serve even stale: dropped
                pipe.eval(_STORE_HELD, 2, key, epoch_key, held.payload, repr(held.taken_at), ttl_ms, held.version)
        pipe.execute()

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            self.flush()
            with self._lock:
                if not self._held:
                    self._thread = None  # a later hold starts another
                    return
