"""The batched apply step (src/brownout/_dispatch/apply_batch.py) and its group commit, on the real PostgreSQL.

One envelope's error, duplicate, conflict or missing prerequisite costs only
that envelope; the others commit together; a write is visible (committed)
before its caller hears of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD, build_registry
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch.apply import AppliedWrite, KeyConflict
from brownout._dispatch.apply_batch import Outcome, Pending, apply_batch
from brownout._dispatch.commands import DependencyPending
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.envelope import Envelope
from brownout._schema import applied_commands, command_conflicts, outbox
from brownout._worker.actors import ApplyRuntime
from tests.conftest import database_url

NOTE = {"user_id": 3, "email": "ada@example.com", "subject": "Batched", "body": "together"}
REGISTRY = build_registry()


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database(retry_base_seconds=0.01, retry_cap_seconds=0.05)


@pytest.fixture
def accept(db: Database) -> Callable[..., Envelope]:
    dispatcher = Dispatcher(database=db, publisher=None, registry=REGISTRY, queue_name="unused", request_deadline=2.0)

    def make(name: str = CREATE, payload: dict[str, Any] | None = None, key: str | None = None) -> Envelope:
        return dispatcher.accept(name, NOTE if payload is None else payload, idempotency_key=key or uuid.uuid4().hex)

    return make


def pending(envelope: Envelope) -> Pending:
    command = REGISTRY.get(envelope.name)
    return Pending(envelope, command, command.parse(envelope.version, envelope.payload))


def run(db: Database, *envelopes: Envelope) -> list[Outcome]:
    with db.session() as session:
        return apply_batch(session, [pending(envelope) for envelope in envelopes], path="queued")


def count(db: Database, table: Any, *where: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def execute(db: Database, sql: str) -> None:
    with db.session() as s:
        s.execute(text(sql))
        s.commit()


def test_a_batch_commits_every_write_with_its_record_and_email(db: Database, accept: Callable[..., Envelope]) -> None:
    envelopes = [accept(payload=NOTE | {"subject": f"note {n}"}) for n in range(5)]
    outcomes = run(db, *envelopes)
    assert all(isinstance(o, AppliedWrite) and not o.duplicate and o.outcome == "applied" for o in outcomes)
    assert [o.result["subject"] for o in outcomes if isinstance(o, AppliedWrite)] == [f"note {n}" for n in range(5)]
    assert count(db, notifications) == count(db, outbox) == count(db, applied_commands) == 5
    seqs = [o.apply_seq for o in outcomes if isinstance(o, AppliedWrite)]
    assert seqs == sorted(seqs), "apply_seq is drawn in the batch's order"


def test_a_poison_write_fails_alone(db: Database, accept: Callable[..., Envelope]) -> None:
    execute(db, "ALTER TABLE notifications ADD CONSTRAINT test_no_poison CHECK (subject <> 'poison')")
    before, poison, after = (accept(payload=NOTE | {"subject": s}) for s in ("before", "poison", "after"))
    outcomes = run(db, before, poison, after)
    assert isinstance(outcomes[1], IntegrityError)
    assert isinstance(outcomes[0], AppliedWrite) and isinstance(outcomes[2], AppliedWrite)
    with db.session() as s:
        assert set(s.execute(select(notifications.c.subject)).scalars()) == {"before", "after"}
    assert count(db, applied_commands) == count(db, outbox) == 2


def test_a_constraint_checked_at_commit_fails_only_its_write(db: Database, accept: Callable[..., Envelope]) -> None:
    """A deferred constraint breaks the COMMIT: which write broke it is unknown, so each goes alone."""
    execute(
        db,
        """CREATE FUNCTION test_late_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.subject = 'late poison' THEN RAISE EXCEPTION 'late poison'; END IF; RETURN NEW; END $$;
        CREATE CONSTRAINT TRIGGER test_late_poison AFTER INSERT ON notifications
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_late_poison();""",
    )
    good, poison = accept(), accept(payload=NOTE | {"subject": "late poison"})
    outcomes = run(db, good, poison)
    assert isinstance(outcomes[0], AppliedWrite) and not isinstance(outcomes[1], AppliedWrite)
    assert "late poison" in str(outcomes[1])
    assert count(db, notifications) == count(db, applied_commands) == 1


def test_a_reused_key_is_a_conflict_and_the_rest_applies(db: Database, accept: Callable[..., Envelope]) -> None:
    first = accept(key="k")
    (applied,) = run(db, first)
    reused = accept(payload=NOTE | {"subject": "another body"}, key="k")
    assert reused.command_id == first.command_id
    fresh = accept()
    outcomes = run(db, reused, fresh)
    assert isinstance(outcomes[0], KeyConflict) and isinstance(outcomes[1], AppliedWrite)
    assert count(db, command_conflicts) == 1, "the conflict is recorded, in the batch's transaction"
    assert count(db, notifications) == 2


def test_a_write_waiting_for_another_is_the_only_one_deferred(db: Database, accept: Callable[..., Envelope]) -> None:
    later = accept()  # created by nobody yet
    mark = accept(MARK_READ, {"notification_id": str(later.entity_id)})
    other = accept()
    outcomes = run(db, other, mark)
    assert isinstance(outcomes[0], AppliedWrite) and isinstance(outcomes[1], DependencyPending)
    assert count(db, applied_commands) == 1


def test_a_creation_and_the_writes_that_need_it_apply_in_one_batch(db: Database, accept: Callable[..., Envelope]) -> None:
    created = accept()
    target = {"notification_id": str(created.entity_id)}
    read, unread, read_again = accept(MARK_READ, target), accept(MARK_UNREAD, target), accept(MARK_READ, target)
    outcomes = run(db, created, read, unread, read_again)
    assert [o.outcome for o in outcomes if isinstance(o, AppliedWrite)] == ["applied"] * 4
    with db.session() as s:
        assert s.execute(select(notifications.c.read, notifications.c.read_stamp)).one() == (True, read_again.accepted_stamp)


def test_duplicates_inside_a_batch_and_of_earlier_batches_apply_once(db: Database, accept: Callable[..., Envelope]) -> None:
    earlier = accept()
    (first,) = run(db, earlier)
    twice = accept()
    outcomes = run(db, twice, earlier, twice, accept())
    assert [isinstance(o, AppliedWrite) and o.duplicate for o in outcomes] == [False, True, True, False]
    assert isinstance(outcomes[1], AppliedWrite) and outcomes[1].result == first.result  # type: ignore[union-attr]
    assert isinstance(outcomes[0], AppliedWrite) and isinstance(outcomes[2], AppliedWrite)
    assert outcomes[2].result == outcomes[0].result and outcomes[2].apply_seq == outcomes[0].apply_seq
    assert count(db, notifications) == count(db, applied_commands) == count(db, outbox) == 3


def test_a_connection_killed_mid_batch_applies_the_batch_once_on_retry(
    db: Database, accept: Callable[..., Envelope], pg_database: str, app_name: str
) -> None:
    """The disconnect fails the whole batch (nothing committed); execute_with_retry runs it again."""
    from tests.conftest import terminate_backends

    command = REGISTRY.get(CREATE)
    kills: list[set[int]] = []

    def create_then_die(session: Any, items: Any) -> Any:
        assert command.apply_many is not None
        effects = command.apply_many(session, items)
        if not kills:
            kills.append(terminate_backends(pg_database, app_name))
        return effects

    import dataclasses

    dying = dataclasses.replace(command, apply_many=create_then_die)
    envelopes = [accept() for _ in range(4)]
    group = ApplyRuntime(database=db, registry=REGISTRY)
    outcomes = group.apply_all([Pending(e, dying, command.parse(e.version, e.payload)) for e in envelopes])
    assert kills and kills[0], "a backend was killed mid-batch"
    assert all(isinstance(o, AppliedWrite) and not o.duplicate for o in outcomes)
    assert count(db, notifications) == count(db, applied_commands) == count(db, outbox) == 4
    again = group.apply_all([pending(e) for e in envelopes])  # the messages redelivered
    assert all(isinstance(o, AppliedWrite) and o.duplicate for o in again)
    assert count(db, notifications) == count(db, applied_commands) == 4


def test_a_batch_answers_in_delivery_order_once_committed(db: Database, accept: Callable[..., Envelope]) -> None:
    """The worker applies a batch in entity-key order; each delivery still gets its own outcome."""
    envelopes = [accept(payload=NOTE | {"user_id": user}) for user in (9, 2, 7, 2, 5)]
    envelopes.append(accept(MARK_READ, {"notification_id": str(uuid.uuid4())}))  # waits for a creation
    assert [e.entity_key for e in envelopes] != sorted(e.entity_key for e in envelopes), "not already in key order"
    outcomes = ApplyRuntime(database=db, registry=REGISTRY).apply_all([pending(e) for e in envelopes])
    for envelope, outcome in zip(envelopes[:-1], outcomes, strict=False):
        assert isinstance(outcome, AppliedWrite) and outcome.command_id == envelope.command_id
        assert count(db, applied_commands, applied_commands.c.command_id == envelope.command_id) == 1
    assert isinstance(outcomes[-1], DependencyPending)
    assert count(db, applied_commands) == len(envelopes) - 1
