"""The dispatcher: apply a write now, or queue it durably, or say 503 — never lose it.

    submit(name, payload, idempotency_key=...) ->
        Applied   the write is committed (HTTP 201/200)
        Queued    it is in RabbitMQ: durable queue, persistent message, confirm received (202)
        Rejected  neither could be made sure of: outcome unknown, retry with the same key (503)

While the breaker lets calls through, the write is applied with the request's
deadline (BROWNOUT_REQUEST_DB_DEADLINE_SECONDS). When the breaker is open, the
deadline is spent on transient failures, or the write needs one that is still
queued (DependencyPending), it is queued instead; the worker applies it with
the same `apply_envelope`, which makes either path's result count once.
A write needing an entity that nothing creates (the caller's `expected` says
so) is not queued to wait for nothing: DependencyMissing (404). A write of an
entity that is not its caller's (the command's apply says) is NotPermitted
(404): nothing is recorded.

In read-only mode (src/brownout/_fleet/read_only.py) `accept` raises ReadOnlyMode
(503) before the write gets its ids or stamp: every write of the library's and a
service's own goes through it, and nothing of a refused write is kept.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import dramatiq
from pydantic import ValidationError
from sqlalchemy import text

from brownout._cache.redis_link import RedisLink
from brownout._db import CircuitOpenError, Database, DeadlineExceeded, classify, describe, execute_with_retry
from brownout._dispatch.apply import AppliedWrite, apply_envelope
from brownout._dispatch.commands import CommandError, DependencyMissing, DependencyPending, Refused, Registry
from brownout._dispatch.envelope import Envelope, caller_scope, command_id_for, entity_id_for, payload_hash
from brownout._dispatch.hlc import HybridClock, datetime_of
from brownout._dispatch.key_claims import KeyClaims
from brownout._fleet.read_only import WriteMode
from brownout._settings import Settings

log = logging.getLogger(__name__)

_RECENT_HIGHEST_STAMP = text(
    "SELECT max(accepted_stamp) FROM (SELECT accepted_stamp FROM applied_commands ORDER BY applied_at DESC LIMIT 1000) AS recent"
)

MAX_KEY_LENGTH = 200


class InvalidCommand(CommandError):
    """Raised when a payload or an idempotency key does not validate (HTTP 422)."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.errors = errors or []
        super().__init__(message)


class PublisherProtocol(Protocol):
    def publish(self, message: dramatiq.Message[Any], *, timeout: float | None = None) -> None:
        """Return once RabbitMQ confirmed the message; raise PublishRejected otherwise."""


@dataclass(frozen=True)
class Applied:
    command_id: uuid.UUID
    id: uuid.UUID
    result: dict[str, Any]
    duplicate: bool
    superseded: bool


@dataclass(frozen=True)
class Queued:
    command_id: uuid.UUID
    id: uuid.UUID


@dataclass(frozen=True)
class Rejected:
    reason: str
    retry_after: float


Outcome = Applied | Queued | Rejected


