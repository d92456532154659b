"""One Redis client per process, with deadlines set on purpose and a skip window.

redis-py's defaults suit a Redis that is up: 5 s socket timeouts and three
retries cost about 4.5 s against a refusing Redis and over a minute against
one that accepts and never answers (both measured here). Redis is only ever a
shortcut for Brownout (the database stays the truth), so every command gets a
deadline of tens of milliseconds, no retry, and after one failure the process
goes around Redis for `skip_seconds` instead of paying that deadline on every
request. Hand-written because no client library offers the skip window; it is
the same idea as the database breaker, at a much smaller scale.

One exception: a *timeout* on a link that was answering trips the window only
if the previous command timed out too. Under CPU starvation one command can
miss a 50 ms deadline while Redis is fine (seen in the chaos run's drain), and
a whole skip window without Redis costs every read the cache and the pending
entries it needs. A refused or reset connection trips at once; a silent Redis
costs two deadlines instead of one; once tripped, any failure trips again.

Errors::

    RedisUnavailable   Redis is being skipped, or a command just failed (and started a skip)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from starlette.concurrency import run_in_threadpool

from brownout._redaction import mask_secrets
from brownout._settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

_LOOP_LATE_SECONDS = 0.01
"""How late past its deadline a command's timer may run before the event loop, not Redis, is deemed slow."""


class RedisUnavailable(Exception):
    """Raised when Redis is being skipped after a failure, or a command just failed."""


