"""Per-caller rate limits: one budget for the whole fleet through Redis, a per-process share without it.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as
one timestamp): a subject may spend `count` requests at once, then one more
every `seconds / count`. Chosen over a sliding-window counter because it needs
one small key per subject (the sliding window needs two, kept twice as long,
and only approximates), that key's TTL is at most the rate's period (so Redis
memory is bounded by the subjects active within one period), and the wait it
announces is exact: the time until the next slot.

In Redis, one Lua script per hit checks and spends atomically, on Redis's own
clock (`TIME`), so processes on machines with skewed clocks share one budget.
Hand-written because the `limits` library is not available from this
machine's package index.

Redis is a shortcut here too: when it does not answer (RedisUnavailable, or no
link), each process limits on its own at the rate divided by the fleet's web
process count, on the injected clock. Never unlimited, never a refusal just
because Redis is away. The local state is an LRU of at most `max_subjects`.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.commands.core import Script
from redis.exceptions import NoScriptError
from starlette.concurrency import run_in_threadpool

from brownout._cache.redis_link import RedisLink, RedisUnavailable

# KEYS[1] the subject's key; ARGV: emission interval (us), period (us), cost. Sets `wait`: the wait in us, <= 0 when
# allowed. TAT is the subject's theoretical arrival time; it is written only when the hit is allowed, with a TTL of
# (new TAT - now) <= period. Numbers are formatted with %d: Lua's tostring keeps 14 digits, microseconds need 16.
_GCRA_CORE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, period, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval * cost
local wait = new_tat - period - now
if wait <= 0 then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', string.format('%d', math.ceil((new_tat - now) / 1000)))
end
"""
# Answers the wait in us, 0 when allowed.
_GCRA = (
    _GCRA_CORE
    + """
if wait > 0 then return wait end
return 0
"""
)
# KEYS[2..]: keys read when the hit is allowed, in the same round trip. Answers {wait} when refused, else {0, values...}.
_GCRA_THEN_MGET = (
    _GCRA_CORE
    + """
if wait > 0 then return {wait} end
return {0, unpack(redis.call('MGET', unpack(KEYS, 2)))}
"""
)

