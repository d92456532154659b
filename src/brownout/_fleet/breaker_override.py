"""The operator's forced breaker state, for the whole fleet.

`POST /admin/breaker` writes the action to Redis with a sequence number;
every process that talks to the database (the web processes and the worker's)
reads that record every `poll_seconds` (and the process that took the request
at once) and applies an action it has not applied yet to its own breaker. A process that starts later applies the standing action
when it starts.

While Redis is down an operator action cannot reach the fleet, so it is
refused (503) rather than applied to one process; processes keep the state
they last applied until Redis answers again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from brownout._cache.redis_link import RedisLink, RedisUnavailable
from brownout._db import CircuitBreaker

log = logging.getLogger(__name__)

Action = Literal["open", "close", "reset"]

# KEYS[1] record key; ARGV: action, time. The sequence lives in the record itself.
_SET = """
local old = redis.call('GET', KEYS[1])
local seq = 1
if old then seq = cjson.decode(old)['seq'] + 1 end
local record = cjson.encode({action = ARGV[1], at = tonumber(ARGV[2]), seq = seq})
redis.call('SET', KEYS[1], record)
return record
"""


class BreakerOverride:
    def __init__(
        self,
        link: RedisLink,
        breaker: CircuitBreaker,
        *,
        poll_seconds: float,
        on_applied: Callable[[Action], None] | None = None,
    ) -> None:
        """*on_applied* is told each action once this process has applied it (the worker's gate checks at once)."""
        self._link = link
        self._breaker = breaker
        self._poll_seconds = poll_seconds
        self._on_applied = on_applied
        self._key = link.key("breaker", "override")
        self._set = link.client.register_script(_SET)
        self._seen: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def apply(self, action: Action) -> dict[str, Any]:
        """Record *action* for the fleet and apply it here; raise RedisUnavailable if it cannot be shared."""
        raw = self._link.run(lambda client: self._set(keys=[self._key], args=[action, repr(time.time())]))
        record = dict(json.loads(raw))
        self._follow(record)
        return record

    def sync(self) -> dict[str, Any] | None:
        """Apply the standing action if this process has not yet; None when there is none."""
        try:
            raw = self._link.run(lambda client: client.get(self._key))
        except RedisUnavailable:
            return None
        if raw is None:
            return None
        record = dict(json.loads(raw))
        self._follow(record)
        return record

    def _follow(self, record: dict[str, Any]) -> None:
        with self._lock:
            if record["seq"] == self._seen:
                return
            self._seen = int(record["seq"])
        action = record["action"]
        if action == "open":
            self._breaker.force_open()
        elif action == "close":
            self._breaker.force_closed()
        else:
            self._breaker.reset()
        log.warning("breaker override applied: %s (fleet action #%s)", action, record["seq"])
        if self._on_applied is not None:
            self._on_applied(action)

    def start(self) -> BreakerOverride:
        self.sync()
        self._thread = threading.Thread(target=self._run, name="brownout-breaker-override", daemon=True)
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
            except Exception:  # the poller must outlive any surprise
                log.exception("breaker override poll failed")
