"""An operator's decision for the whole fleet: one record in Redis, followed by every process.

An operator action taken on one web process (`POST /admin/breaker`, `POST /admin/mode`) must reach every
process that talks to the database, web and worker, and every process started later. So the action is
written to one Redis record with a sequence number (`<prefix><name>:override`, never expiring); each
process reads it every `poll_seconds` (the process that took the request at once) and follows a record
whose sequence it has not followed yet. A process that starts later follows the standing record when it
starts.

While Redis is down an action cannot reach the fleet, so recording it raises RedisUnavailable (the route
answers 503) rather than applying it to one process; processes keep what they last followed until Redis
answers again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from brownout._cache.redis_link import RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

# KEYS[1] record key; ARGV: field, value, time. The sequence lives in the record itself; `since` is when the
# value last changed (recording the value standing again keeps it), `at` when it was last recorded.
_SET = """
local old = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[3])
local seq, since = 1, now
if old then
  local previous = cjson.decode(old)
  seq = previous['seq'] + 1
  if previous[ARGV[1]] == ARGV[2] and previous['since'] then since = previous['since'] end
end
local record = {at = now, seq = seq, since = since}
record[ARGV[1]] = ARGV[2]
local encoded = cjson.encode(record)
redis.call('SET', KEYS[1], encoded)
return encoded
"""


class OverrideRecord:
    """One fleet-wide operator decision, followed by this process.

    *field* names the decision in the record (`action` for the breaker, `mode` for read-only mode);
    *follow* is told each record with a sequence number this process has not followed yet; *each_poll*,
    when given, runs after every poll, Redis or not (a state of this process's own to re-evaluate)."""

    def __init__(
        self,
        link: RedisLink,
        name: str,
        *,
        field: str,
        poll_seconds: float,
        follow: Callable[[dict[str, Any]], None],
        each_poll: Callable[[], object] | None = None,
    ) -> None:
        self.name = name
        self.field = field
        self._link = link
        self._poll_seconds = poll_seconds
        self._follow = follow
        self._each_poll = each_poll
        self._key = link.key(name, "override")
        self._set = link.client.register_script(_SET)
        self._seen: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, value: str) -> dict[str, Any]:
        """Record *value* for the fleet and follow it here; raise RedisUnavailable if it cannot be shared."""
        with self._lock:  # a poll in flight must not follow the record this one replaces after it
            raw = self._link.run(lambda client: self._set(keys=[self._key], args=[self.field, value, repr(time.time())]))
            record = dict(json.loads(raw))
            self._offer(record)
        return record

    def sync(self) -> dict[str, Any] | None:
        """Follow the standing record if this process has not yet; None when there is none or Redis is away."""
        with self._lock:
            try:
                raw = self._link.run(lambda client: client.get(self._key))
            except RedisUnavailable:
                return None
            if raw is None:
                return None
            record = dict(json.loads(raw))
            self._offer(record)
        return record

    def _offer(self, record: dict[str, Any]) -> None:
        """Follow *record* unless it is the one followed last (the lock is held)."""
        if record["seq"] == self._seen:
            return
        self._seen = int(record["seq"])
        self._follow(record)

    def start(self) -> OverrideRecord:
        self.sync()
        self._thread = threading.Thread(target=self._run, name=f"brownout-{self.name}-override", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._poll_seconds + 1)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.sync()
                if self._each_poll is not None:
                    self._each_poll()
            except Exception:  # the poller must outlive any surprise
                log.exception("%s override poll failed", self.name)