_UNITS = {
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_FORM = re.compile(r"(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)")
_SLACK = 1e-6  # seconds: float rounding in the local limiter must not cost a request


@dataclass(frozen=True)
class Rate:
    """At most `count` requests per `seconds` (GCRA: a burst of `count`, then one per seconds/count)."""

    count: int
    seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a rate's count must be a whole number >= 1, not {self.count!r}")
        if not (isinstance(self.seconds, int | float) and math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"a rate's seconds must be a finite number > 0, not {self.seconds!r}")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'600/minute', '10/second', '1000/hour', '5000/day', '50/30s', '3/5m' (units s, m, h, d, spelled or not)."""
        match = _FORM.fullmatch(text.strip().lower())
        unit = _UNITS.get(match.group(3)) if match else None
        if match is None or unit is None or int(match.group(1)) < 1 or float(match.group(2) or 1) <= 0:
            raise ValueError(
                f"invalid rate {text!r}: expected '<count>/<period>' such as '600/minute', '10/second', "
                "'1000/hour' or '50/30s' (a count >= 1; a period in s, m, h or d, with an optional number > 0)"
            )
        return cls(int(match.group(1)), float(match.group(2) or 1) * unit)


_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_GCRA, _GCRA_THEN_MGET)}  # noqa: S324 - Redis's name


async def _evalsha(client: Any, script: str, keys: list[str], args: list[int]) -> Any:
    """EVALSHA, and EVAL (which loads it) the first time on a Redis server: the script's text is not sent,
    nor hashed by Redis, on every request."""
    try:
        return await client.evalsha(_SHA[script], len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script, len(keys), *keys, *args)


def _check_cost(rate: Rate, cost: int) -> None:
    if not 1 <= cost <= rate.count:
        raise ValueError(f"cost must be between 1 and the rate's count ({rate.count}), not {cost}")


class RateLimiter:
    """Counts requests per subject; thread-safe (sync routes run in a thread pool, `ahit` on the event loop)."""

    def __init__(
        self,
        *,
        link: RedisLink | None,
        processes: int,
        clock: Callable[[], float] = time.monotonic,
        max_subjects: int = 100_000,
    ) -> None:
        if processes < 1 or max_subjects < 1:
            raise ValueError("processes and max_subjects must be >= 1")
        self._link = link
        self._processes = processes
        self._clock = clock
        self._max_subjects = max_subjects
        self._script = link.client.register_script(_GCRA) if link is not None else None
        self._lock = threading.Lock()
        self._local: OrderedDict[str, float] = OrderedDict()  # subject -> TAT on self._clock, least recent first

    @property
    def local_subjects(self) -> int:
        """How many subjects the local limiter remembers (bounded by max_subjects)."""
        return len(self._local)

    def hit(self, subject: str, rate: Rate, *, cost: int = 1) -> float | None:
        """Count one request of *subject* (e.g. "key:orders:writes", "user:<id>:reads", "auth-failures:<ip>");
        None when allowed, else the seconds to wait (for Retry-After, at least 1)."""
        _check_cost(rate, cost)
        wait = None
        if self._link is not None and self._script is not None:
            try:
                wait = self._shared_hit(self._link, self._script, subject, rate, cost)
            except RedisUnavailable:
                pass  # the link logs and skips Redis for a while; this process takes its share meanwhile
        return self._verdict(subject, rate, cost, wait)

    async def ahit(self, subject: str, rate: Rate, *, cost: int = 1) -> float | None:
        """`hit` on the event loop (the link's asyncio client): a request's rate costs no thread-pool hop.
        Without an asyncio client, `hit` in the thread pool."""
        if self._link is None or self._link.aclient is None:
            return await run_in_threadpool(self.hit, subject, rate, cost=cost)
        _check_cost(rate, cost)
        key, args = self._shared_args(self._link, subject, rate, cost)
        try:
            wait: float | None = int(await self._link.arun(lambda client: _evalsha(client, _GCRA, [key], args))) / 1_000_000
        except RedisUnavailable:
            wait = None
        return self._verdict(subject, rate, cost, wait)

    async def ahit_and_read(self, subject: str, rate: Rate, keys: list[str]) -> tuple[float | None, list[Any] | None]:
        """`ahit` with a cost of one and, when it is allowed, the values of *keys* read in the same round trip
        (a cached read's rate and lookup: one Redis call instead of two). Values None: refused, or Redis did
        not answer (the hit was then counted by this process alone)."""
        if self._link is None or self._link.aclient is None:  # no asyncio client: the rate alone, the caller reads
            return await self.ahit(subject, rate), None
        key, args = self._shared_args(self._link, subject, rate, 1)
        try:
            reply = await self._link.arun(lambda client: _evalsha(client, _GCRA_THEN_MGET, [key, *keys], args))
        except RedisUnavailable:
            return self._verdict(subject, rate, 1, None), None
        if len(reply) == 1:  # the script refused (and read nothing), however short the wait it names
            return float(max(1, math.ceil(round(int(reply[0]) / 1_000_000, 3)))), None
        return None, list(reply[1:])

    def _verdict(self, subject: str, rate: Rate, cost: int, shared_wait: float | None) -> float | None:
        wait = self._local_hit(subject, rate, cost) if shared_wait is None else shared_wait
        if wait <= _SLACK:
            return None
        return float(max(1, math.ceil(round(wait, 3))))

    @staticmethod
    def _shared_args(link: RedisLink, subject: str, rate: Rate, cost: int) -> tuple[str, list[int]]:
        period_us = round(rate.seconds * 1_000_000)
        interval_us = max(1, period_us // rate.count)  # rounded down: `count` at once always fits the period
        return link.key("rate", subject), [interval_us, period_us, cost]

    def _shared_hit(self, link: RedisLink, script: Script, subject: str, rate: Rate, cost: int) -> float:
        """One EVALSHA (a SCRIPT LOAD too, the first time on a Redis server); the wait in seconds."""
        key, args = self._shared_args(link, subject, rate, cost)
        wait_us = link.run(lambda client: script(keys=[key], args=args, client=client))
        return int(wait_us) / 1_000_000

    def _local_hit(self, subject: str, rate: Rate, cost: int) -> float:
        """GCRA at this process's share of the rate; the wait in seconds."""
        interval = rate.seconds * self._processes / rate.count
        # A share below one request per period (more processes than `count`) still lets one through per interval.
        window = max(rate.seconds, interval * cost)
        with self._lock:
            now = self._clock()
            tat = max(self._local.get(subject, now), now)
            new_tat = tat + interval * cost
            wait = new_tat - window - now
            if wait <= _SLACK:
                self._local[subject] = new_tat
            if subject in self._local:
                self._local.move_to_end(subject)  # refused hits count as use too: a busy subject is kept
            self._forget(now)
        return wait

    def _forget(self, now: float) -> None:
        """Drop idle subjects from the old end (their state is the same as none), and the oldest past the cap."""
        for _ in range(8):  # a few per hit: amortised, never a long pause under the lock
            if not self._local or next(iter(self._local.values())) > now:
                break
            self._local.popitem(last=False)
        while len(self._local) > self._max_subjects:
            self._local.popitem(last=False)
