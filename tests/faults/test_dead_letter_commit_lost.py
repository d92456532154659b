"""A connection lost during the COMMIT of a dead letter: the write ends in `dead_letters`, never in Q.XQ.

The fault is real: a deferred constraint trigger on `dead_letters` makes PostgreSQL terminate the worker's
own backend while it commits the first dead letter (a sequence, which no rollback undoes, makes it happen
once). The client sees its connection drop during COMMIT, with the outcome unknown, exactly as in a
database incident. Storing a dead letter is idempotent per message and attempt, so the worker stores it
again and goes on; before, the unknown outcome counted as a permanent error and the delivery went to Q.XQ,
a queue that expires messages and that `dead-letters list` does not show.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from dramatiq.common import xq_name
from sqlalchemy import func, select, text

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout._db import Database
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands, dead_letters
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count
from tests.support.worker_rig import WorkerRig

NOTE = {"user_id": 5, "email": "grace@example.com", "subject": "fine", "body": "b"}

KILL_AT_FIRST_COMMIT = """
CREATE SEQUENCE test_commits_seen;
CREATE FUNCTION test_kill_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('test_commits_seen') = 1 THEN
    PERFORM pg_terminate_backend(pg_backend_pid());
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER test_kill_at_commit AFTER INSERT ON dead_letters
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_kill_at_commit();
"""


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    database = make_database()
    with database.session() as s:
        s.execute(text("ALTER TABLE notifications ADD CONSTRAINT test_no_poison CHECK (subject <> 'poison')"))
        s.execute(text(KILL_AT_FIRST_COMMIT))
        s.commit()
    return database


def count(db: Database, table: object) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_a_dead_letter_whose_commit_is_lost_is_stored_once_and_never_reaches_the_xq(
    db: Database, make_database: Callable[..., Database], make_publisher: Callable[..., Publisher],
    make_worker_rig: Callable[..., WorkerRig], queue_name: str,
) -> None:  # fmt: skip
    publisher = make_publisher()
    dispatcher = Dispatcher(
        database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=2.0
    )
    poison = dispatcher.accept(CREATE, NOTE | {"subject": "poison"})  # refused by test_no_poison: a dead letter
    good = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(3)]
    runtime = ApplyRuntime(database=make_database(retry_base_seconds=0.05, retry_cap_seconds=0.1), registry=build_registry())
    outcomes: list[str] = []
    runtime.observe = lambda outcome, seconds: outcomes.append(outcome)
    rig = make_worker_rig()
    declare_apply_actor(rig.broker, runtime, queue_name=queue_name)
    for envelope in (poison, *good):
        publisher.publish(envelope.to_message(queue_name))
    rig.start({queue_name}, threads=2)

    assert wait_until(lambda: count(db, dead_letters) == 1 and count(db, applied_commands) == 3, timeout=30)
    assert wait_until(lambda: ready_count(queue_name) == 0, timeout=10)
    rig.stop_workers()  # its channel closes: anything left unacknowledged would be ready again
    assert ready_count(queue_name) == 0
    assert ready_count(xq_name(queue_name)) == 0
    with db.session() as s:
        (row,) = s.execute(select(dead_letters)).all()
        killed = s.execute(text("SELECT last_value FROM test_commits_seen")).scalar_one()
    assert row.message_id == str(poison.command_id) and row.attempt == 0
    assert killed >= 2, "the first COMMIT of the dead letter was cut (the fault happened)"
    assert "rejected" not in outcomes
