"""The apply step both paths share: a write takes effect once, in order.

In one transaction:
1. apply the command's effect (the service's apply function: last writer wins
   on the acceptance stamp), which locks the entity's row;
2. record it in `applied_commands`, drawing `apply_seq` while the row lock is
   held, so for one entity apply_seq order is the order in which writes took
   effect; the record travels with the COMMIT in one round trip
   (`pipelined.commit_with`), so it is a plain INSERT;
3. if the command id was already recorded (the INSERT's unique violation), roll
   the effect back: the same payload hash is a duplicate and returns the first
   result; another hash is a conflict, recorded in `command_conflicts` and never
   applied.

A concurrent applier of the same command blocks on the unique key in step 2
until the first commits (then it finds the id taken and rolls back) or rolls
back (then it proceeds), so the effect can never be committed twice, whichever
path, process or thread gets there first. Recording after the effect costs a
duplicate some wasted work but saves every write a round trip.

`apply_envelope` commits, so it can run inside `execute_with_retry(...,
idempotent=True)`: a COMMIT whose outcome is unknown is safe to retry because
the retry is then a duplicate.

The worker takes the same steps for several envelopes in one transaction
(apply_batch.py, with `record_params`, `record_many` and `claimed_before`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from brownout._db.errors import constraint_of
from brownout._db.pipelined import commit_with
from brownout._dispatch.bulk import insert_rows, rows_param
from brownout._dispatch.commands import CommandError, Effect, Registry
from brownout._dispatch.envelope import Envelope
from brownout._schema import applied_commands, apply_sequence, command_conflicts

Path = Literal["direct", "queued"]
_RECORDED_ONCE = "applied_commands_pkey"


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
    outcome: str  # "applied", "superseded" or "dropped"
    duplicate: bool
    apply_seq: int | None


# Built once: constructing statements per call costs more than a round trip here.
_RECORD_COLUMNS = (
    "command_id",
    "name",
    "version",
    "scope",
    "idempotency_key",
    "payload_hash",
    "entity_key",
    "accepted_stamp",
    "accepted_at",
    "caller",
)
RECORD = (
    insert(applied_commands)
    .values(
        {name: bindparam(name) for name in (*_RECORD_COLUMNS, "path", "outcome", "result")}
        | {"apply_seq": apply_sequence.next_value()}
    )
    .on_conflict_do_nothing(index_elements=["command_id"])
    .returning(applied_commands.c.apply_seq)
)
"""Record a write (params: `record_params`); returns its apply_seq, nothing when the id was recorded before."""
_RECORD_AND_COMMIT = insert(applied_commands).values(
    {name: bindparam(name) for name in (*_RECORD_COLUMNS, "path", "outcome", "result")}
    | {"apply_seq": apply_sequence.next_value()}
)
"""RECORD sent with the COMMIT in one round trip (`commit_with`): it returns nothing (the COMMIT's answer is
the last), so a command id recorded before shows as a unique violation, which rolls the effect back."""
_RECORD_MANY = insert_rows(
    applied_commands,
    (*_RECORD_COLUMNS, "path", "outcome", "result"),
    computed={"apply_seq": f"nextval('{apply_sequence.name}')"},
    conflict="command_id",
    returning=("CAST(command_id AS text)", "apply_seq"),  # text: no uuid objects to make and print again
)


def apply_envelope(session: Session, registry: Registry, envelope: Envelope, *, path: Path) -> AppliedWrite:
    """Apply *envelope* once and commit; raise KeyConflict, DependencyPending or UnknownCommand."""
    command = registry.get(envelope.name)
    payload = command.parse(envelope.version, envelope.payload)
    return _take_effect(session, envelope, lambda: command.apply(session, envelope, payload), path=path)


def _take_effect(session: Session, envelope: Envelope, effect_of: Callable[[], Effect], *, path: Path) -> AppliedWrite:
    """Steps 1 to 3 of the module docstring, for the effect *effect_of* makes; commits."""
    try:
        effect = effect_of()
        try:
            commit_with(session, _RECORD_AND_COMMIT, record_params(envelope, effect, path=path))
        except IntegrityError as exc:
            if constraint_of(exc) != _RECORDED_ONCE:
                raise
            session.rollback()
            return _already_claimed(session, envelope)
    except BaseException:
        session.rollback()
        raise
    return applied(envelope, effect, None)


def record_params(envelope: Envelope, effect: Effect, *, path: Path) -> dict[str, Any]:
    """The bound values of RECORD for *envelope* and what applying it did."""
    params = {name: getattr(envelope, name) for name in _RECORD_COLUMNS}
    params |= {"path": path, "outcome": _outcome(effect), "result": effect.result}
    return params


def record_many(session: Session, params: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """RECORD for several writes (`record_params` each) in one statement, apply_seq drawn in their
    order; returns apply_seq by command id (as text) of those recorded now."""
    return {command_id: int(seq) for command_id, seq in session.execute(_RECORD_MANY, rows_param(params))}


def applied(envelope: Envelope, effect: Effect, apply_seq: int | None) -> AppliedWrite:
    """The AppliedWrite of an effect recorded under *apply_seq* (not a duplicate; None: committed with its
    record in one round trip, which returns no row)."""
    return AppliedWrite(
        command_id=envelope.command_id,
        entity_id=envelope.entity_id,
        result=effect.result,
        outcome=_outcome(effect),
        duplicate=False,
        apply_seq=apply_seq,
    )


def record_dropped(session: Session, envelope: Envelope, reason: str, *, path: Path = "queued") -> AppliedWrite:
    """Record *envelope* as ``dropped`` (it waited its whole wait for a prerequisite that never came, or was
    NotPermitted) and commit: it takes no effect, and its command id is spent like an applied one's (a redelivery is a
    duplicate). Raises KeyConflict when the id was recorded before with another body."""
    return _take_effect(session, envelope, lambda: Effect(result={"dropped": reason}, dropped=True), path=path)


def _outcome(effect: Effect) -> str:
    return "dropped" if effect.dropped else "superseded" if effect.superseded else "applied"


def _already_claimed(session: Session, envelope: Envelope) -> AppliedWrite:
    try:
        first = claimed_before(session, envelope)
    except KeyConflict:
        session.commit()  # keep the conflict's record
        raise
    session.rollback()
    return first


def claimed_before(session: Session, envelope: Envelope) -> AppliedWrite:
    """The first apply of *envelope*'s command id, its own effect already rolled back.

    The same payload hash: a duplicate, with the first result. Another hash:
    recorded in command_conflicts (in the caller's transaction, which the
    caller commits) and raised as KeyConflict.
    """
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
        raise KeyConflict(envelope.command_id)
    return AppliedWrite(
        command_id=envelope.command_id,
        entity_id=envelope.entity_id,
        result=first.result,
        outcome=first.outcome,
        duplicate=True,
        apply_seq=first.apply_seq,
    )
