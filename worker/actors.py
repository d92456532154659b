"""The `apply_command` actor: apply a queued write once, or defer it, never half-apply it.

- Applied, superseded or duplicate: acknowledged (a redelivery is a duplicate).
- KeyConflict: recorded in command_conflicts by the apply step; acknowledged.
- UnknownCommand (a version newer than this release, queued by a newer web
  process during a deploy) and DependencyPending (marking read a notification
  whose creation is not applied yet): deferred. The message is enqueued again
  with a delay and this delivery acknowledged, so Dramatiq's retry budget is
  not spent on waiting. Order does not suffer from the re-enqueue: it is
  decided by acceptance stamps, not queue position (app/dispatch/hlc.py).
  After `max_deferrals` the message fails for good (Dramatiq's dead-letter
  queue).
- A transient database failure that outlasts the retry schedule raises, and
  Dramatiq's Retries middleware tries again later.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from app.db import Database, execute_with_retry
from app.dispatch.apply import KeyConflict, apply_envelope
from app.dispatch.commands import DependencyPending, Registry, UnknownCommand
from app.dispatch.envelope import APPLY_ACTOR, Envelope

log = logging.getLogger(__name__)

DEFERRALS_OPTION = "brownout_deferrals"


class DeferralsExhausted(Exception):
    """Raised when a write was deferred `max_deferrals` times and still cannot apply."""


@dataclass
class ApplyRuntime:
    """What the actor needs; built by the entry point (worker.main) or a test."""

    database: Database
    registry: Registry
    max_deferrals: int = 120
    defer_base_seconds: float = 1.0
    defer_cap_seconds: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def defer_delay_ms(self, deferrals: int) -> int:
        nominal = min(self.defer_cap_seconds, self.defer_base_seconds * 2.0**deferrals)
        return int(self.rng.uniform(nominal / 2, nominal) * 1000)  # jittered, never zero


def declare_apply_actor(broker: dramatiq.Broker, runtime: ApplyRuntime, *, queue_name: str) -> dramatiq.Actor[Any, Any]:
    def apply_command(data: dict[str, Any]) -> None:
        envelope = Envelope.model_validate(data)
        try:
            with runtime.database.session() as session:
                written = execute_with_retry(
                    session,
                    lambda: apply_envelope(session, runtime.registry, envelope, path="queued"),
                    idempotent=True,  # the apply step dedups by command id
                )
            log.debug("write %s %s", envelope.command_id, "duplicate" if written.duplicate else written.outcome)
        except KeyConflict:
            log.warning("write %s reuses its key with another body: recorded, not applied", envelope.command_id)
        except (UnknownCommand, DependencyPending) as reason:
            _defer(broker, runtime, envelope, reason)

    decorate = dramatiq.actor(
        broker=broker,
        actor_name=APPLY_ACTOR,
        queue_name=queue_name,
        max_retries=20,
        min_backoff=1_000,
        max_backoff=60_000,
    )
    actor: dramatiq.Actor[Any, Any] = decorate(apply_command)
    return actor


def _defer(broker: dramatiq.Broker, runtime: ApplyRuntime, envelope: Envelope, reason: Exception) -> None:
    current = CurrentMessage.get_current_message()
    if current is None:  # pragma: no cover - only without the CurrentMessage middleware
        raise RuntimeError("the worker's broker needs dramatiq's CurrentMessage middleware")
    deferrals = int(current.options.get(DEFERRALS_OPTION, 0))
    if deferrals >= runtime.max_deferrals:
        raise DeferralsExhausted(f"write {envelope.command_id} deferred {deferrals} times: {reason}")
    delay = runtime.defer_delay_ms(deferrals)
    again = current.copy(options={**current.options, DEFERRALS_OPTION: deferrals + 1})
    broker.enqueue(again, delay=delay)
    log.info("write %s deferred (%d) for %d ms: %s", envelope.command_id, deferrals + 1, delay, reason)
