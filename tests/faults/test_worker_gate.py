"""The health gate (invariant 5): a database outage with a backlog does not poison the queue.

A real Dramatiq Worker, a real RabbitMQ queue, and the worker's PostgreSQL
reached through a FaultProxy that the test cuts. The outage outlasts both the
actor's retry budget (max_retries x max_backoff) and its TimeLimit, shortened
here through actor options, so a worker that let Retries or TimeLimit act
would spend retries, use the delay queue or dead-letter.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from dramatiq.common import dq_name, xq_name
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD, build_registry
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch.dispatcher import Dispatcher, Queued
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from brownout._worker.health_gate import DatabaseUnavailable, HealthGate, select_one
from tests.conftest import database_url
from tests.support.polling import wait_until
from tests.support.rabbit import admin_connection, ready_count
from tests.support.tcp_proxy import FaultProxy
from tests.support.worker_rig import WorkerRig

NOTES = 3
TOGGLES = 4  # read, unread, read, unread ... after each creation
MAX_RETRIES = 1
MAX_BACKOFF_MS = 500
TIME_LIMIT_MS = 1000
OUTAGE_SECONDS = 5.0  # > MAX_RETRIES * MAX_BACKOFF_MS and > TIME_LIMIT_MS, with room

# The worker's database: fail fast through the proxy, open the breaker early.
WORKER_DB = {
    "retry_max_retries": 1,
    "retry_base_seconds": 0.05,
    "retry_cap_seconds": 0.1,
    "breaker_failure_threshold": 2,
    "db_connect_timeout_seconds": 1.0,
    "health_timeout_seconds": 1.0,
}


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def read_states(db: Database) -> dict[str, bool]:
    with db.session() as s:
        return {str(row.id): row.read for row in s.execute(select(notifications.c.id, notifications.c.read))}


def peek(queue_name: str) -> list[dramatiq.Message[Any]]:
    """Every message in the queue, in queue order, returned untouched (the channel closes unacked)."""
    connection = admin_connection()
    try:
        channel = connection.channel()
        found = []
        while True:
            method, _, body = channel.basic_get(queue_name, auto_ack=False)
            if method is None:
                return found
            found.append(dramatiq.Message.decode(body))
    finally:
        connection.close()


def unacked(queue_name: str) -> int | None:
    """messages_unacknowledged as RabbitMQ reports it, or None where rabbitmqctl cannot run."""
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, figure = line.partition("\t")
        if name == queue_name:
            return int(figure)
    return None


def queue_backlog(db: Database, publisher: Publisher, queue_name: str) -> tuple[list[str], dict[str, bool]]:
    """Queue creations and read/unread toggles; return command ids in acceptance order and each note's last state."""
    dispatcher = Dispatcher(
        database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=0.3
    )
    db.breaker.force_open()  # every write is queued
    accepted: list[str] = []
    last_read: dict[str, bool] = {}
    for n in range(NOTES):
        note = {"user_id": 7, "email": "ada@example.com", "subject": f"note {n}", "body": "queued"}
        created = dispatcher.submit(CREATE, note, idempotency_key=f"c{n}")
        assert isinstance(created, Queued)
        accepted.append(str(created.command_id))
        for t in range(TOGGLES + n):  # each note ends in another state
            read = t % 2 == 0
            marked = dispatcher.submit(
                MARK_READ if read else MARK_UNREAD, {"notification_id": str(created.id)}, idempotency_key=f"m{n}.{t}"
            )
            assert isinstance(marked, Queued)
            accepted.append(str(marked.command_id))
            last_read[str(created.id)] = read
    return accepted, last_read


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


@pytest.fixture
def gated_worker(proxied: Any, queue_name: str, make_worker_rig: Callable[..., WorkerRig]) -> Callable[..., HealthGate]:
    """Start a Worker running the real apply actor behind a HealthGate, on the proxied database.

    The gate checks that database too, unless *check_on* names another one.
    """
    rig = make_worker_rig(max_length=1000)
    broker = rig.broker

    def start(*, check_on: Database | None = None) -> HealthGate:
        database: Database = proxied(**WORKER_DB)
        gate = HealthGate(
            select_one(check_on or database, timeout=1.0), breaker=database.breaker, base_seconds=0.2, cap_seconds=1.0
        )
        broker.add_middleware(gate)
        runtime = ApplyRuntime(database=database, registry=build_registry(), defer_base_seconds=0.05, defer_cap_seconds=0.2)
        actor = declare_apply_actor(broker, runtime, queue_name=queue_name)
        assert actor.options["throws"] == (DatabaseUnavailable,)
        # shortened, so the outage outlasts the retry budget and the time limit
        actor.options.update(max_retries=MAX_RETRIES, min_backoff=100, max_backoff=MAX_BACKOFF_MS, time_limit=TIME_LIMIT_MS)
        rig.start({queue_name}, threads=2)
        return gate

    return start


