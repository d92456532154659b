"""Read-through cache entries with a fresh age, a stale window and generations.

Each cached value has a *generation key* (per item, per list)
that every write bumps. A fill remembers the generation it saw before reading
the database and stores its result only if the generation is still the same
(compared and set in one Lua script), so a fill that read the database before
a write committed can never land after the write and hide it. An entry is
fresh while it is younger than `fresh_seconds` and its generation is current;
any entry younger than `stale_seconds` can be served stale.

A write that could not reach Redis (it was down) could not bump its
generations, so entries cached before the outage would look fresh after it.
The link remembers such a miss and, on its first command once Redis answers,
bumps a fleet-wide *epoch*; entries are fresh only under the epoch they were
stored in (a fleet-wide loss of freshness, never of stale copies).

Memory stays bounded (README "Redis memory"): every entry expires. An answer
that holds nothing (None: a 404 remembered; an empty list: a page past the end
or a user with nothing) would let a flood of reads for made-up ids and pages
fill Redis, so such entries are kept in one fleet-wide index capped at
`empty_cap`, the oldest deleted, and a None lives only `fresh_seconds` (served
stale it would say nothing a 503 does not). A caller can cap other entries the
same way (`group`: an index key and how many it keeps, e.g. one user's pages).

Every method raises RedisUnavailable when Redis cannot answer in time; callers
then go to the database (or answer 503) and never wait longer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from brownout._cache.held_copies import HeldCopies
from brownout._cache.redis_link import RedisLink, RedisUnavailable

# KEYS[1] value key, KEYS[2] generation key, KEYS[3] (optional) a capped index of value keys;
# ARGV: observed generation, entry JSON, ttl ms, most keys the index keeps, score (ms), and '1' when
# only entries that still hold nothing may be deleted (a key indexed empty may hold a value since).
_STORE_IF_CURRENT = """
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if #KEYS < 3 then return 1 end
redis.call('ZADD', KEYS[3], ARGV[5], KEYS[1])
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[4])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, over - 1)) do
    if ARGV[6] ~= '1' or string.sub(redis.call('GET', old) or '', 1, 10) == '{"empty":1' then redis.call('DEL', old) end
  end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, over - 1)
end
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[3], ARGV[3]) end
return 1
"""

# KEYS[1] value key, KEYS[2..n-1] generation keys, KEYS[n] the epoch key;
# ARGV: value JSON or '', stored_at, ttl ms, version.
# Bumps every generation; stores the value stamped with the first key's new generation, unless
# the entry there has a later version (two processes' write-throughs can arrive out of order;
# the loser's bump alone makes the entry not fresh, so the next read asks the database).
# Versions are zero-padded 20-digit strings: they compare like the 63-bit stamps they are.
_WRITE_THROUGH = """
local gen = 0
for i = 2, #KEYS - 1 do
  local g = redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
  if i == 2 then gen = g end
end
if ARGV[1] == '' then return gen end
local old = redis.call('GET', KEYS[1])
if old then
  local version = string.match(old, '"version":"(%d+)"')
  if version and version > ARGV[4] then return gen end
