"""The shared apply step and the dispatcher's direct path, on the real PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import event, func, select, text

from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD, build_registry
from app.schema import MIGRATIONS, notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch.apply import AppliedWrite, KeyConflict, apply_envelope
from brownout._dispatch.commands import DependencyPending, UnknownCommand
from brownout._dispatch.dispatcher import Applied, Dispatcher, InvalidCommand, Rejected
from brownout._dispatch.envelope import Envelope, command_id_for, entity_id_for, payload_hash
from brownout._schema import applied_commands, command_conflicts
from tests.conftest import database_url

NOTE = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


@pytest.fixture
def dispatcher(db: Database) -> Dispatcher:
    return Dispatcher(database=db, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=2.0)


def apply(db: Database, dispatcher: Dispatcher, envelope: Envelope) -> AppliedWrite:
    with db.session() as s:
        return apply_envelope(s, build_registry(), envelope, path="queued")


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def test_migrations_are_idempotent(db: Database, pg_database: str) -> None:
    upgrade_database(database_url(pg_database))
    with db.session() as s:
        head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
        assert s.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head


def test_create_applies_once_and_replays_get_the_same_ids(db: Database, dispatcher: Dispatcher) -> None:
    first = dispatcher.submit(CREATE, NOTE, idempotency_key="k-1")
    again = dispatcher.submit(CREATE, NOTE, idempotency_key="k-1")
    assert isinstance(first, Applied) and isinstance(again, Applied)
    assert (again.id, again.command_id, again.result) == (first.id, first.command_id, first.result)
    assert first.duplicate is False and again.duplicate is True
    assert first.result["subject"] == "Welcome" and first.result["read"] is False
    assert count(db, notifications) == 1 and count(db, applied_commands) == 1


def test_a_direct_creation_is_two_statements_in_one_transaction(db: Database, dispatcher: Dispatcher) -> None:
    """Each statement is a round trip the request waits for: the notification and its email in one, its
    record in the other (psycopg2 adds BEGIN and COMMIT). A replay adds the look-up of the first result."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement.split(None, 3)[2] if statement.startswith("INSERT") else statement.split(None, 1)[0])

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        first = dispatcher.submit(CREATE, NOTE, idempotency_key="one-trip")
        made = list(sent)
        sent.clear()
        dispatcher.submit(CREATE, NOTE, idempotency_key="one-trip")
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert isinstance(first, Applied) and not first.duplicate
    assert made == ["WITH", "applied_commands"]
    assert sent == ["WITH", "SELECT", "applied_commands", "SELECT"]  # the row made before; the first record
    assert count(db, notifications) == 1
    with db.session() as s:
        assert s.execute(text("SELECT count(*) FROM outbox")).scalar_one() == 1


def test_same_key_other_body_is_a_recorded_conflict(db: Database, dispatcher: Dispatcher) -> None:
    first = dispatcher.submit(CREATE, NOTE, idempotency_key="k-2")
    with pytest.raises(KeyConflict) as conflict:
        dispatcher.submit(CREATE, NOTE | {"subject": "Other"}, idempotency_key="k-2")
    assert isinstance(first, Applied) and conflict.value.command_id == first.command_id
    assert count(db, notifications) == 1
    assert count(db, command_conflicts) == 1


def test_keys_are_scoped_to_the_caller(dispatcher: Dispatcher) -> None:
    mine = dispatcher.submit(CREATE, NOTE, idempotency_key="shared")
    theirs = dispatcher.submit(CREATE, NOTE | {"user_id": 43}, idempotency_key="shared")
    assert isinstance(mine, Applied) and isinstance(theirs, Applied)
    assert mine.id != theirs.id and mine.command_id != theirs.command_id
    assert theirs.duplicate is False


