"""The dispatcher's direct path when a write needs an entity nobody creates: the caller's `expected` says
whether its creation may still come; if not, the write is DependencyMissing (nothing queued, nothing recorded)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, MARK_READ, build_registry
from app.schema import upgrade_database
from brownout._db import Database
from brownout._dispatch.commands import DependencyMissing
from brownout._dispatch.dispatcher import Applied, Dispatcher, Rejected
from brownout._dispatch.envelope import Envelope
from brownout._schema import applied_commands
from tests.conftest import database_url

NOTE = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


@pytest.fixture
def dispatcher(db: Database) -> Dispatcher:
    return Dispatcher(database=db, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=2.0)


def recorded(db: Database) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(applied_commands)).scalar_one())


def test_nothing_expected_makes_the_write_dependency_missing(db: Database, dispatcher: Dispatcher) -> None:
    never = dispatcher.accept(CREATE, NOTE)
    mark = dispatcher.accept(MARK_READ, {"notification_id": str(never.entity_id)})
    asked: list[Envelope] = []
    with pytest.raises(DependencyMissing) as raised:
        dispatcher.submit_envelope(mark, expected=lambda envelope: asked.append(envelope) or False)
    assert asked == [mark]
    assert raised.value.entity_key == mark.entity_key and str(never.entity_id) in str(raised.value)
    assert recorded(db) == 0


def test_an_expected_creation_sends_the_write_to_the_queue(dispatcher: Dispatcher) -> None:
    pending = dispatcher.accept(CREATE, NOTE)
    mark = dispatcher.accept(MARK_READ, {"notification_id": str(pending.entity_id)})
    outcome = dispatcher.submit_envelope(mark, expected=lambda envelope: True)
    assert isinstance(outcome, Rejected) and "queue" in outcome.reason  # it tried to queue: no publisher here


def test_without_expected_the_write_goes_to_the_queue_as_before(dispatcher: Dispatcher) -> None:
    pending = dispatcher.accept(CREATE, NOTE)
    outcome = dispatcher.submit(MARK_READ, {"notification_id": str(pending.entity_id)})
    assert isinstance(outcome, Rejected) and "queue" in outcome.reason


def test_a_creation_applied_while_expected_was_asked_is_found_by_a_second_look(db: Database, dispatcher: Dispatcher) -> None:
    """Redis is asked after the database: a creation applied (and its pending entry cleared) in between is
    in the database by then, so the write looks there once more before saying it is missing."""
    creation = dispatcher.accept(CREATE, NOTE)
    mark = dispatcher.accept(MARK_READ, {"notification_id": str(creation.entity_id)})

    def applied_meanwhile(envelope: Envelope) -> bool:
        assert isinstance(dispatcher.submit_envelope(creation), Applied)
        return False

    outcome = dispatcher.submit_envelope(mark, expected=applied_meanwhile)
    assert isinstance(outcome, Applied) and outcome.result["read"] is True
    assert recorded(db) == 2
