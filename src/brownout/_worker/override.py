"""The operator's fleet-wide breaker override (`POST /admin/breaker`), followed by the worker too.

The override is recorded in Redis (src/brownout/_fleet/breaker_override.py). A worker that ignored it would go on
applying queued writes against the database an operator forced the breaker open to spare. Followed here,
a forced-open breaker refuses the worker's batches (held, back in RabbitMQ) and keeps the health gate
closed (src/brownout/_worker/health_gate.py) until the override is lifted; the gate then checks at once.
"""

from __future__ import annotations

import dramatiq
from dramatiq.middleware import Middleware

from brownout._cache.redis_link import RedisLink
from brownout._db import CircuitBreaker
from brownout._fleet.breaker_override import Action, BreakerOverride
from brownout._worker.health_gate import HealthGate


class FollowBreakerOverride(Middleware):
    """Apply the standing override before the gate's first check (add this middleware before the gate),
    then poll it every *poll_seconds* while the worker runs."""

    def __init__(self, link: RedisLink, breaker: CircuitBreaker, *, gate: HealthGate, poll_seconds: float) -> None:
        self._gate = gate
        self.override = BreakerOverride(link, breaker, poll_seconds=poll_seconds, on_applied=self._applied)

    def _applied(self, action: Action) -> None:
        if action != "open":
            self._gate.check_now()

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.override.sync()  # before Dramatiq starts the consumers: a standing "open" holds from the first delivery

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.override.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.override.stop()