def test_a_creation_queued_by_the_previous_release_with_an_integer_user_id_applies_once(
    db: Database, dispatcher: Dispatcher
) -> None:
    """The previous release's model dumped `"user_id": 42`: its queued envelope carries that payload and its hash.
    Its ids came from the scope `user:42`, which a string id gives again, so it applies once, and again is a
    duplicate; the row holds the id as a string."""
    accepted = dispatcher.accept(CREATE, NOTE | {"user_id": "42"}, idempotency_key="queued-before")
    assert accepted == dispatcher.accept(CREATE, NOTE, idempotency_key="queued-before").model_copy(
        update={"accepted_stamp": accepted.accepted_stamp, "accepted_at": accepted.accepted_at}
    )  # an int in the body is the same write as its decimal string
    assert accepted.scope == "user:42"
    assert accepted.command_id == command_id_for(CREATE, "user:42", "queued-before")
    assert accepted.entity_id == entity_id_for(CREATE, "user:42", "queued-before")
    previous_payload = accepted.payload | {"user_id": 42}
    queued = accepted.model_copy(update={"payload": previous_payload, "payload_hash": payload_hash(previous_payload)})
    queued = Envelope.model_validate(queued.model_dump(mode="json"))  # as the worker reads it from the message
    first = apply(db, dispatcher, queued)
    again = apply(db, dispatcher, queued)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.entity_id == again.entity_id == accepted.entity_id
    assert count(db, notifications) == 1 and count(db, applied_commands) == 1
    with db.session() as s:
        assert s.execute(select(notifications.c.user_id)).scalar_one() == "42"


def test_without_a_key_each_submit_is_a_new_write(db: Database, dispatcher: Dispatcher) -> None:
    one, two = dispatcher.submit(CREATE, NOTE), dispatcher.submit(CREATE, NOTE)
    assert isinstance(one, Applied) and isinstance(two, Applied) and one.id != two.id
    assert count(db, notifications) == 2


def test_read_state_is_last_accepted_wins(db: Database, dispatcher: Dispatcher) -> None:
    created = dispatcher.submit(CREATE, NOTE, idempotency_key="c")
    assert isinstance(created, Applied)
    target = {"notification_id": str(created.id)}
    # accepted in this order: read, unread, read; applied in reverse
    accepted = [
        dispatcher.accept(MARK_READ, target, idempotency_key="r1"),
        dispatcher.accept(MARK_UNREAD, target, idempotency_key="u1"),
        dispatcher.accept(MARK_READ, target, idempotency_key="r2"),
    ]
    outcomes = [apply(db, dispatcher, envelope).outcome for envelope in reversed(accepted)]
    assert outcomes == ["applied", "superseded", "superseded"]
    with db.session() as s:
        assert s.execute(select(notifications.c.read).where(notifications.c.id == created.id)).scalar_one() is True
        effective = s.execute(
            select(applied_commands.c.accepted_stamp)
            .where(applied_commands.c.entity_key == f"notification:{created.id}", applied_commands.c.outcome == "applied")
            .order_by(applied_commands.c.apply_seq)
        ).scalars()
        stamps = list(effective)
    assert stamps == sorted(stamps), "an earlier-accepted write took effect after a later one"


def test_mark_read_waits_for_its_creation(db: Database, dispatcher: Dispatcher) -> None:
    create = dispatcher.accept(CREATE, NOTE, idempotency_key="late")
    read = dispatcher.accept(MARK_READ, {"notification_id": str(create.entity_id)}, idempotency_key="early")
    with pytest.raises(DependencyPending):
        apply(db, dispatcher, read)
    assert count(db, applied_commands) == 0, "a write that waits must leave no trace"
    apply(db, dispatcher, create)
    assert apply(db, dispatcher, read).outcome == "applied"
    with db.session() as s:
        assert s.execute(select(notifications.c.read)).scalar_one() is True


def test_direct_mark_read_of_a_queued_creation_goes_to_the_queue(dispatcher: Dispatcher) -> None:
    pending = dispatcher.accept(CREATE, NOTE, idempotency_key="queued-creation")
    outcome = dispatcher.submit(MARK_READ, {"notification_id": str(pending.entity_id)}, idempotency_key="r")
    assert isinstance(outcome, Rejected)  # it tried to queue: no publisher in this test
    assert "queue" in outcome.reason


