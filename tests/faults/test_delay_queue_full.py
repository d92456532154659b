"""A delay queue that refuses deferrals holds back only the writes that need one; the rest of the queue drains.

The fault is RabbitMQ's own: a policy of this test's (a maximum length of 0 on its delay queue; where a
queue's argument and a policy both bound a queue, RabbitMQ applies the lower) makes the broker nack every
deferral, as a full delay queue does. Before, the refusal counted as the database being unavailable: the
health gate held the whole batch, `SELECT 1` passed, the same head batch came back, and the worker looped
while nothing was acknowledged. Now that delivery alone is given back to RabbitMQ a few seconds later.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest
from dramatiq.common import dq_name, xq_name
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, MARK_READ, build_registry
from app.schema import upgrade_database
from brownout._db import Database
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands, dead_letters
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from brownout._worker.health_gate import HealthGate
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count
from tests.support.worker_rig import WorkerRig

NOTE = {"user_id": 9, "email": "lin@example.com", "subject": "fine", "body": "b"}


@pytest.fixture
def refusing_delay_queue(queue_name: str) -> Iterator[Callable[[], None]]:
    """Make RabbitMQ refuse every publish to this test's delay queue; the returned function lifts it."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl not installed")
    policy = f"bo-test-full-{uuid.uuid4().hex[:8]}"
    pattern = f"^{re.escape(dq_name(queue_name))}$"
    definition = '{"max-length": 0, "overflow": "reject-publish"}'
    subprocess.run([rabbitmqctl, "--quiet", "set_policy", "--apply-to", "queues", "--priority", "100", policy, pattern,
                    definition], check=True, capture_output=True, timeout=60)  # fmt: skip

    def lift() -> None:
        subprocess.run([rabbitmqctl, "--quiet", "clear_policy", policy], check=False, capture_output=True, timeout=60)

    yield lift
    lift()


def count(db: Database, table: object) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_a_refused_deferral_holds_only_its_own_write(
    make_database: Callable[..., Database], pg_database: str, make_publisher: Callable[..., Publisher],
    make_worker_rig: Callable[..., WorkerRig], queue_name: str, refusing_delay_queue: Callable[[], None],
) -> None:  # fmt: skip
    upgrade_database(database_url(pg_database))
    db = make_database()
    publisher = make_publisher()
    dispatcher = Dispatcher(database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name,
                            request_deadline=2.0)  # fmt: skip
    later = dispatcher.accept(CREATE, NOTE | {"subject": "created after its mark"})
    mark = dispatcher.accept(MARK_READ, {"notification_id": str(later.entity_id)})  # needs a deferral
    good = [dispatcher.accept(CREATE, NOTE | {"subject": f"good {n}"}) for n in range(5)]
    outcomes: list[str] = []
    runtime = ApplyRuntime(database=make_database(), registry=build_registry(), defer_base_seconds=0.05,
                           defer_cap_seconds=0.1)  # fmt: skip
    runtime.observe = lambda outcome, seconds: outcomes.append(outcome)
    rig = make_worker_rig()
    gate = HealthGate(lambda: True, base_seconds=0.2, cap_seconds=1.0)  # the database is fine throughout
    rig.broker.add_middleware(gate)
    declare_apply_actor(rig.broker, runtime, queue_name=queue_name)
    for envelope in (mark, *good):
        publisher.publish(envelope.to_message(queue_name))
    rig.start({queue_name}, threads=2)

    assert wait_until(lambda: count(db, applied_commands) == 5 and "held" in outcomes, timeout=30)
    assert wait_until(lambda: outcomes.count("applied") == 5 and gate.pauses == 0, timeout=5)
    assert gate.held == 0, "a refused deferral is no database outage"
    # The five were acknowledged; only the mark is left, with this consumer or back in the queue.
    rig.stop_workers()
    assert ready_count(queue_name) == 1
    assert ready_count(xq_name(queue_name)) == 0 and count(db, dead_letters) == 0

    # RabbitMQ takes deferrals again, and the notification arrives: the mark applies.
    refusing_delay_queue()
    publisher.publish(later.to_message(queue_name))
    rig.start({queue_name}, threads=2)
    assert wait_until(lambda: count(db, applied_commands) == 7, timeout=30)