class Dispatcher:
    """One per process; thread-safe (the publisher and the engine are)."""

    def __init__(
        self,
        *,
        database: Database,
        publisher: PublisherProtocol | None,
        registry: Registry,
        queue_name: str,
        request_deadline: float,
        publish_timeout: float = 2.0,
        clock: HybridClock | None = None,
        mode: WriteMode | None = None,
        key_claims: KeyClaims | None = None,
    ) -> None:
        """*mode*: the process's write mode, asked once per write in `accept` (None: always read-write).
        *key_claims*: where `submit` binds a client key to its body (None: only the database and the worker
        catch a key reused with another body, the worker after a 202)."""
        self.mode = mode
        self.key_claims = key_claims
        self._database = database
        self._publisher = publisher
        self._registry = registry
        self._queue_name = queue_name
        self._deadline = request_deadline
        self._publish_timeout = publish_timeout
        self.clock = clock or HybridClock()
        self._owned_publisher: Any = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        database: Database,
        *,
        registry: Registry,
        clock: HybridClock | None = None,
        mode: WriteMode | None = None,
        link: RedisLink | None = None,
    ) -> Dispatcher:
        """The process's dispatcher for *registry*'s commands, with its own started publisher (closed by
        `close()`), its clock seeded from the database (`seed_clock`); *mode* defaults to BROWNOUT_READ_ONLY's
        alone (`Brownout` passes one that follows the fleet's too); with a Redis *link*, client keys are
        bound to their bodies for BROWNOUT_CACHE_STALE_SECONDS (`KeyClaims`)."""
        from brownout._dispatch.publisher import Publisher

        publisher = None
        if settings.rabbitmq_url:
            publisher = Publisher(
                url=settings.rabbitmq_urls,
                queue_name=settings.queue_name,
                max_length=settings.queue_max_length,
                queue_type=settings.queue_type,
                delivery_limit=settings.queue_delivery_limit,
                confirm_timeout=settings.publish_timeout_seconds,
                heartbeat=settings.rabbitmq_heartbeat_seconds,
            ).start()
        dispatcher = cls(
            database=database,
            publisher=publisher,
            registry=registry,
            queue_name=settings.queue_name,
            request_deadline=settings.request_db_deadline_seconds,
            publish_timeout=settings.publish_timeout_seconds,
            clock=clock,
            mode=mode or WriteMode.from_settings(settings),
            key_claims=None if link is None else KeyClaims(link, seconds=settings.cache_stale_seconds),
        )
        dispatcher._owned_publisher = publisher
        dispatcher.seed_clock(deadline=max(settings.request_db_deadline_seconds, settings.health_timeout_seconds))
        return dispatcher

    def seed_clock(self, *, deadline: float) -> int | None:
        """Fold the highest stamp recently applied into the clock; return it (None: nothing, or no database).

        A process that restarts on a host whose wall clock stepped back, or a replica whose clock runs
        behind, would otherwise stamp a write below one already applied, and that write would lose
        (superseded) though it came later. Among the 1000 most recent applies (an index scan): a write
        applied long ago has a stamp the wall clock has long passed. A database down at start-up is
        no reason not to start: the clock then runs on the wall clock alone, as before."""
        try:
            with self._database.session() as session:
                highest = execute_with_retry(session, lambda: session.execute(_RECENT_HIGHEST_STAMP).scalar(), deadline=deadline)
        except Exception as exc:
            log.warning("acceptance clock not seeded from the database (%s): the wall clock alone", describe(exc))
            return None
        if highest is None:
            return None
        self.clock.observe(int(highest))
        return int(highest)

    @property
    def publisher_state(self) -> str | None:
        """The publisher's connection state ("ready", "disconnected", ...), None without a queue."""
        state = getattr(self._publisher, "state", None)
        return None if self._publisher is None else str(getattr(state, "value", state))

    @property
    def publisher_restarts(self) -> int:
        """Times the publisher's I/O thread was found dead and started again (0 without a queue)."""
        return int(getattr(self._publisher, "restarts", 0))

    def on_publisher_restart(self, callback: Callable[[], None]) -> None:
        """Tell *callback* each time the publisher's I/O thread is started again (a metric)."""
        if self._publisher is not None and hasattr(self._publisher, "on_restart"):
            self._publisher.on_restart = callback

    def close(self) -> None:
        if self._owned_publisher is not None:
            self._owned_publisher.close()

    def accept(
        self,
        name: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        caller: str | None = None,
        caller_in_scope: bool = True,
    ) -> Envelope:
        """Validate and stamp a write; raise InvalidCommand (or UnknownCommand), or ReadOnlyMode while the
        service is read-only (checked once, after validation and before anything else: a write that passes
        goes on to the end even if the mode changes meanwhile).

        *caller* (a key's NAME, `user:<id>`) travels in the envelope, for the apply to check ownership, and
        is folded into the scope the ids are derived in (`caller_scope`): one caller's key never names
        another's write. *caller_in_scope* False derives them as a release that did not know callers did
        (a retry of a write that release accepted keeps its ids)."""
        command = self._registry.get(name)
        try:
            model = command.parse(command.current_version, payload)
        except ValidationError as exc:
            errors = [dict(error) for error in exc.errors(include_url=False, include_context=False)]
            raise InvalidCommand(f"invalid {name} payload", errors) from None
        if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_KEY_LENGTH and idempotency_key.isprintable()):
            raise InvalidCommand(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters")
        if self.mode is not None:
            self.mode.check()
        scope = command.scope(model)
        ids_scope = caller_scope(scope, caller if caller_in_scope else None)
        key = idempotency_key or uuid.uuid4().hex
        data = model.model_dump(mode="json")
        entity_id = command.entity(model, entity_id_for(name, ids_scope, key))
        stamp = self.clock.now()
        return Envelope(
            command_id=command_id_for(name, ids_scope, key),
            name=name,
            version=command.current_version,
            scope=scope,
            idempotency_key=key,
            client_key=idempotency_key is not None,
            payload=data,
            payload_hash=payload_hash(data),
            entity_key=f"{command.entity_kind}:{entity_id}",
            entity_id=entity_id,
            accepted_stamp=stamp,
            accepted_at=datetime_of(stamp),
            caller=caller,
        )

    def submit(
        self, name: str, payload: Mapping[str, Any], *, idempotency_key: str | None = None, caller: str | None = None
    ) -> Outcome:
        """Apply now, queue, or reject; raise InvalidCommand, KeyConflict or NotPermitted for a bad request,
        ReadOnlyMode while the service is read-only."""
        envelope = self.accept(name, payload, idempotency_key=idempotency_key, caller=caller)
        claims = self.key_claims
        claimed = claims is not None and claims.claim(envelope)
        try:
            return self.submit_envelope(envelope)
        except (Refused, DependencyMissing):  # nothing recorded: the key is free for a corrected write
            if claimed and claims is not None:
                claims.release(envelope)
            raise

    def submit_envelope(self, envelope: Envelope, *, expected: Callable[[Envelope], bool] | None = None) -> Outcome:
        """`submit` for an envelope from `accept` (the API looks at it in between, and claims its key with
        `key_claims` itself when it wants that check).

        *expected* is asked when the direct path finds the write needs an entity not created yet
        (DependencyPending): may its creation still come (one is queued, or this very write was queued
        before)? True, or no *expected*, queues the write to wait for it; False raises DependencyMissing
        once a second look at the database still finds nothing (a creation applied while *expected* was
        asked, its pending entry cleared, is in the database by then)."""
        if self._database.breaker.refuse_now() is None:  # a refusal is counted, and the write queued
            applied = self._apply_now(envelope, expected)
            if applied is not None:
                self.clock.observe(int(applied.result.get("read_stamp") or 0))  # a later stamp set by another process
                return Applied(
                    command_id=applied.command_id,
                    id=applied.entity_id,
                    result=applied.result,
                    duplicate=applied.duplicate,
                    superseded=applied.outcome == "superseded",
                )
        return self.enqueue(envelope)

    def enqueue(self, envelope: Envelope) -> Queued | Rejected:
        if self._publisher is None:
            return Rejected("queue not configured (RABBITMQ_URL)", 5.0)
        from brownout._dispatch.publisher import PublishRejected  # the publisher module owns its error

        try:
            self._publisher.publish(envelope.to_message(self._queue_name), timeout=self._publish_timeout)
        except PublishRejected as rejected:
            log.warning("write %s rejected: %s", envelope.command_id, rejected.reason)
            return Rejected(rejected.reason, rejected.retry_after)
        return Queued(command_id=envelope.command_id, id=envelope.entity_id)

    def _apply_now(self, envelope: Envelope, expected: Callable[[Envelope], bool] | None) -> AppliedWrite | None:
        """The direct path; None means "queue it instead"."""
        try:
            return self._try_apply(envelope)
        except DependencyPending:
            if expected is None or expected(envelope):
                log.info("write %s goes to the queue: DependencyPending", envelope.command_id)
                return None
        try:
            return self._try_apply(envelope)
        except DependencyPending:
            raise DependencyMissing(envelope.entity_key) from None

    def _try_apply(self, envelope: Envelope) -> AppliedWrite | None:
        """One apply within the request deadline; None when the database cannot take it now."""
        started = time.monotonic()
        with self._database.session() as session:
            try:
                return execute_with_retry(
                    session,
                    lambda: apply_envelope(session, self._registry, envelope, path="direct"),
                    deadline=self._deadline,
                    idempotent=True,  # apply_envelope claims the command id first
                )
            except (CircuitOpenError, DeadlineExceeded) as reason:
                log.info("write %s goes to the queue: %s", envelope.command_id, type(reason).__name__)
                return None
            except CommandError:
                raise
            except Exception as exc:
                if not classify(exc).is_transient:
                    raise
                log.info(
                    "write %s goes to the queue after %.0f ms of transient failures",
                    envelope.command_id,
                    (time.monotonic() - started) * 1000,
                )
                return None