end
local epoch = redis.call('GET', KEYS[#KEYS]) or '0'
local entry = '{"gen":' .. gen .. ',"epoch":' .. epoch .. ',"stored_at":' .. ARGV[2] .. ',"version":"' .. ARGV[4] ..
  '","value":' .. ARGV[1] .. '}'
redis.call('SET', KEYS[1], entry, 'PX', ARGV[3])
return gen
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


EMPTY_CAP = 1000
"""Entries holding nothing kept fleet-wide (a few hundred kB): a flood of made-up ids deletes its own, oldest first."""


def holds_nothing(value: Any) -> bool:
    """None (the query found no row) or an empty list or dict (a page past the end)."""
    return value is None or (isinstance(value, (list, tuple, dict)) and not value)


@dataclass(frozen=True)
class Entry:
    value: Any
    stored_at: float
    gen: int
    current_gen: int
    epoch: int = 0
    current_epoch: int = 0

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def fresh(self, now: float, fresh_seconds: float) -> bool:
        return self.gen == self.current_gen and self.epoch == self.current_epoch and self.age(now) < fresh_seconds


@dataclass(frozen=True)
class Lookup:
    """What the cache holds for a key: maybe an entry, and the generation a fill must match."""

    entry: Entry | None
    gen: int
    epoch: int = 0
    extras: tuple[str | None, ...] = ()
    """Other keys read in the same round trip (a pending mark), raw."""


def parse_lookup(values: Sequence[Any]) -> Lookup:
    """A Lookup from the values of [key, generation key, epoch key, *extra keys] (`lookup_keys`), in that order."""
    raw, gen, epoch, *extras = values
    current, current_epoch = int(gen or 0), int(epoch or 0)
    extra = tuple(str(value) if value is not None else None for value in extras)
    if raw is None:
        return Lookup(None, current, current_epoch, extra)
    data = json.loads(raw)
    entry = Entry(data["value"], float(data["stored_at"]), int(data["gen"]), current, int(data.get("epoch", 0)), current_epoch)
    return Lookup(entry, current, current_epoch, extra)


class ReadCache:
    def __init__(
        self,
        link: RedisLink,
        *,
        fresh_seconds: float,
        stale_seconds: float,
        clock: Callable[[], float] = time.time,
        empty_cap: int = EMPTY_CAP,
    ) -> None:
        self.link = link
        self.fresh_seconds = fresh_seconds
        self.stale_seconds = stale_seconds
        self.empty_cap = empty_cap
        self.clock = clock  # wall clock: entries are shared by processes (and machines)
        self._store = link.client.register_script(_STORE_IF_CURRENT)
        self._write_through = link.client.register_script(_WRITE_THROUGH)
        self._release = link.client.register_script(_RELEASE)
        self.held = HeldCopies(link, stale_seconds=stale_seconds, clock=clock)

    @property
    def _ttl_ms(self) -> int:
        return int(self.stale_seconds * 1000)

    def lookup_keys(self, key: str, gen_key: str, extra_keys: Sequence[str] = ()) -> list[str]:
        """What a lookup reads, in one MGET (or in a caller's own script: the fast reads' rate check)."""
        return [key, gen_key, self.link.epoch_key, *extra_keys]

    def lookup(self, key: str, gen_key: str, extra_keys: Sequence[str] = ()) -> Lookup:
        keys = self.lookup_keys(key, gen_key, extra_keys)
        return parse_lookup(self.link.run(lambda client: client.mget(keys)))

    async def alookup(self, key: str, gen_key: str, extra_keys: Sequence[str] = ()) -> Lookup:
        """`lookup` on the event loop (the asyncio client: no thread-pool hop for a cache hit)."""
        keys = self.lookup_keys(key, gen_key, extra_keys)
        return parse_lookup(await self.link.arun(lambda client: client.mget(keys)))

    def fill(
        self,
        key: str,
        gen_key: str,
        value: Any,
        *,
        observed_gen: int,
        observed_epoch: int = 0,
        group: tuple[str, int] | None = None,
    ) -> bool:
        """Store a database read unless a write bumped the generation since it was observed. *group*: (index
        key, most entries kept) it counts against; an answer holding nothing counts against the empty index."""
        now = self.clock()
        fields: dict[str, Any] = {"gen": observed_gen, "epoch": observed_epoch, "stored_at": now, "value": value}
        ttl_ms, guarded = self._ttl_ms, "0"
        if holds_nothing(value):
            fields = {"empty": 1} | fields
            group, guarded = (self.link.key("index", "empty"), self.empty_cap), "1"
            if value is None:
                ttl_ms = max(1, int(self.fresh_seconds * 1000))
        entry = json.dumps(fields, separators=(",", ":"))
        keys = [key, gen_key] if group is None else [key, gen_key, group[0]]
        args: list[str | int] = [str(observed_gen), entry, ttl_ms, max(1, group[1]) if group else 0, int(now * 1000), guarded]
        stored = self.link.run(lambda client: self._store(keys=keys, args=args))
        return bool(stored)

    def write_through(self, key: str | None, gen_keys: Sequence[str], value: Any = None, *, version: int = 0) -> None:
        """After a committed write: bump every generation, and store *value* under *key* as current
        unless a later *version* is there already. With key None, only bump (invalidate)."""
        keys, args = self._write_through_call(key, gen_keys, value, version)
        try:
            self.link.run(lambda client: self._write_through(keys=keys, args=args))
        except RedisUnavailable:
            if key is not None and not holds_nothing(value):  # stored stale-only once Redis answers (held_copies.py)
                self.held.hold(key, str(args[0]), taken_at=float(args[1]), version=version)
            raise

    def hold_read(self, key: str, value: Any) -> None:
        """A value read from the database while Redis could not take it: stored stale-only once Redis answers."""
        if not holds_nothing(value):
            self.held.hold(key, json.dumps(value, separators=(",", ":")), taken_at=self.clock())

    def queue_write_through(
        self, pipe: Any, key: str | None, gen_keys: Sequence[str], value: Any = None, *, version: int = 0
    ) -> None:
        """`write_through` as one step of the caller's pipeline (EVAL: a registered script in a
        pipeline costs redis-py a SCRIPT EXISTS round trip)."""
        keys, args = self._write_through_call(key, gen_keys, value, version)
        pipe.eval(_WRITE_THROUGH, len(keys), *keys, *args)

    def _write_through_call(
        self, key: str | None, gen_keys: Sequence[str], value: Any, version: int
    ) -> tuple[list[str], list[str | int]]:
        payload = "" if key is None else json.dumps(value, separators=(",", ":"))
        keys = [key or gen_keys[0], *gen_keys, self.link.epoch_key]
        return keys, [payload, repr(self.clock()), self._ttl_ms, f"{version:020d}"]

    def values(self, keys: Sequence[str]) -> list[Entry | None]:
        """Several entries in one round trip (generations not checked: for stale serving)."""
        if not keys:
            return []
        raws = self.link.run(lambda client: client.mget(list(keys)))
        out: list[Entry | None] = []
        for raw in raws:
            if raw is None:
                out.append(None)
                continue
            data = json.loads(raw)
            out.append(Entry(data["value"], float(data["stored_at"]), int(data["gen"]), int(data["gen"])))
        return out

    def try_lock(self, key: str, ttl_seconds: float) -> str | None:
        """One loader per key across the fleet: a token when this caller may load, else None."""
        token = uuid.uuid4().hex
        got = self.link.run(lambda client: client.set(key, token, nx=True, px=max(1, int(ttl_seconds * 1000))))
        return token if got else None

    def unlock(self, key: str, token: str) -> None:
        self.link.run(lambda client: self._release(keys=[key], args=[token]))
