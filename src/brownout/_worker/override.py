"""The operator's fleet-wide records, followed by the worker too: the breaker override and read-only mode.

Both are recorded in Redis (src/brownout/_fleet/override_record.py) by `POST /admin/breaker` and
`POST /admin/mode`. A worker that ignored them would go on applying queued writes against the database an
operator forced the breaker open to spare, or while the operator holds the service read-only. Followed here:

- a forced-open breaker refuses the worker's batches (held, back in RabbitMQ) and keeps the health gate
  closed (src/brownout/_worker/health_gate.py) until the override is lifted; the gate then checks at once;
- read-only mode (src/brownout/_fleet/read_only.py) holds the gate the same way: a batch not started is
  refused by the actor and goes back to RabbitMQ, the gate pauses consumption within one poll interval of
  the switch, and checks at once when the mode ends.
"""

from __future__ import annotations

import dramatiq
from dramatiq.middleware import Middleware

from brownout._cache.redis_link import RedisLink
from brownout._db import CircuitBreaker
from brownout._fleet.breaker_override import Action, BreakerOverride
from brownout._fleet.override_record import OverrideRecord
from brownout._fleet.read_only import WriteMode
from brownout._worker.health_gate import HealthGate


class FollowOperator(Middleware):
    """Follow the standing records before the gate's first check (add this middleware before the gate),
    then poll them every *poll_seconds* while the worker runs."""

    def __init__(
        self, link: RedisLink, breaker: CircuitBreaker, *, gate: HealthGate, mode: WriteMode, poll_seconds: float
    ) -> None:
        self._gate = gate
        self.override = BreakerOverride(link, breaker, poll_seconds=poll_seconds, on_applied=self._applied)
        self.mode = OverrideRecord(link, "mode", field="mode", poll_seconds=poll_seconds, follow=mode.follow)

    def _applied(self, action: Action) -> None:
        if action != "open":
            self._gate.check_now()

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Before Dramatiq starts the consumers: a standing "open" or read-only mode holds from the first delivery.
        self.override.sync()
        self.mode.sync()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.override.start()
        self.mode.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.override.stop()
        self.mode.stop()
