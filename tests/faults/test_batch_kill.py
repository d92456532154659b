"""The worker's batches with their connections killed mid-batch (pg_terminate_backend).

A real Dramatiq Worker (8 threads, the production middleware, batched deliveries
of at most BATCH_MAX so that the kills land between committed batches) drains
a backlog of creations and read/unread toggles. Every
COMMIT is slowed down by the deferred trigger of test_worker_signals, so the
kills land while a batch's COMMIT is under way: the whole batch fails with a
disconnect, `execute_with_retry` runs it again on a fresh connection, and
every write ends up applied exactly once, in order, nothing dead-lettered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from app.dispatch.notifications import build_registry
from app.schema import upgrade_database
from brownout._db import Database
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands
from brownout._worker.actors import APPLY_BATCH_ACTOR, ApplyRuntime, declare_apply_actor
from brownout._worker.drain import AdaptiveDrain
from brownout._worker.health_gate import HealthGate
from tests.conftest import database_url, terminate_backends
from tests.faults.test_worker_signals import (
    MAX_LENGTH,
    THROTTLE,
    assert_applied_exactly_once,
    committing,
    count,
    execute,
    queue_backlog,
    throttle,
    waiting_messages,
)
from tests.support.polling import wait_until
from tests.support.worker_rig import WorkerRig

KILLS = 3
BATCH_MAX = 16
THREADS = 8


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    database = make_database()
    execute(database, THROTTLE)
    return database


@pytest.fixture
def worker_app_name(app_name: str) -> str:
    return f"{app_name}-worker"


@pytest.fixture
def start_worker(
    make_database: Callable[..., Database], queue_name: str, worker_app_name: str, make_worker_rig: Callable[..., WorkerRig]
) -> Callable[[], list[int]]:
    """Start the worker; returns the sizes of the batches it runs (appended as they start)."""
    rig = make_worker_rig(max_length=MAX_LENGTH)
    broker = rig.broker

    def start() -> list[int]:
        database = make_database(db_application_name=worker_app_name, retry_base_seconds=0.05, retry_cap_seconds=0.2)
        broker.add_middleware(HealthGate.for_database(database, base_seconds=0.2, cap_seconds=1.0, timeout=1.0))
        drain = AdaptiveDrain.for_database(database, max_concurrency=THREADS, actor_names={APPLY_BATCH_ACTOR})
        broker.add_middleware(drain)
        runtime = ApplyRuntime(
            database=database, registry=build_registry(), defer_base_seconds=0.05, defer_cap_seconds=0.2, batch_max=BATCH_MAX
        )
        sizes: list[int] = []
        runtime.on_batch = sizes.append
        declare_apply_actor(broker, runtime, queue_name=queue_name)
        rig.start({queue_name}, threads=THREADS)
        return sizes

    return start


def test_connections_killed_mid_batch_lose_nothing_and_apply_nothing_twice(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    pg_database: str,
    worker_app_name: str,
    start_worker: Callable[[], list[int]],
) -> None:
    backlog = queue_backlog(db, make_publisher(max_length=MAX_LENGTH), queue_name)
    throttle(db, 0.02)  # per row of a COMMIT: a batch of 16 commits in about 0.3 s
    sizes = start_worker()
    killed_in_commit = 0
    for _ in range(KILLS):
        assert wait_until(lambda: committing(pg_database, worker_app_name) > 0, timeout=30, interval=0.005)
        killed_in_commit += committing(pg_database, worker_app_name) > 0
        assert terminate_backends(pg_database, worker_app_name)
        threading.Event().wait(0.3)  # let the retry get under way
    applied_at_last_kill = count(db, applied_commands)
    assert applied_at_last_kill < backlog.total, "the kills landed mid-drain"
    assert killed_in_commit >= 1
    throttle(db, 0)
    assert wait_until(lambda: count(db, applied_commands) >= backlog.total, timeout=60, interval=0.1)
    assert wait_until(lambda: waiting_messages(queue_name) == 0, timeout=20, interval=0.1)
    assert_applied_exactly_once(db, backlog, queue_name)
    assert max(sizes) > 1, f"writes were committed in groups: {sizes[:40]}"
    print(f"killed {KILLS} times ({killed_in_commit} in a COMMIT) at {applied_at_last_kill}/{backlog.total} applied")
