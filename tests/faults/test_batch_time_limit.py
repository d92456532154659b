"""A batch cut off by Dramatiq's time limit: held once, then its writes one by one, the culprit dead-lettered.

Dramatiq's TimeLimit raises `TimeLimitExceeded` (a BaseException) in the worker thread of an actor that
runs too long. The apply actor's batch then failed as a whole, with no write to blame: before, Dramatiq's
nack sent every delivery of the batch, applied or not, to Q.XQ. Here a command's apply that never ends
(what a hung call in a service's own command looks like) sits in a batch of good writes: the batch is
held, its deliveries come back one per batch, the good ones apply, the hung one is cut off again, alone,
and kept as a dead letter naming the time limit. Nothing reaches Q.XQ.

The time limit is real (Dramatiq's middleware and its timer thread), shortened to 1 s, and the hold to
0.3 s, so the test takes seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dramatiq.common import dq_name, xq_name
from dramatiq.middleware import TimeLimit
from pydantic import BaseModel
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout._db import Database
from brownout._dispatch.commands import Command, Effect
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands, dead_letters
from brownout._worker import batched_delivery
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count
from tests.support.worker_rig import WorkerRig

NOTE = {"user_id": 5, "email": "grace@example.com", "subject": "fine", "body": "b"}
HUNG_FOR_AT_MOST = 60.0


class _Anything(BaseModel):
    n: int


@pytest.fixture
def released() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


def count(db: Database, table: object) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_a_batch_cut_off_by_the_time_limit_is_retried_one_by_one_and_only_the_hung_write_is_dead_lettered(
    db: Database,
    make_database: Callable[..., Database],
    make_publisher: Callable[..., Publisher],
    make_worker_rig: Callable[..., WorkerRig],
    queue_name: str,
    released: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batched_delivery, "HOLD_SECONDS", 0.3)
    starts: list[str] = []

    def hang(session: Any, envelope: Envelope, payload: BaseModel) -> Effect:
        starts.append(str(envelope.command_id))
        deadline = time.monotonic() + HUNG_FOR_AT_MOST
        while not released.wait(0.02) and time.monotonic() < deadline:
            pass  # short waits: TimeLimit's exception lands between two (never inside a blocking call)
        raise AssertionError("the time limit never cut this apply off")

    registry = build_registry()
    registry.register(Command(name="test_hang", versions={1: _Anything}, scope=lambda payload: "test",
                              entity=lambda payload, derived: derived, apply=hang))  # fmt: skip
    publisher = make_publisher()
    dispatcher = Dispatcher(database=db, publisher=publisher, registry=registry, queue_name=queue_name, request_deadline=2.0)
    good = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(4)]
    hung = dispatcher.accept("test_hang", {"n": 1})
    for envelope in (good[0], hung, *good[1:]):
        publisher.publish(envelope.to_message(queue_name))

    rig = make_worker_rig()
    time_limit = TimeLimit(time_limit=1000, interval=50)
    rig.broker.middleware[:] = [time_limit if isinstance(m, TimeLimit) else m for m in rig.broker.middleware]
    time_limit.after_process_boot(rig.broker)  # its timer thread: what `dramatiq` starts at a process's boot
    outcomes: list[str] = []
    runtime = ApplyRuntime(database=make_database(), registry=registry, observe=lambda outcome, seconds: outcomes.append(outcome))
    declare_apply_actor(rig.broker, runtime, queue_name=queue_name)
    rig.start({queue_name}, threads=1)  # one thread: the hung write shares its first batch (what is on the socket)

    assert wait_until(lambda: count(db, dead_letters) == 1, timeout=30), outcomes
    assert wait_until(lambda: count(db, applied_commands) == 4 and ready_count(queue_name) == 0, timeout=10)
    with db.session() as s:
        (row,) = s.execute(select(dead_letters)).mappings().all()
    assert row["message_id"] == str(hung.command_id)
    assert "TimeLimitExceeded" in row["reason"] and "alone" in row["reason"], row["reason"]
    assert starts == [str(hung.command_id)] * 2, "cut off once in its batch, once alone"
    assert outcomes.count("held") >= 2, f"the hung write and at least one good write were held together: {outcomes}"
    assert sorted(o for o in outcomes if o != "held") == ["applied"] * 4 + ["dead_lettered"]
    assert ready_count(xq_name(queue_name)) == 0 and ready_count(dq_name(queue_name)) == 0
