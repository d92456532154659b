"""The `apply_command` actor: apply a queued write once, or defer it, never half-apply it.

- Applied, superseded or duplicate: acknowledged (a redelivery is a duplicate).
- A failure of the write's own (payload or envelope that does not validate,
  KeyConflict — also recorded in command_conflicts —, a permanent database
  error such as a constraint, deferrals exhausted): kept as a dead letter in
  PostgreSQL with its reason (app/dispatch/dead_letters.py) and acknowledged,
  so the messages around it go on.
- UnknownCommand (a version newer than this release, queued by a newer web
  process during a deploy) and DependencyPending (marking read a notification
  whose creation is not applied yet): deferred. The message is enqueued again
  with a delay and this delivery acknowledged, so Dramatiq's retry budget is
  not spent on waiting. Order does not suffer from the re-enqueue: it is
  decided by acceptance stamps, not queue position (app/dispatch/hlc.py).
  After `max_deferrals` it becomes a dead letter.
- The database unreachable (breaker open, deadline spent, a transient failure
  that outlasts the retry schedule): raised as DatabaseUnavailable, which the
  health gate (worker/health_gate.py) holds: the message goes back to
  RabbitMQ in its place, the worker pauses until `SELECT 1` passes, and no
  retry is spent.

Writes in flight are committed together (worker/batching.py, `batch_max`);
each message is still acknowledged only after the COMMIT holding its write,
and each gets its own outcome above.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage
from pydantic import ValidationError

from app.db import Database, describe, execute_with_retry
from app.dispatch import dead_letters
from app.dispatch.apply import AppliedWrite, KeyConflict, apply_envelope
from app.dispatch.apply_batch import Pending
from app.dispatch.commands import DependencyPending, Registry, UnknownCommand
from app.dispatch.envelope import APPLY_ACTOR, Envelope
from worker.batching import BatchInterrupted, GroupCommit
from worker.drain import AdaptiveDrain
from worker.health_gate import DatabaseUnavailable, is_unavailability, unavailable_as_hold

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
    on_applied: Callable[..., None] | None = None
    """Told the entity after each committed apply (the read side's cache and pending entries):
    `on_applied(item, current=...)`, current False for a duplicate (app/cache/applied_elsewhere.py)."""
    observe: Callable[[str, float], None] | None = None
    """Told each message's outcome (applied, superseded, duplicate, deferred, dead_lettered, held) and time."""
    batch_max: int = 64
    """Most writes committed in one transaction; 1: each in its own (`apply_envelope`)."""
    batch_linger_seconds: float = 0.005
    """Longest a batch waits for every write in flight to join it (with an AdaptiveDrain, whose limit says how many)."""
    group: GroupCommit | None = None
    """Built from the batch_* fields unless given."""

    def __post_init__(self) -> None:
        if self.group is None and self.batch_max > 1:
            self.group = GroupCommit(self.database, max_batch=self.batch_max, linger_seconds=self.batch_linger_seconds)

    def write(self, envelope: Envelope) -> AppliedWrite:
        """Apply *envelope* and commit (with the writes in flight, when batching); raise its error."""
        if self.group is None:
            with self.database.session() as session:
                return execute_with_retry(
                    session,
                    lambda: apply_envelope(session, self.registry, envelope, path="queued"),
                    idempotent=True,  # the apply step dedups by command id
                )
        command = self.registry.get(envelope.name)
        payload = command.parse(envelope.version, envelope.payload)  # an invalid one never joins a batch
        return self.group.apply(Pending(envelope, command, payload))

    def defer_delay_ms(self, deferrals: int) -> int:
        nominal = min(self.defer_cap_seconds, self.defer_base_seconds * 2.0**deferrals)
        return int(self.rng.uniform(nominal / 2, nominal) * 1000)  # jittered, never zero


def declare_apply_actor(broker: dramatiq.Broker, runtime: ApplyRuntime, *, queue_name: str) -> dramatiq.Actor[Any, Any]:
    def apply_command(data: dict[str, Any]) -> None:
        started = time.perf_counter()
        outcome = "held"
        try:
            with unavailable_as_hold():  # the database's fault: the health gate holds the message
                outcome = _apply(broker, runtime, data)
        finally:
            if runtime.observe is not None:
                runtime.observe(outcome, time.perf_counter() - started)

    decorate = dramatiq.actor(
        broker=broker,
        actor_name=APPLY_ACTOR,
        queue_name=queue_name,
        throws=(DatabaseUnavailable,),  # held by the gate: no retry spent, no delay queue
        max_retries=20,
        min_backoff=1_000,
        max_backoff=60_000,
    )
    actor: dramatiq.Actor[Any, Any] = decorate(apply_command)
    drains = [middleware for middleware in broker.middleware if isinstance(middleware, AdaptiveDrain)]
    if runtime.group is not None and runtime.group.capacity is None and drains:
        runtime.group.capacity = lambda: drains[0].limit  # the writes that can be in flight at once
    return actor


def _apply(broker: dramatiq.Broker, runtime: ApplyRuntime, data: dict[str, Any]) -> str:
    """Return the outcome: applied, superseded, duplicate, deferred or dead_lettered."""
    try:
        envelope = Envelope.model_validate(data)
    except ValidationError as invalid:
        _dead_letter(runtime, f"invalid envelope: {invalid}")
        return "dead_lettered"
    try:
        written = runtime.write(envelope)
        log.debug("write %s %s", envelope.command_id, "duplicate" if written.duplicate else written.outcome)
        if runtime.on_applied is not None:
            try:
                runtime.on_applied(written.result, current=not written.duplicate)
            except Exception:  # the write is committed: telling the cache is best effort
                log.exception("after-apply hook failed for %s", envelope.command_id)
        return "duplicate" if written.duplicate else written.outcome
    except (UnknownCommand, DependencyPending) as reason:
        try:
            _defer(broker, runtime, envelope, reason)
            return "deferred"
        except DeferralsExhausted as exhausted:
            _dead_letter(runtime, str(exhausted))
    except KeyConflict as conflict:
        _dead_letter(runtime, str(conflict))
    except ValidationError as invalid:
        _dead_letter(runtime, f"invalid {envelope.name} v{envelope.version} payload: {invalid}")
    except BatchInterrupted:
        raise  # its batch's outcome is unknown: Dramatiq retries it (a duplicate if it committed)
    except Exception as exc:
        if is_unavailability(exc):
            raise  # the database's fault, not the write's
        _dead_letter(runtime, f"permanent database error: {describe(exc)}")
    return "dead_lettered"


def _dead_letter(runtime: ApplyRuntime, reason: str) -> None:
    dead_letter_current(runtime.database, reason)


def dead_letter_current(database: Database, reason: str) -> int:
    """Keep the message being processed with *reason*; raises if the database cannot take it
    (then the message is held by the health gate or retried, never lost)."""
    current = CurrentMessage.get_current_message()
    if current is None:  # pragma: no cover - only without the CurrentMessage middleware
        raise RuntimeError("the worker's broker needs dramatiq's CurrentMessage middleware")
    with database.session() as session:
        dead_letter_id = execute_with_retry(session, lambda: dead_letters.store(session, current, reason), idempotent=False)
    log.error("%s %s dead-lettered as #%d: %s", current.actor_name, current.message_id, dead_letter_id, reason)
    return dead_letter_id


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
