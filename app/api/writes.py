"""The write endpoints' logic: the dispatcher's outcome, and what the cache learns from it.

    Applied  -> 201 (create) / 200 (mark); written through to the cache
    Queued   -> 202 + Location: /commands/{id}; shown to reads as pending
    Rejected -> 503 + Retry-After (outcome unknown: retry with the same Idempotency-Key)
    DependencyMissing -> 404: a mark of a notification neither in the database nor queued for creation
                         (as far as Redis knows; when it cannot tell, the mark is queued)
    ReadOnlyMode      -> 503 + Retry-After (brownout maps it): raised by `accept`, before the key is claimed,
                         so nothing of the write is kept

An Idempotency-Key reused with another body is refused at once (422) when this
service can see it: the direct path finds it in `applied_commands`; while the
database is down, Redis keeps each key's body hash for the stale window. When
neither can tell, the worker records the conflict at apply time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.api.pending import PendingWrites
from app.api.queries import Position
from app.api.reads import public
from app.dispatch.notifications import CREATE, MARK_READ
from brownout import (
    Applied,
    Dispatcher,
    Envelope,
    KeyConflict,
    PendingReplay,
    Queued,
    ReadCache,
    RedisLink,
    RedisUnavailable,
)

log = logging.getLogger(__name__)


class KeyReused(Exception):
    """Raised when an Idempotency-Key comes back with another body (HTTP 422)."""


@dataclass
class WriteResult:
    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class NotificationWrites:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        link: RedisLink | None,
        cache: ReadCache | None,
        pending: PendingWrites | None,
        key_seconds: float,
    ) -> None:
        self._dispatcher = dispatcher
        self._link = link
        self._cache = cache
        self._pending = pending
        self._key_seconds = key_seconds
        self.on_outcome: Callable[[str], None] | None = None  # metrics: applied, queued, rejected
        self.replay: PendingReplay | None = None  # pending entries Redis missed, recorded again later

    def submit(
        self, name: str, payload: dict[str, Any], *, idempotency_key: str | None, caller: str | None = None
    ) -> WriteResult:
        """Raise InvalidCommand, KeyReused, DependencyMissing or NotPermitted (404), ReadOnlyMode (503); every
        other outcome is a WriteResult. *caller*: who submits it (a key's NAME, `user:<id>`), part of its idempotency scope."""
        envelope = self._dispatcher.accept(name, payload, idempotency_key=idempotency_key, caller=caller)
        if envelope.client_key:
            envelope = self._claim_key(envelope)
        try:
            outcome = self._dispatcher.submit_envelope(envelope, expected=self._awaited if self._pending is not None else None)
        except KeyConflict as conflict:
            raise KeyReused(str(conflict)) from None
        if self.on_outcome is not None:
            self.on_outcome(type(outcome).__name__.lower())
        if isinstance(outcome, Applied):
            item = outcome.result
            self._write_through(item, created=name == CREATE)
            body = public(item)
            if outcome.superseded:  # recorded, but a write stamped later had already set the value shown
                body["superseded"] = True
            return WriteResult(201 if name == CREATE else 200, body)
        if isinstance(outcome, Queued):
            self._show_pending(envelope)
            body = {"id": str(outcome.id), "command_id": str(outcome.command_id), "status": "queued"}
            return WriteResult(202, body, {"Location": f"/commands/{outcome.command_id}"})
        retry_after = str(max(1, math.ceil(outcome.retry_after)))
        detail = f"write not accepted: {outcome.reason}; retry with the same Idempotency-Key"
        body = {"detail": detail, "retry_after": retry_after}
        return WriteResult(503, body, {"Retry-After": retry_after})

    def _awaited(self, envelope: Envelope) -> bool:
        """Asked when a mark finds no row: may the notification still come? False answers 404 at once, where
        queued the mark would wait its whole wait for nothing. True whenever Redis cannot tell."""
        pending = self._pending
        ident = str(envelope.entity_id)
        if pending is None or (self.replay is not None and self.replay.item(ident) is not None):
            return True  # no pending records, or a creation accepted here that Redis has not recorded yet
        try:
            return pending.awaited(ident, str(envelope.command_id))
        except RedisUnavailable:
            return True

    def _claim_key(self, envelope: Envelope) -> Envelope:
        """Claim the key for its body; the envelope to submit: *envelope*, or the same write under the ids the
        previous release gave it (`_previous_claim`)."""
        link = self._link
        if link is None:
            return envelope
        key = link.key("idempotency", envelope.command_id)
        ttl_ms = max(1, int(self._key_seconds * 1000))  # not EX: it rounded a sub-second window down to 0, an error
        # A service's key as the previous release derived it (no caller in its scope): asked in the same round trip.
        bridged = envelope.caller is not None and envelope.caller_user_id is None
        previous = link.key("idempotency", envelope.command_id_without_caller)

        def claim(client: Any) -> list[Any]:
            with client.pipeline(transaction=False) as pipe:
                if bridged:
                    pipe.get(previous)
                pipe.set(key, envelope.payload_hash, nx=True, get=True, px=ttl_ms)
                return list(pipe.execute())

        try:
            answers = link.run(claim)
        except RedisUnavailable:
            return envelope  # the database (direct path) or the worker (queued path) still catches a reuse
        first = answers[-1]
        if bridged and answers[0] is not None:
            return self._previous_claim(envelope, answers[0])
        if first is not None and first != envelope.payload_hash:
            raise KeyReused(f"Idempotency-Key already used with another body (command {envelope.command_id})")
        return envelope

    def _previous_claim(self, envelope: Envelope, first: str) -> Envelope:
        """A retry of a write the previous release accepted with this key (it claimed it in Redis, for the stale
        window): the same command and entity ids, so it is a replay, not a second notification."""
        if first != envelope.payload_hash:
            raise KeyReused("Idempotency-Key already used with another body")
        log.info("write %s: a retry of one accepted before callers were in scopes; its previous ids kept", envelope.command_id)
        return self._dispatcher.accept(
            envelope.name,
            envelope.payload,
            idempotency_key=envelope.idempotency_key,
            caller=envelope.caller,
            caller_in_scope=False,
        )

    def _write_through(self, item: dict[str, Any], *, created: bool) -> None:
        cache = self._cache
        if cache is None:
            return
        link = cache.link
        ident = item["id"]
        try:
            cache.write_through(
                link.key("cache", "item", ident),
                [link.key("gen", "item", ident), link.key("gen", "user", item["user_id"])],
                item,
                version=int(item.get("read_stamp", 0)),  # the row's last write, by last-writer-wins
            )
            if created and self._pending is not None:
                self._pending.note_recent(str(item["user_id"]), ident, Position.of(item).created_us)
        except RedisUnavailable:
            link.missed_write()

    def _show_pending(self, envelope: Envelope) -> None:
        if self._pending is None:
            return
        try:
            self.record_pending(envelope)
        except RedisUnavailable:
            if self._link is not None:
                self._link.missed_write()  # its apply may not be able to bump generations either
            if self.replay is None:
                log.info("queued write %s is not shown as pending: Redis unavailable", envelope.command_id)
                return
            log.info("queued write %s not shown as pending yet: Redis unavailable, recorded again later", envelope.command_id)
            self.replay.add(envelope)

    def record_pending(self, envelope: Envelope) -> None:
        """Show a queued write to reads (raises RedisUnavailable). Safe to repeat: every step overwrites or keeps the latest."""
        pending = self._pending
        if pending is None:
            return
        record: dict[str, Any] = {
            "command": envelope.name,
            "accepted_at": envelope.accepted_at.isoformat(),
            "entity_id": str(envelope.entity_id),
            "caller": envelope.caller,  # its issuer may read its status; never shown
        }
        item = pending_item(envelope)
        if item is not None:
            pending.record_queued(str(envelope.command_id), record, item=item, created_us=Position.of(item).created_us)
        else:
            mark = (str(envelope.entity_id), envelope.name == MARK_READ, envelope.accepted_stamp)
            pending.record_queued(str(envelope.command_id), record, mark=mark, mark_user=envelope.caller_user_id)


def pending_item(envelope: Envelope) -> dict[str, Any] | None:
    """The item a queued creation shows until its row exists (None for the other commands)."""
    if envelope.name != CREATE:
        return None
    return {
        "id": str(envelope.entity_id),
        "user_id": envelope.payload["user_id"],
        "email": envelope.payload["email"],
        "subject": envelope.payload["subject"],
        "body": envelope.payload.get("body", ""),
        "read": False,
        "created_at": envelope.accepted_at.isoformat(),
        "read_stamp": 0,
    }