class RedisLink:
    """A Redis client that fails within its deadline and then stays out of the way for a while."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        skip_seconds: float,
        where: str = "redis",
        clock: Callable[[], float] = time.monotonic,
        aclient: redis.asyncio.Redis | None = None,
        atimeout: float | None = None,
    ) -> None:
        """*aclient*: the same server through redis.asyncio, for `arun` on the event loop (None: `arun`
        runs the command with *client* in the thread pool); *atimeout*: each `arun` command's deadline, kept
        here (one timer per command, where the client's own socket timeout sets one for the write and one
        for the read: a tenth of a cache hit's CPU)."""
        self.client = client
        self.aclient = aclient
        self._atimeout = atimeout
        self.prefix = prefix
        self.on_error: Callable[[str], None] | None = None  # told each failed call's kind (metrics)
        self._skip_seconds = skip_seconds
        self._clock = clock
        self._where = where
        self._lock = threading.Lock()
        self._epoch_lock = threading.Lock()  # held over one INCR (50 ms deadline at most)
        self._skip_until = 0.0
        self._down = False
        self._missed_write = False
        self._trips = 0
        self._timed_out = False  # the last command timed out
        self.last_error: str | None = None

    @property
    def available(self) -> bool:
        """False while a skip window runs (no round trip is made)."""
        return self._clock() >= self._skip_until

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(part) for part in parts)

    @property
    def epoch_key(self) -> str:
        return self.key("cache", "epoch")

    def missed_write(self) -> None:
        """A write could not tell Redis: cached entries must stop being fresh once Redis answers."""
        self._missed_write = True

    def run(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run *fn* with the client; raise RedisUnavailable instead of any Redis connection error."""
        trips_before = self._before()
        try:
            if self._missed_write:  # before anything is read from Redis again (read_cache.py)
                self._bump_epoch()
            result = fn(self.client)
        # Any error, not only a lost connection: OOM (maxmemory with noeviction) and READONLY (a replica after
        # a failover) answer every write, and this call's caller can only go around Redis either way.
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        self._answered(trips_before)
        return result

    async def arun(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`run` on the event loop: *fn* gets the asyncio client (a command there has the same name and
        arguments), under the same deadline and skip window. Without one, the command runs in the thread pool."""
        if self.aclient is None:
            return await run_in_threadpool(self.run, fn)  # type: ignore[arg-type]  # the sync client answers in place
        trips_before = self._before()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self._atimeout):  # a cancelled command's connection is dropped by redis-py
                if self._missed_write:
                    await self._abump_epoch(self.aclient)
                result = await fn(self.aclient)
        # RuntimeError too: under uvloop, a pooled connection whose peer reset it raises "the handler is closed"
        # on its next write (redis-py then drops the connection, so the next command reconnects).
        except (redis.RedisError, OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "closed" not in str(exc):
                raise  # a bug, not Redis
            if isinstance(exc, TimeoutError) and not isinstance(exc, redis.TimeoutError):  # asyncio.timeout's
                late = loop.time() - started - (self._atimeout or 0.0)
                if late > max(_LOOP_LATE_SECONDS, (self._atimeout or 0.0) / 2):
                    raise self._loop_late(late) from exc
                exc = redis.TimeoutError(f"no answer within {self._atimeout} s")
            raise self._failed(exc) from exc
        self._answered(trips_before)
        return result

    def _loop_late(self, late: float) -> RedisUnavailable:
        """The deadline's timer ran *late* past its time: the event loop stalled (a CPU-bound callback, a
        collection, a saturated process), and a reply may be waiting unread, as libuv runs due timers before it
        polls. The process's own slowness, not Redis's: this call goes around Redis, the link does not trip
        (a socket timeout in a thread would not have fired either: the kernel kept the reply)."""
        if self.on_error is not None:
            self.on_error("loop_late")
        return RedisUnavailable(f"the event loop ran {late * 1000:.0f} ms late: no verdict on Redis")

    def _before(self) -> int:
        if not self.available:
            raise RedisUnavailable(f"skipping Redis after: {self.last_error}")
        return self._trips

    def _failed(self, exc: BaseException) -> RedisUnavailable:
        if self.on_error is not None:
            self.on_error(error_kind(exc))
        if not self._lone_timeout(exc):
            self._tripped(exc)
        return RedisUnavailable(self.last_error or "redis failed")

    def _answered(self, trips_before: int) -> None:
        self._timed_out = False
        if self._down and self._trips == trips_before:  # a call that began before a trip proves nothing
            self._recovered()

    def _lone_timeout(self, exc: BaseException) -> bool:
        """True for a first timeout on a link that was answering: reported, not tripped (module docstring)."""
        with self._lock:
            lone = isinstance(exc, redis.TimeoutError) and not self._down and not self._timed_out
            self._timed_out = isinstance(exc, redis.TimeoutError)
            if lone:
                self.last_error = mask_secrets(f"{type(exc).__name__}: {exc}")
            return lone

    def _bump_epoch(self) -> None:
        """One INCR per missed spell, however many threads come back at once; a failed INCR leaves the flag set."""
        with self._epoch_lock:
            if not self._missed_write:
                return  # another thread just did it
            self.client.incr(self.epoch_key)
            self._missed_write = False
        log.warning("Redis answers again after missing a write: cached entries are no longer fresh")

    async def _abump_epoch(self, aclient: redis.asyncio.Redis) -> None:
        """`_bump_epoch` on the event loop. The flag stays set until Redis has counted the INCR, so nothing
        reads Redis in between as if it had (threads bump too, coroutines arriving meanwhile bump again: an
        extra INCR only costs freshness, which the first already did)."""
        await aclient.incr(self.epoch_key)
        if self._missed_write:
            self._missed_write = False
            log.warning("Redis answers again after missing a write: cached entries are no longer fresh")

    def ping(self) -> dict[str, Any]:
        """Readiness view: never raises."""
        if not self.available:
            return {"ok": False, "skipping": True, "error": self.last_error}
        started = time.monotonic()
        try:
            self.run(lambda client: client.ping())
        except RedisUnavailable:
            return {"ok": False, "skipping": False, "error": self.last_error}
        return {"ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 2)}

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        """Close the asyncio client's connections, on the loop that made them."""
        if self.aclient is not None:
            await self.aclient.aclose()

    def _tripped(self, exc: BaseException) -> None:
        with self._lock:
            self._skip_until = self._clock() + self._skip_seconds
            self._trips += 1
            first = not self._down
            self._down = True
            self.last_error = mask_secrets(f"{type(exc).__name__}: {exc}")
        if first:
            log.warning(
                "Redis at %s failed (%s): going around it for %.1f s at a time", self._where, self.last_error, self._skip_seconds
            )

    def _recovered(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            log.warning("Redis at %s answers again", self._where)


def error_kind(exc: BaseException) -> str:
    """A failed call's kind, as metrics label it (a bounded set)."""
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    if isinstance(exc, (redis.ConnectionError, OSError, RuntimeError)):  # RuntimeError: a closed transport (arun)
        return "connection"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "out_of_memory"
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return "read_only"
    return "other"


def build_redis_link(settings: Settings) -> RedisLink | None:
    """The process's link, or None when REDIS_URL is unset."""
    if not settings.redis_url:
        return None
    timeout = settings.redis_timeout_seconds
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry_on_timeout": False,
        "health_check_interval": 0,
        "decode_responses": True,
        "client_name": "brownout",
    }
    # No retry: one attempt within the deadline, then the skip window decides. The asyncio client serves
    # the requests answered on the event loop (a cache hit); it connects on its first command, on that loop.
    client = redis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), **options)
    options["socket_timeout"] = None  # the link times each command as a whole (RedisLink.arun)
    aclient = redis.asyncio.Redis.from_url(settings.redis_url, retry=AsyncRetry(NoBackoff(), 0), **options)
    return RedisLink(
        client,
        prefix=settings.redis_key_prefix,
        skip_seconds=settings.redis_skip_seconds,
        where=mask_secrets(settings.redis_url),
        aclient=aclient,
        atimeout=timeout,
    )
