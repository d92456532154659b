"""The apply actor: queued writes applied once, in batches, each write with its own fate, none half-applied.

The command queue is consumed in batches (src/brownout/_worker/batched_delivery.py): one
call of this actor gets every delivery the consumer had, up to `batch_max`,
and applies them in one transaction (src/brownout/_dispatch/apply_batch.py), in
entity-key order (stable: a creation stays before the writes that need it),
so batches of several worker processes lock rows in the same order and
cannot deadlock one another. The batch is acknowledged once the actor
returns, after the COMMIT holding its writes. Each write's own outcome:

- Applied, superseded or duplicate: acknowledged (a redelivery is a duplicate).
- A failure of the write's own (payload or envelope that does not validate,
  KeyConflict — also recorded in command_conflicts —, a permanent database
  error such as a constraint, its wait over, any unexpected error while
  reading, applying or deferring it): kept as a dead letter in PostgreSQL with
  its reason (src/brownout/_dispatch/dead_letters.py) and acknowledged, so the writes
  around it go on. Should PostgreSQL refuse the message as JSON, the dead
  letter keeps it as text.
- A failure of the batch as a whole that is not the database's (Dramatiq's
  time limit, an unexpected error outside any one write): the batch is held
  once and each of its writes comes back in a batch of its own
  (`DeliveryBatch.one_by_one`); a write that fails that way alone is the one
  to blame, and is dead-lettered with the error. Nothing goes to ``Q.XQ``
  but a body that cannot be decoded at all.
- Refused (the write's own data breaks a rule its apply checks): recorded ``dropped`` with the reason, like
  a wait that ended, and acknowledged. An ordinary refusal of the caller's, not an operator's alert.
  NotPermitted (its caller may not write that entity, queued while the database could not tell) waits as
  DependencyPending does, in the words of an entity not found, then is dropped: its command's status says
  what it says of an entity that does not exist.
- UnknownCommand (a version newer than this release, queued by a newer web
  process during a deploy) and DependencyPending (an update of an entity
  whose creation is not applied yet): deferred. The message is enqueued again
  with a delay and this delivery acknowledged, so no retry budget is spent on
  waiting. Order does not suffer from the re-enqueue: it is decided by
  acceptance stamps, not queue position (src/brownout/_dispatch/hlc.py). How long each
  may wait, and how the wait ends, is src/brownout/_dispatch/waiting.py: an unknown
  version becomes a dead letter (to replay once its release is out), a write
  whose prerequisite never came is recorded ``dropped``.
- A deferral RabbitMQ refuses (the delay queue full, a resource alarm): that
  delivery alone is given back to RabbitMQ a few seconds later (`DeliveryBatch.hold`),
  the rest of its batch goes on.
- Read-only mode (src/brownout/_fleet/read_only.py), checked once as a batch
  starts: the batch is held as below, untouched; a batch that started before
  the switch completes.
- The database unreachable (breaker open, deadline spent, a transient failure
  that outlasts the retry schedule) for the batch, or a dead letter that
  cannot be kept even as text: the whole batch is raised as
  DatabaseUnavailable, which the health gate (src/brownout/_worker/health_gate.py) holds:
  its deliveries go back to RabbitMQ in their place, the worker pauses until
  `SELECT 1` passes, and nothing is spent. Writes of the batch that did commit
  come back as duplicates.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.errors import BrokerError
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from brownout._db import Database, describe, execute_with_retry
from brownout._dispatch import dead_letters, waiting
from brownout._dispatch.apply import AppliedWrite, KeyConflict, Path, record_dropped
from brownout._dispatch.apply_batch import Outcome, Pending, apply_batch
from brownout._dispatch.commands import DependencyPending, NotPermitted, Refused, Registry, UnknownCommand
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.queues import BrownoutRabbitmqBroker
from brownout._dispatch.waiting import WaitLimits
from brownout._fleet.read_only import WriteMode
from brownout._observability import incident_events
from brownout._worker.batched_delivery import DeliveryBatch, batched
from brownout._worker.drain import AdaptiveDrain
from brownout._worker.health_gate import DatabaseUnavailable, is_unavailability, unavailable_as_hold

log = logging.getLogger(__name__)
dead_letter_log = logging.getLogger(incident_events.DEAD_LETTER_LOGGER)

APPLY_BATCH_ACTOR = "apply_command_batch"
"""The actor a batch of the command queue's deliveries is handed to (worker-internal: never published)."""


