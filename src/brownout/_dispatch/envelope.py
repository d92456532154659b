"""A write as data: what is queued, applied and audited.

One Dramatiq actor carries every command (`APPLY_ACTOR`); the command's name
and version travel inside the envelope, so a new command or version needs no
new actor (Dramatiq sends a message for an unknown actor straight to its
dead-letter queue).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Any

import dramatiq
from pydantic import BaseModel, ConfigDict

APPLY_ACTOR = "apply_command"

# Fixed namespaces: ids derived from a client's key must be the same in every
# process and every release, so these never change.
COMMAND_NAMESPACE = uuid.UUID("6f3d1c2e-5b8a-4f0e-9c7d-2a1b3c4d5e6f")
ENTITY_NAMESPACE = uuid.UUID("9a8b7c6d-1e2f-4a3b-8c9d-0e1f2a3b4c5d")


def payload_hash(payload: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of what the client sent (before server-derived fields)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


USER_CALLER = "user:"
"""How an end user's caller name starts (`user:<id>`); a service key's NAME cannot contain ':'."""


def caller_scope(scope: str, caller: str | None) -> str:
    """The scope a key's ids are derived in: the command's scope (its entity's owner) and, when known, the
    caller, so one caller's key never collides with, nor is claimed by, another's."""
    return scope if caller is None else f"{caller}|{scope}"


def command_id_for(name: str, scope: str, key: str) -> uuid.UUID:
    """UUIDv5 of command, caller scope and key: two callers using the same key never collide."""
    return uuid.uuid5(COMMAND_NAMESPACE, f"{name}\n{scope}\n{key}")


def entity_id_for(name: str, scope: str, key: str) -> uuid.UUID:
    """The id a creating command hands out, derived the same way (so a replay gets it again)."""
    return uuid.uuid5(ENTITY_NAMESPACE, f"{name}\n{scope}\n{key}")


class Envelope(BaseModel):
    """Everything needed to apply a write once, in order, in any process."""

    model_config = ConfigDict(frozen=True)

    command_id: uuid.UUID
    name: str
    version: int
    scope: str
    idempotency_key: str
    client_key: bool  # False when the server made the key up
    payload: dict[str, Any]
    payload_hash: str
    entity_key: str
    entity_id: uuid.UUID
    accepted_stamp: int
    accepted_at: datetime
    caller: str | None = None
    """Who submitted it: a service key's NAME or `user:<id>`; None in messages queued by a release that did
    not say (they still validate, and apply as they would have)."""

    @property
    def caller_user_id(self) -> str | None:
        """The end user who submitted it, whose ownership the apply checks; None for a service (or unknown)."""
        if self.caller is None or not self.caller.startswith(USER_CALLER):
            return None
        return self.caller[len(USER_CALLER) :]

    @property
    def command_id_without_caller(self) -> uuid.UUID:
        """The command id a release that kept no caller gave this write's key (`caller_scope`): how a retry
        across the upgrade finds the write that release accepted."""
        return command_id_for(self.name, self.scope, self.idempotency_key)

    def to_message(self, queue_name: str) -> dramatiq.Message[Any]:
        return dramatiq.Message(
            queue_name=queue_name,
            actor_name=APPLY_ACTOR,
            args=(self.model_dump(mode="json"),),
            kwargs={},
            options={},
            message_id=str(self.command_id),
        )

    @classmethod
    def from_message(cls, message: dramatiq.Message[Any]) -> Envelope:
        (data,) = message.args
        return cls.model_validate(data)
