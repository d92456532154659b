"""How long a queued write waits, by reason, on the wall clock; and how the wait ends (src/brownout/_dispatch/waiting.py).

Real RabbitMQ (deferrals go through the delay queue), real PostgreSQL; the wall clock the waits are
measured on is the test's, moved forward instead of slept through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dramatiq.common import xq_name
from sqlalchemy import func, select

from app.api.queries import command_status
from app.dispatch.notifications import CREATE, MARK_READ, build_registry
from app.schema import upgrade_database
from brownout._db import Database
from brownout._dispatch import dead_letters as dead_letter_store
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.publisher import Publisher
from brownout._dispatch.waiting import DEFERRALS_OPTION, SINCE_OPTION, WaitLimits
from brownout._schema import applied_commands, dead_letters
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count
from tests.support.worker_rig import WorkerRig

NOTE = {"user_id": 9, "email": "lin@example.com", "subject": "Queued", "body": "later"}
LIMITS = WaitLimits(unknown_version_seconds=6 * 3600, dependency_seconds=600)


class Wall:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def outcomes() -> list[str]:
    return []


@pytest.fixture
def start_worker(
    make_database: Callable[..., Database], queue_name: str, make_worker_rig: Callable[..., WorkerRig], wall: Wall,
    outcomes: list[str],
) -> Callable[[], None]:  # fmt: skip
    runtime = ApplyRuntime(database=make_database(), registry=build_registry(), limits=LIMITS, wall=wall,
                           defer_base_seconds=0.05, defer_cap_seconds=0.1)  # fmt: skip
    runtime.observe = lambda outcome, seconds: outcomes.append(outcome)
    rig = make_worker_rig()
    declare_apply_actor(rig.broker, runtime, queue_name=queue_name)
    return lambda: rig.start({queue_name}, threads=2) and None


def dispatcher(db: Database, publisher: Publisher, queue_name: str) -> Dispatcher:
    return Dispatcher(database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=0.3)


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_mark_whose_notification_never_came_is_dropped_once_its_wait_is_over(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, start_worker: Callable[[], None],
    wall: Wall, outcomes: list[str],
) -> None:  # fmt: skip
    publisher = make_publisher()
    never_created = dispatcher(db, publisher, queue_name).accept(CREATE, NOTE)  # accepted, never published
    mark = dispatcher(db, publisher, queue_name).accept(MARK_READ, {"notification_id": str(never_created.entity_id)})
    publisher.publish(mark.to_message(queue_name))
    start_worker()
    assert wait_until(lambda: outcomes.count("deferred") >= 3, timeout=20), "the mark waits for its notification"
    assert count(db, applied_commands) == 0
    wall.now += LIMITS.dependency_seconds + 1  # the wait is over
    assert wait_until(lambda: "dropped" in outcomes, timeout=20)
    with db.session() as s:
        status = command_status(s, mark.command_id)
    assert status is not None and status["status"] == "dropped" and status["outcome"] == "dropped"
    assert "never came" in status["result"]["dropped"]
    assert count(db, dead_letters) == 0, "a dropped mark is its own outcome, not a dead letter"
    assert ready_count(xq_name(queue_name)) == 0
    assert wait_until(lambda: ready_count(queue_name) == 0, timeout=5)


def test_an_unknown_version_waits_hours_not_a_count_then_becomes_a_dead_letter_replayed_afresh(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, start_worker: Callable[[], None],
    wall: Wall, outcomes: list[str],
) -> None:  # fmt: skip
    publisher = make_publisher()
    newer: Envelope = dispatcher(db, publisher, queue_name).accept(CREATE, NOTE).model_copy(update={"version": 2})
    message = newer.to_message(queue_name)
    # Deferred 500 times already (about 8 hours at the old schedule's pace): a count is no measure of a wait.
    message = message.copy(options={**message.options, DEFERRALS_OPTION: 500, SINCE_OPTION: wall.now - 3600})
    publisher.publish(message)
    start_worker()
    assert wait_until(lambda: outcomes.count("deferred") >= 2, timeout=20)
    assert count(db, dead_letters) == 0, "a write waiting for its release must not be dead-lettered within the wait"
    wall.now += LIMITS.unknown_version_seconds  # six hours later, still no release that knows version 2
    assert wait_until(lambda: count(db, dead_letters) == 1, timeout=20)
    with db.session() as s:
        (row,) = s.execute(select(dead_letters)).mappings().all()
        replayed = dead_letter_store.for_replay(dict(row))
    assert "release that knows it" in row["reason"]
    assert DEFERRALS_OPTION not in replayed.options and SINCE_OPTION not in replayed.options  # the wait starts afresh


def test_a_hand_published_write_with_nonsense_wait_options_waits_like_any_other(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, start_worker: Callable[[], None],
    outcomes: list[str],
) -> None:  # fmt: skip
    """`int(options["brownout_deferrals"])` raised on a message published by hand or by a bug: the whole batch
    failed and went to Q.XQ. The wait's options are read leniently: nonsense counts as no wait yet."""
    publisher = make_publisher()
    creation = dispatcher(db, publisher, queue_name).accept(CREATE, NOTE)
    mark = dispatcher(db, publisher, queue_name).accept(MARK_READ, {"notification_id": str(creation.entity_id)})
    message = mark.to_message(queue_name)
    publisher.publish(message.copy(options={DEFERRALS_OPTION: "lots", SINCE_OPTION: [1, 2]}))
    start_worker()
    assert wait_until(lambda: outcomes.count("deferred") >= 1, timeout=20)
    publisher.publish(creation.to_message(queue_name))
    assert wait_until(lambda: count(db, applied_commands) == 2, timeout=20)
    assert ready_count(xq_name(queue_name)) == 0 and count(db, dead_letters) == 0


def test_a_write_deferred_more_than_a_thousand_times_keeps_waiting(
    db: Database, make_publisher: Callable[..., Publisher], queue_name: str, start_worker: Callable[[], None],
    outcomes: list[str],
) -> None:  # fmt: skip
    """The delay is 2**deferrals capped: 2.0**1024 overflows a float, and a write waiting 24 h for its release
    (about 13 h of deferrals in) was dead-lettered "error while deferring it: OverflowError"."""
    publisher = make_publisher()
    newer: Envelope = dispatcher(db, publisher, queue_name).accept(CREATE, NOTE).model_copy(update={"version": 2})
    message = newer.to_message(queue_name)
    publisher.publish(message.copy(options={**message.options, DEFERRALS_OPTION: 1100}))
    start_worker()
    assert wait_until(lambda: outcomes.count("deferred") >= 2, timeout=20), outcomes
    assert count(db, dead_letters) == 0 and "dead_lettered" not in outcomes