def test_concurrent_appliers_of_one_write_take_effect_once(db: Database, dispatcher: Dispatcher) -> None:
    created = dispatcher.submit(CREATE, NOTE, idempotency_key="c")
    assert isinstance(created, Applied)
    envelope = dispatcher.accept(MARK_READ, {"notification_id": str(created.id)}, idempotency_key="race")
    barrier = threading.Barrier(6)
    results: list[AppliedWrite] = []

    def applier() -> None:
        barrier.wait()
        results.append(apply(db, dispatcher, envelope))

    threads = [threading.Thread(target=applier) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6
    assert sorted(r.duplicate for r in results) == [False] + [True] * 5
    with db.session() as s:
        recorded = s.execute(
            select(applied_commands.c.apply_seq).where(applied_commands.c.command_id == envelope.command_id)
        ).scalar_one()
    assert {r.apply_seq for r in results if r.duplicate} == {recorded}, "each duplicate reports the first apply"


def test_invalid_payloads_and_keys_are_refused(dispatcher: Dispatcher) -> None:
    with pytest.raises(InvalidCommand) as bad:
        dispatcher.submit(CREATE, NOTE | {"email": "not-an-address", "user_id": 0})
    fields = {error["loc"][0] for error in bad.value.errors}
    assert fields == {"email", "user_id"}
    with pytest.raises(InvalidCommand):
        dispatcher.submit(CREATE, NOTE | {"subject": "x" * 201})
    with pytest.raises(InvalidCommand):
        dispatcher.submit(CREATE, NOTE, idempotency_key="k" * 201)
    with pytest.raises(UnknownCommand):
        dispatcher.submit("drop_everything", {})


def test_unknown_version_is_not_applied(db: Database, dispatcher: Dispatcher) -> None:
    envelope = dispatcher.accept(CREATE, NOTE).model_copy(update={"version": 99})
    with pytest.raises(UnknownCommand):
        apply(db, dispatcher, envelope)
    assert count(db, applied_commands) == 0


def test_breaker_open_and_no_queue_is_rejected_without_touching_the_database(db: Database, dispatcher: Dispatcher) -> None:
    db.breaker.force_open()
    outcome = dispatcher.submit(CREATE, NOTE, idempotency_key=str(uuid.uuid4()))
    assert isinstance(outcome, Rejected) and outcome.retry_after > 0
    db.breaker.reset()
    assert count(db, notifications) == 0


def test_purge_removes_only_old_keys(db: Database, dispatcher: Dispatcher) -> None:
    from datetime import timedelta

    from brownout._dispatch.retention import purge_applied

    dispatcher.submit(CREATE, NOTE, idempotency_key="old")
    dispatcher.submit(CREATE, NOTE, idempotency_key="new")
    with db.session() as s:
        s.execute(
            applied_commands.update()
            .where(applied_commands.c.idempotency_key == "old")
            .values(applied_at=func.now() - timedelta(days=31))
        )
        s.commit()
        assert purge_applied(s, older_than=timedelta(days=30)) == 1
        keys = s.execute(select(applied_commands.c.idempotency_key)).scalars().all()
    assert keys == ["new"]
    assert count(db, notifications) == 2, "purging keys never touches the data"


def test_a_creation_committing_between_update_and_check_is_not_mistaken_for_a_later_write(
    db: Database, dispatcher: Dispatcher, make_database: Callable[..., Database]
) -> None:
    """Forced interleaving: the mark-read's UPDATE misses the row (not committed yet), then the
    creation commits before the mark-read looks again. It must apply, not be 'superseded'."""
    from sqlalchemy import event

    creation = dispatcher.accept(CREATE, NOTE, idempotency_key="c")
    mark = dispatcher.accept(MARK_READ, {"notification_id": str(creation.entity_id)}, idempotency_key="r")
    other = make_database()
    creator = other.session()
    registry = build_registry()
    registry.get(CREATE).apply(creator, creation, registry.get(CREATE).parse(1, creation.payload))  # uncommitted

    def commit_creation_after_the_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE notifications") and creator.in_transaction():
            creator.commit()

    event.listen(db.engine, "after_cursor_execute", commit_creation_after_the_update)
    try:
        written = apply(db, dispatcher, mark)
    finally:
        event.remove(db.engine, "after_cursor_execute", commit_creation_after_the_update)
        creator.close()
    assert written.outcome == "applied"
    with db.session() as s:
        assert s.execute(select(notifications.c.read)).scalar_one() is True