@dataclass
class ApplyRuntime:
    """What the actor needs; built by the entry point (brownout._worker.main) or a test."""

    database: Database
    registry: Registry
    limits: WaitLimits = field(default_factory=WaitLimits)
    """How long a deferred write may wait, by reason (src/brownout/_dispatch/waiting.py)."""
    wall: Callable[[], float] = time.time
    """The wall clock a wait is measured on (tests move it instead of sleeping)."""
    defer_base_seconds: float = 1.0
    defer_cap_seconds: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    on_applied: Callable[[Sequence[tuple[dict[str, Any], bool]]], None] | None = None
    """Told each batch's committed writes, as (item, current) pairs, current False for a duplicate
    (the service's read side: its registry's `after_apply`)."""
    observe: Callable[[str, float], None] | None = None
    """Told each message's outcome (applied, superseded, duplicate, dropped, deferred, dead_lettered, held) and
    its batch's time."""
    on_batch: Callable[[int], None] | None = None
    """Told each batch's size before it is applied (metrics, tests)."""
    batch_max: int = 64
    """Most deliveries applied in one transaction (1: each alone)."""
    stopping: threading.Event | None = None
    """Set at worker shutdown: a batch not started by then is left for RabbitMQ to take back (the
    adaptive drain's, wired by `declare_apply_actor`: it lets every thread waiting for a permit through)."""
    path: Path = "queued"
    mode: WriteMode | None = None
    """The process's write mode: a batch starting while it refuses writes is held (back to RabbitMQ)."""

    def apply_all(self, items: Sequence[Pending]) -> list[Outcome]:
        """Apply *items* in one transaction, in entity-key order; outcomes in *items*' order.
        Raises when the batch fails as a whole (the database unavailable)."""
        order = sorted(range(len(items)), key=lambda index: items[index].envelope.entity_key)
        with self.database.session() as session:
            results = execute_with_retry(
                session,
                lambda: apply_batch(session, [items[index] for index in order], path=self.path),
                idempotent=True,  # every envelope that committed comes back a duplicate
            )
        by_index = dict(zip(order, results, strict=True))
        return [by_index[index] for index in range(len(items))]

    def defer_delay_ms(self, deferrals: int) -> int:
        # The exponent is capped before it is used: 2.0**1024 overflows a float, 13 h or so into a long wait.
        nominal = min(self.defer_cap_seconds, self.defer_base_seconds * 2.0 ** min(deferrals, 64))
        return int(self.rng.uniform(nominal / 2, nominal) * 1000)  # jittered, never zero


def declare_apply_actor(broker: BrownoutRabbitmqBroker, runtime: ApplyRuntime, *, queue_name: str) -> dramatiq.Actor[Any, Any]:
    """Declare the batch actor on *queue_name* and have *broker* consume that queue in batches."""

    def apply_command_batch(messages: list[dramatiq.Message[Any]]) -> None:
        if runtime.stopping is not None and runtime.stopping.is_set():
            current = CurrentMessage.get_current_message()
            if isinstance(current, DeliveryBatch):  # not started: back to RabbitMQ as it was, not applied now
                current.withdraw()
                log.info("worker stopping: %r left to RabbitMQ", current)
                return
        _apply_messages(broker, runtime, messages)

    decorate = dramatiq.actor(
        broker=broker,
        actor_name=APPLY_BATCH_ACTOR,
        queue_name=queue_name,
        throws=(DatabaseUnavailable,),  # held by the gate: no retry, no delay queue
        max_retries=0,  # each write's own failure is handled above; a batch is never republished
    )
    actor: dramatiq.Actor[Any, Any] = decorate(apply_command_batch)
    drains = [middleware for middleware in broker.middleware if isinstance(middleware, AdaptiveDrain)]
    if runtime.stopping is None and drains:
        runtime.stopping = drains[0].stopping
    broker.consume_with(queue_name, batched(actor_name=APPLY_BATCH_ACTOR, max_batch=runtime.batch_max))
    return actor


@dataclass
class _Slot:
    """One delivery of a batch and what became of it."""

    message: dramatiq.Message[Any]
    outcome: str = "held"
    envelope: Envelope | None = None
    pending: Pending | None = None
    defer_reason: Exception | None = None
    drop_reason: str | None = None
    dead_reason: str | None = None


def _apply_messages(broker: dramatiq.Broker, runtime: ApplyRuntime, messages: list[dramatiq.Message[Any]]) -> None:
    started = time.perf_counter()
    slots = [_prepare(runtime, message) for message in messages]
    if runtime.on_batch is not None:
        runtime.on_batch(len(slots))
    try:
        with unavailable_as_hold():  # the database's fault: the health gate holds the whole batch
            if runtime.mode is not None and runtime.mode.refusing:  # once, before anything of the batch is done
                raise DatabaseUnavailable("read-only mode: the batch waits in RabbitMQ")
            try:
                _apply_slots(runtime, [slot for slot in slots if slot.pending is not None])
                for index, slot in enumerate(slots):
                    _finish(broker, runtime, slot, index)
            except (Exception, TimeLimitExceeded) as exc:
                if is_unavailability(exc):
                    raise
                _failed_as_a_whole(runtime, slots, exc)
    except DatabaseUnavailable:
        for slot in slots:
            slot.outcome = "held"
        raise
    finally:
        if runtime.observe is not None:
            elapsed = time.perf_counter() - started
            for slot in slots:
                runtime.observe(slot.outcome, elapsed)


