"""The apply step both paths share: a write takes effect once, in order.

In one transaction:
1. claim the command id in `applied_commands` (INSERT ... ON CONFLICT DO
   NOTHING). A concurrent applier of the same command blocks on the unique
   key until the first commits (then finds it taken) or rolls back (then
   proceeds), so the effect can never happen twice, whichever path, process
   or thread gets there first;
2. if the id was taken: the same payload hash is a duplicate and returns the
   first result; another hash is a conflict, recorded in `command_conflicts`
   and never applied;
3. apply the command (last-writer-wins on the acceptance stamp, see
   notifications.py), then draw `apply_seq` and store the result.

The caller commits nothing itself: `apply_envelope` commits, so it can run
inside `execute_with_retry(..., idempotent=True)`: a COMMIT whose outcome is
unknown is safe to retry because step 1 makes the retry a duplicate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.dispatch.commands import CommandError, Registry
from app.dispatch.envelope import Envelope
from app.schema import applied_commands, apply_sequence, command_conflicts

Path = Literal["direct", "queued"]


class KeyConflict(CommandError):
    """Raised when an idempotency key is reused with another payload; recorded, not applied."""

    def __init__(self, command_id: uuid.UUID) -> None:
        self.command_id = command_id
        super().__init__(f"idempotency key already used with another body (command {command_id})")


@dataclass(frozen=True)
class AppliedWrite:
    command_id: uuid.UUID
    entity_id: uuid.UUID
    result: dict[str, Any]
    outcome: str  # "applied" or "superseded"
    duplicate: bool
    apply_seq: int | None


# Built once: constructing statements per call costs more than a round trip here.
_CLAIM_COLUMNS = (
    "command_id",
    "name",
    "version",
    "scope",
    "idempotency_key",
    "payload_hash",
    "entity_key",
    "accepted_stamp",
    "accepted_at",
    "path",
)
_CLAIM = (
    insert(applied_commands)
    .values({name: bindparam(name) for name in _CLAIM_COLUMNS} | {"outcome": "pending", "result": {}})
    .on_conflict_do_nothing(index_elements=["command_id"])
    .returning(applied_commands.c.command_id)
)
_RECORD = (
    applied_commands.update()
    .where(applied_commands.c.command_id == bindparam("claimed_id"))
    .values(
        apply_seq=apply_sequence.next_value(), outcome=bindparam("outcome"), result=bindparam("result"), applied_at=func.now()
    )
    .returning(applied_commands.c.apply_seq)
)


def apply_envelope(session: Session, registry: Registry, envelope: Envelope, *, path: Path) -> AppliedWrite:
    """Apply *envelope* once and commit; raise KeyConflict, DependencyPending or UnknownCommand."""
    command = registry.get(envelope.name)
    payload = command.parse(envelope.version, envelope.payload)
    params = {name: getattr(envelope, name) for name in _CLAIM_COLUMNS if name != "path"} | {"path": path}
    if session.execute(_CLAIM, params).first() is None:
        return _already_claimed(session, envelope)
    try:
        effect = command.apply(session, envelope, payload)
        outcome = "superseded" if effect.superseded else "applied"
        seq = session.execute(
            _RECORD, {"claimed_id": envelope.command_id, "outcome": outcome, "result": effect.result}
        ).scalar_one()
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return AppliedWrite(
        command_id=envelope.command_id,
        entity_id=envelope.entity_id,
        result=effect.result,
        outcome=outcome,
        duplicate=False,
        apply_seq=seq,
    )


def _already_claimed(session: Session, envelope: Envelope) -> AppliedWrite:
    table = applied_commands
    first = session.execute(
        select(table.c.payload_hash, table.c.result, table.c.outcome, table.c.apply_seq).where(
            table.c.command_id == envelope.command_id
        )
    ).one()
    if first.payload_hash != envelope.payload_hash:
        session.execute(
            command_conflicts.insert().values(
                command_id=envelope.command_id,
                payload_hash=envelope.payload_hash,
                first_payload_hash=first.payload_hash,
                envelope=envelope.model_dump(mode="json"),
            )
        )
        session.commit()
        raise KeyConflict(envelope.command_id)
    session.rollback()
    return AppliedWrite(
        command_id=envelope.command_id,
        entity_id=envelope.entity_id,
        result=first.result,
        outcome=first.outcome,
        duplicate=True,
        apply_seq=first.apply_seq,
    )
