"""The operator's forced breaker state, for the whole fleet.

`POST /admin/breaker` records the action in the fleet's `breaker` override record
(src/brownout/_fleet/override_record.py: Redis, a sequence number, polled by every
process that talks to the database, web and worker); each process applies an action
it has not applied yet to its own breaker. A process that starts later applies the
standing action when it starts.

While Redis is down an operator action cannot reach the fleet, so it is
refused (503) rather than applied to one process; processes keep the state
they last applied until Redis answers again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from brownout._cache.redis_link import RedisLink
from brownout._db import CircuitBreaker
from brownout._fleet.override_record import OverrideRecord

log = logging.getLogger(__name__)

Action = Literal["open", "close", "reset"]


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
        self._breaker = breaker
        self._on_applied = on_applied
        self._record = OverrideRecord(link, "breaker", field="action", poll_seconds=poll_seconds, follow=self._follow)

    def apply(self, action: Action) -> dict[str, Any]:
        """Record *action* for the fleet and apply it here; raise RedisUnavailable if it cannot be shared."""
        return self._record.record(action)

    def sync(self) -> dict[str, Any] | None:
        """Apply the standing action if this process has not yet; None when there is none."""
        return self._record.sync()

    def _follow(self, record: dict[str, Any]) -> None:
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
        self._record.start()
        return self

    def stop(self) -> None:
        self._record.stop()
