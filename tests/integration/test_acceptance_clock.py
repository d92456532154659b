"""Acceptance stamps never go backwards across a restart on a host whose wall clock stepped back.

A user marks a notification read, then unread. Between the two, the web process restarts on a host whose
wall clock NTP stepped back 2 s (or the second request lands on a replica whose clock runs 2 s behind).
Before, its fresh clock started from the wall clock: the unread got a lower stamp than the read, was
recorded `superseded`, and the API still answered 200 as if it had taken effect. The dispatcher now seeds
its clock with the highest stamp recently applied; and a write that is superseded says so in its body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text

from app.api.writes import NotificationWrites
from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD, build_registry
from brownout._db import Database
from brownout._dispatch.dispatcher import Applied, Dispatcher
from brownout._dispatch.hlc import HybridClock
from brownout._settings import Settings

NOW = 1_800_000_000.0
NOTE = {"user_id": 3, "email": "ada@example.com", "subject": "clock", "body": "b"}


@pytest.fixture
def settings(api_settings: Callable[..., Settings]) -> Settings:
    return api_settings()


@pytest.fixture
def dispatchers(settings: Settings, make_database: Callable[..., Database]) -> Iterator[Callable[[float], Dispatcher]]:
    built: list[Dispatcher] = []

    def start(wall: float) -> Dispatcher:
        """A web process starting now on a host whose wall clock reads *wall*."""
        dispatcher = Dispatcher.from_settings(
            settings, make_database(), registry=build_registry(), clock=HybridClock(wall=lambda: wall)
        )
        built.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in built:
        dispatcher.close()


def read_state(database: Database, notification_id: str) -> bool:
    with database.session() as session:
        return bool(session.execute(text("SELECT read FROM notifications WHERE id = :id"), {"id": notification_id}).scalar_one())


def test_a_restart_behind_the_last_stamp_still_stamps_later_writes_later(
    dispatchers: Callable[[float], Dispatcher], make_database: Callable[..., Database]
) -> None:
    before = dispatchers(NOW)
    created = before.submit(CREATE, NOTE)
    assert isinstance(created, Applied)
    target = {"notification_id": str(created.id)}
    assert isinstance(before.submit(MARK_READ, target), Applied)

    after = dispatchers(NOW - 2.0)  # the restarted process: its wall clock stepped back 2 s
    unread = after.submit(MARK_UNREAD, target)
    assert isinstance(unread, Applied)
    assert not unread.superseded, "the later write was stamped below the earlier one"
    assert read_state(make_database(), str(created.id)) is False


def test_a_superseded_write_says_so_in_its_answer(settings: Settings, make_database: Callable[..., Database]) -> None:
    """A process whose clock runs behind and could not see the later stamp (nothing seeded it)."""
    ahead = Dispatcher(database=make_database(), publisher=None, registry=build_registry(), queue_name=settings.queue_name,
                       request_deadline=2.0, clock=HybridClock(wall=lambda: NOW))  # fmt: skip
    behind = Dispatcher(database=make_database(), publisher=None, registry=build_registry(), queue_name=settings.queue_name,
                        request_deadline=2.0, clock=HybridClock(wall=lambda: NOW - 2.0))  # fmt: skip
    created = ahead.submit(CREATE, NOTE)
    assert isinstance(created, Applied)
    target = {"notification_id": str(created.id)}
    writes = NotificationWrites(dispatcher=behind, link=None, cache=None, pending=None, key_seconds=60)
    assert isinstance(ahead.submit(MARK_UNREAD, target), Applied)
    stale = writes.submit(MARK_READ, target, idempotency_key=None)
    assert stale.status_code == 200 and stale.body.get("superseded") is True
    assert stale.body["read"] is False  # the value that holds, set by the later write
    again = writes.submit(MARK_READ, target, idempotency_key=None)  # the clock saw the later stamp meanwhile
    assert again.status_code == 200 and "superseded" not in again.body and again.body["read"] is True