def _prepare(runtime: ApplyRuntime, message: dramatiq.Message[Any]) -> _Slot:
    """Validate a delivery; a write that cannot be applied gets its reason (dead letter or deferral)."""
    slot = _Slot(message)
    try:
        (data,) = message.args
        envelope = slot.envelope = Envelope.model_validate(data)
    except (ValidationError, ValueError, TypeError) as invalid:
        slot.dead_reason = f"invalid envelope: {describe(invalid)}"
        return slot
    try:
        command = runtime.registry.get(envelope.name)
        payload = command.parse(envelope.version, envelope.payload)
    except UnknownCommand as unknown:
        slot.defer_reason = unknown
        return slot
    except ValidationError as invalid:
        slot.dead_reason = f"invalid {envelope.name} v{envelope.version} payload: {describe(invalid)}"
        return slot
    except Exception as exc:  # a payload model's own bug: this write's failure, not its batch's
        slot.dead_reason = f"error while reading it: {describe(exc)}"
        return slot
    slot.pending = Pending(envelope, command, payload)
    return slot


def _apply_slots(runtime: ApplyRuntime, slots: list[_Slot]) -> None:
    if not slots:
        return
    outcomes = runtime.apply_all([slot.pending for slot in slots if slot.pending is not None])
    committed: list[tuple[dict[str, Any], bool]] = []
    for slot, outcome in zip(slots, outcomes, strict=True):
        if isinstance(outcome, AppliedWrite):
            slot.outcome = "duplicate" if outcome.duplicate else outcome.outcome
            committed.append((outcome.result, not outcome.duplicate))
        elif isinstance(outcome, DependencyPending):
            slot.defer_reason = outcome
        elif isinstance(outcome, NotPermitted):  # waits as a write whose entity never comes: nothing learnt from it
            slot.defer_reason = DependencyPending(str(outcome))
        elif isinstance(outcome, Refused):
            slot.drop_reason = outcome.reason
        elif isinstance(outcome, KeyConflict):
            slot.dead_reason = str(outcome)
        else:
            what = "permanent database error" if isinstance(outcome, DBAPIError) else "error while applying it"
            slot.dead_reason = f"{what}: {describe(outcome)}"
    if committed and runtime.on_applied is not None:
        try:
            runtime.on_applied(committed)
        except Exception:  # the writes are committed: telling the cache is best effort
            log.exception("after-apply hook failed for a batch of %d", len(committed))


def _finish(broker: dramatiq.Broker, runtime: ApplyRuntime, slot: _Slot, index: int) -> None:
    """Defer, drop or dead-letter one write, as its outcome says; an unexpected error doing so is that write's."""
    if slot.drop_reason is not None:
        try:
            _drop(runtime, slot, slot.drop_reason)
        except Exception as exc:
            if is_unavailability(exc):
                raise
            log.exception("write %s: error while recording it dropped", slot.message.message_id)
            slot.dead_reason = f"error while recording it dropped: {describe(exc)}"
    if slot.defer_reason is not None:
        try:
            _defer_or_dead_letter(broker, runtime, slot, index)
        except Exception as exc:
            if is_unavailability(exc):
                raise
            log.exception("write %s: error while deferring it", slot.message.message_id)
            slot.dead_reason = f"error while deferring it: {describe(exc)}"
    if slot.dead_reason is not None:
        _dead_letter(runtime, slot)


def _failed_as_a_whole(runtime: ApplyRuntime, slots: list[_Slot], exc: BaseException) -> None:
    """The batch failed and no write of it can be blamed: hold it once, its writes to come back one per
    batch; a write that fails so alone is the culprit, and a dead letter."""
    current = CurrentMessage.get_current_message()
    if len(slots) > 1 and isinstance(current, DeliveryBatch):
        log.warning("%r failed as a whole (%s): held, its writes to come back one by one", current, describe(exc))
        current.one_by_one()
        for slot in slots:
            slot.outcome = "held"
        return
    if len(slots) > 1:
        raise exc  # not a consumer's batch (called directly): nothing to hold it with
    (slot,) = slots
    log.error("write %s failed alone: %s", slot.message.message_id, describe(exc), exc_info=exc)
    slot.dead_reason = f"error while applying it alone: {describe(exc)}"
    _dead_letter(runtime, slot)