def test_an_outage_with_a_backlog_pauses_the_worker_and_loses_nothing(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    proxy: FaultProxy,
    gated_worker: Callable[..., HealthGate],
) -> None:
    accepted, last_read = queue_backlog(db, make_publisher(), queue_name)
    backlog = len(accepted)
    assert ready_count(queue_name) == backlog

    proxy.refuse()  # the database goes away for the worker
    outage_started = time.monotonic()
    gate = gated_worker()
    assert wait_until(lambda: gate.paused and gate.pauses >= 1, timeout=15), "the gate must pause the worker"

    # The outage goes on, longer than the retry budget and the time limit.
    while time.monotonic() - outage_started < OUTAGE_SECONDS:
        assert count(db, applied_commands) == 0
        assert ready_count(queue_name) == backlog, "every message waits in the queue, none held by the worker"
        assert ready_count(dq_name(queue_name)) == 0, "nothing goes through the delay queue"
        assert ready_count(xq_name(queue_name)) == 0, "nothing is dead-lettered"
        threading.Event().wait(0.5)  # sample the outage, twice a second
    assert gate.paused
    assert unacked(queue_name) in (0, None)
    queued = peek(queue_name)
    assert [m.message_id for m in queued] == accepted, "the queue keeps its messages in acceptance order"
    assert all(m.options.get("retries", 0) == 0 for m in queued), "no retry is spent on an outage"

    proxy.pass_through()  # the database is back
    assert wait_until(lambda: count(db, applied_commands) == backlog, timeout=30)
    assert wait_until(lambda: ready_count(queue_name) == 0 and not gate.paused, timeout=10)
    assert count(db, notifications) == NOTES
    assert read_states(db) == last_read, "per notification, the last write accepted wins"
    assert ready_count(dq_name(queue_name)) == 0
    assert ready_count(xq_name(queue_name)) == 0
    assert count(db, applied_commands) == backlog, "each write applied exactly once"


def test_shutdown_interrupts_a_paused_gate(db: Database, proxy: FaultProxy, gated_worker: Callable[..., HealthGate]) -> None:
    proxy.refuse()
    gate = gated_worker()
    assert wait_until(lambda: gate.paused, timeout=15)
    assert gate.running
    started = time.monotonic()
    gate.before_worker_shutdown(None, None)  # type: ignore[arg-type]  # what SIGTERM leads to
    assert not gate.running
    assert time.monotonic() - started < 2.5, "the gate waits on an Event, not in a sleep"


def test_an_actor_that_meets_the_outage_pauses_the_worker_even_when_the_check_passes(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    proxy: FaultProxy,
    gated_worker: Callable[..., HealthGate],
) -> None:
    """Only the actor's link is cut: the gate learns of the outage from held messages, not from its check."""
    accepted, last_read = queue_backlog(db, make_publisher(), queue_name)
    proxy.refuse()
    gate = gated_worker(check_on=db)
    assert wait_until(lambda: gate.held >= 1 and gate.pauses >= 1, timeout=15)
    assert not wait_until(lambda: count(db, applied_commands) > 0, timeout=3.0)
    assert ready_count(dq_name(queue_name)) == 0, "nothing goes through the delay queue"
    assert ready_count(xq_name(queue_name)) == 0, "nothing is dead-lettered"
    assert gate.strikes >= 2, "a passing check does not clear the strikes: pauses back off"

    proxy.pass_through()
    assert wait_until(lambda: count(db, applied_commands) == len(accepted), timeout=30)
    assert wait_until(lambda: ready_count(queue_name) == 0, timeout=10)
    assert read_states(db) == last_read
    assert ready_count(dq_name(queue_name)) == 0
    assert ready_count(xq_name(queue_name)) == 0
