"""The apply step for several envelopes at once: one transaction, one COMMIT (group commit).

Per envelope the guarantees of apply.py hold unchanged: its effect and its
record in `applied_commands` commit together or not at all, a command id
already recorded is a duplicate (same payload hash) or a KeyConflict, and
for one entity apply_seq follows the order in which writes took effect (row
locks are held to the COMMIT, and the records are drawn in effect order).
What a batch adds is that one envelope's failure must not cost the others:

1. **Together**: every effect (a command's `apply_many` for a run of the same
   command, else `apply` one by one), then all records in one multi-row INSERT,
   then COMMIT. Taken only when every envelope applied and was recorded now.
2. **Isolated**: otherwise (an envelope raised, or was a duplicate or a
   conflict) everything is rolled back and redone with a SAVEPOINT per
   envelope, so an error rolls back only that envelope's work; one COMMIT.
3. **Alone**: should that COMMIT fail for good (a deferred constraint: which
   envelope broke it is unknown), each envelope in its own transaction.

The outcome of each envelope is its AppliedWrite or its own error (KeyConflict,
DependencyPending, a permanent database error), returned, not raised. A
transient failure (a disconnect, a deadlock, COMMIT cut off) is raised for
the whole batch: then none of it, or all of it if COMMIT went through
unseen, is applied, and retrying the batch is safe since every envelope that
did commit comes back as a duplicate. So `apply_batch` runs inside
`execute_with_retry(..., idempotent=True)`, as `apply_envelope` does.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel
from sqlalchemy.orm import Session

from brownout._db import classify
from brownout._dispatch.apply import RECORD, AppliedWrite, KeyConflict, Path, applied, claimed_before, record_many, record_params
from brownout._dispatch.commands import Command, Effect
from brownout._dispatch.envelope import Envelope

log = logging.getLogger(__name__)

Outcome = AppliedWrite | Exception


@dataclass(frozen=True, slots=True)
class Pending:
    """An envelope to apply, its command looked up and its payload validated already."""

    envelope: Envelope
    command: Command
    payload: BaseModel


def apply_batch(session: Session, items: Sequence[Pending], *, path: Path) -> list[Outcome]:
    """Apply *items* and commit; one outcome per item, in order. Raises only what is transient."""
    try:
        outcomes: list[Outcome] | None = _together(session, items, path)
    except Exception as exc:
        if _transient(exc):
            raise
        log.debug("batch of %d: %s; applying each under a savepoint", len(items), type(exc).__name__)
        outcomes = None
    if outcomes is None:
        session.rollback()
        try:
            outcomes = _isolated(session, items, path)
        except Exception as exc:
            if _transient(exc):
                raise
            session.rollback()
            return _alone(session, items, path)
    try:
        session.commit()
    except Exception as exc:
        if _transient(exc):
            raise
        log.warning("batch of %d: COMMIT refused (%s); applying each alone", len(items), type(exc).__name__)
        session.rollback()
        return _alone(session, items, path)
    return outcomes


def _together(session: Session, items: Sequence[Pending], path: Path) -> list[Outcome] | None:
    """Tier 1; None when an envelope was recorded before (or twice in the batch)."""
    effects: list[Effect] = []
    for _, grouped in itertools.groupby(items, key=lambda item: item.command.name):
        run = list(grouped)
        command = run[0].command
        if command.apply_many is not None and len(run) > 1:
            effects.extend(command.apply_many(session, [(item.envelope, item.payload) for item in run]))
        else:
            effects.extend(command.apply(session, item.envelope, item.payload) for item in run)
    params = [record_params(item.envelope, effect, path=path) for item, effect in zip(items, effects, strict=True)]
    seqs = record_many(session, params)
    if len(seqs) != len(items):
        return None
    return [
        applied(item.envelope, effect, seqs[str(item.envelope.command_id)]) for item, effect in zip(items, effects, strict=True)
    ]


def _isolated(session: Session, items: Sequence[Pending], path: Path) -> list[Outcome]:
    """Tier 2: each envelope under its own SAVEPOINT; the caller commits."""
    outcomes: list[Outcome] = []
    for item in items:
        envelope = item.envelope
        savepoint = session.begin_nested()
        try:
            effect = item.command.apply(session, envelope, item.payload)
            seq = session.execute(RECORD, record_params(envelope, effect, path=path)).scalar_one_or_none()
        except Exception as exc:
            if _transient(exc):
                raise
            savepoint.rollback()
            outcomes.append(exc)
            continue
        if seq is not None:
            savepoint.commit()
            outcomes.append(applied(envelope, effect, seq))
            continue
        savepoint.rollback()  # recorded before: undo this effect, then see who was first
        outcomes.append(_claimed(session, envelope))
    return outcomes


def _claimed(session: Session, envelope: Envelope) -> Outcome:
    savepoint = session.begin_nested()
    try:
        first = claimed_before(session, envelope)
    except KeyConflict as conflict:
        savepoint.commit()  # the conflict's record is kept
        return conflict
    except Exception as exc:
        if _transient(exc):
            raise
        savepoint.rollback()
        return exc
    savepoint.commit()
    return first


def _alone(session: Session, items: Sequence[Pending], path: Path) -> list[Outcome]:
    """Tier 3: one transaction each."""
    outcomes: list[Outcome] = []
    for item in items:
        try:
            (outcome,) = _isolated(session, [item], path)
            session.commit()
        except Exception as exc:
            if _transient(exc):
                raise
            session.rollback()
            outcome = exc
        outcomes.append(outcome)
    return outcomes


def _transient(exc: Exception) -> bool:
    """A transient failure is the whole batch's, for the caller's retry; anything else is the envelope's."""
    return classify(exc).is_transient