def _defer_or_dead_letter(broker: dramatiq.Broker, runtime: ApplyRuntime, slot: _Slot, index: int) -> None:
    """Enqueue the write again with a delay, or end its wait (src/brownout/_dispatch/waiting.py)."""
    message, reason, envelope = slot.message, slot.defer_reason, slot.envelope
    assert reason is not None and envelope is not None  # noqa: S101 - narrows the type for mypy: _finish calls this only for a slot with a defer reason
    now = runtime.wall()
    waited = now - waiting.waiting_since(message.options, now)
    if isinstance(reason, DependencyPending):
        if waited >= runtime.limits.dependency_seconds:
            _drop(runtime, slot, f"waited {waited:.0f} s for what it needs, which never came: {reason}")
            return
    elif waited >= runtime.limits.unknown_version_seconds:
        slot.dead_reason = f"waited {waited:.0f} s for a release that knows it: {reason}"
        return
    deferrals = waiting.deferrals(message.options)
    delay = runtime.defer_delay_ms(deferrals)
    again = message.copy(options=waiting.deferred_options(message.options, now))
    try:
        broker.enqueue(again, delay=delay)
    except BrokerError as exc:
        # RabbitMQ cannot take the deferral (the delay queue full, an alarm): this write stays where it is,
        # given back to RabbitMQ a little later; the rest of its batch goes on. Nothing to do with the database.
        current = CurrentMessage.get_current_message()
        if not isinstance(current, DeliveryBatch):
            raise DatabaseUnavailable(f"cannot keep a deferral: {describe(exc)}") from exc
        current.hold(index)
        slot.outcome = "held"
        log.warning("write %s: its deferral was refused (%s); held back in the queue", envelope.command_id, describe(exc))
        return
    slot.outcome = "deferred"
    log.info("write %s deferred (%d) for %d ms: %s", envelope.command_id, deferrals + 1, delay, reason)


def _drop(runtime: ApplyRuntime, slot: _Slot, reason: str) -> None:
    """Record the write ``dropped``, its own end: not a dead letter, not an alert."""
    envelope = slot.envelope
    assert envelope is not None  # noqa: S101 - narrows the type for mypy: called only for a parsed write (waited too long, or not permitted)
    try:
        with runtime.database.session() as session:
            execute_with_retry(session, lambda: record_dropped(session, envelope, reason), idempotent=True)
    except KeyConflict as conflict:
        slot.dead_reason = str(conflict)
        return
    slot.outcome = "dropped"
    log.warning("write %s dropped: %s", envelope.command_id, reason)


def _dead_letter(runtime: ApplyRuntime, slot: _Slot) -> None:
    """Keep the write as a dead letter (as text if PostgreSQL refuses it as JSON). Should even that fail,
    the batch is held like any unavailability: never sent to Q.XQ, where it would expire unseen."""
    assert slot.dead_reason is not None  # noqa: S101 - narrows the type for mypy: _finish calls this only for a slot with a dead reason
    try:
        dead_letter(runtime.database, slot.message, slot.dead_reason)
    except Exception as exc:
        if is_unavailability(exc):
            raise
        raise DatabaseUnavailable(f"cannot keep a dead letter: {describe(exc)}") from exc
    slot.outcome = "dead_lettered"


def dead_letter(database: Database, message: dramatiq.Message[Any], reason: str) -> int:
    """Keep *message* with *reason*; raises if the database cannot take it (then the message
    is held by the health gate or retried, never lost)."""
    with database.session() as session:
        # Idempotent per message and attempt: a COMMIT lost with the connection is retried, never a second row.
        dead_letter_id = execute_with_retry(session, lambda: dead_letters.store(session, message, reason), idempotent=True)
    dead_letter_log.error("%s %s dead-lettered as #%d: %s", message.actor_name, message.message_id, dead_letter_id, reason)
    incident_events.write_dead_lettered(
        command=dead_letters.command_name(message),
        command_id=str(message.message_id),
        actor=message.actor_name,
        reason=dead_letters.reason_summary(reason),  # what follows it quotes the payload, the driver or the SMTP server
        dead_letter_id=dead_letter_id,
    )
    return dead_letter_id


def dead_letter_current(database: Database, reason: str) -> int:
    """`dead_letter` for the message being processed (one-message actors: the email job)."""
    current = CurrentMessage.get_current_message()
    if current is None:  # pragma: no cover - only without the CurrentMessage middleware
        raise RuntimeError("the worker's broker needs dramatiq's CurrentMessage middleware")
    return dead_letter(database, current, reason)
