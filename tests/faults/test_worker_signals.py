"""The real worker process (the Procfile's worker line, Dramatiq on `brownout._worker.main`) killed or stopped mid-backlog.

- SIGKILL of the whole process tree (an OOM kill, a host lost): what was
  committed but not acknowledged is redelivered and found to be a duplicate,
  what was not committed is redelivered and applied; a second worker ends
  with every write applied exactly once, nothing dead-lettered, the last
  accepted read state on every toggled notification.
- SIGTERM to the main process (what Railway sends on deploy): the worker
  finishes or returns its in-flight messages and exits 0 within the bound set
  by `--worker-shutdown-timeout`, leaving the rest of the backlog in the queue
  for the next worker, again losing nothing and applying nothing twice.

The first worker of each test is slowed down by a deferred trigger that
sleeps inside every apply's COMMIT (the test's own database only), so the
signal lands mid-batch on any machine, and the SIGKILL lands while commits are
under way: PostgreSQL completes them for a client that is gone, the message
was never acknowledged, and its redelivery must be a duplicate. The second
worker runs at full speed and gives the drain rate.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dramatiq.common import dq_name, xq_name
from sqlalchemy import func, select, text

from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD, build_registry
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch.dispatcher import Dispatcher, Queued
from brownout._dispatch.publisher import Publisher
from brownout._schema import applied_commands, command_conflicts, dead_letters
from tests.conftest import admin_cursor, backend_pids, database_url
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, ready_count

REPOSITORY = Path(__file__).resolve().parents[2]
MAX_LENGTH = 1000  # the publisher's and the worker's: RabbitMQ refuses a declaration with other arguments
CREATES = 300
TOGGLED = 100  # notifications whose read state is then set TOGGLE_ROUNDS times
TOGGLE_ROUNDS = 3
SHUTDOWN_TIMEOUT_MS = 5_000  # --worker-shutdown-timeout
# Worker.stop joins the worker threads, then the consumers, each up to the timeout, after the
# worker process's 1 s signal poll: the bound is about twice the timeout, plus room on a busy machine.
EXIT_BOUND_SECONDS = 2 * SHUTDOWN_TIMEOUT_MS / 1000 + 5
PARTIAL = 40  # applied writes that show the worker is under way
THROTTLE_SECONDS = 0.05  # per COMMIT, while the first worker runs: 4 threads, at most ~80 writes/s
STUCK_SECONDS = 20.0  # a COMMIT that outlasts the shutdown timeout (a database gone slow)

# A sleep in every apply's COMMIT, set through a one-row table (no DDL, hence no lock, to change it). It
# stands for a COMMIT's own work (the WAL flush), which goes on when the client is gone: so it turns off the
# client check every transaction opens with (pipelined.py), which would otherwise end the sleep.
THROTTLE = """
CREATE TABLE brownout_test_throttle (seconds float8 NOT NULL);
INSERT INTO brownout_test_throttle VALUES (0);
CREATE FUNCTION brownout_test_throttle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('client_connection_check_interval', '0', true);
  PERFORM pg_sleep((SELECT seconds FROM brownout_test_throttle));
  RETURN NEW;
END $$;
CREATE CONSTRAINT TRIGGER brownout_test_throttle AFTER INSERT ON applied_commands
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION brownout_test_throttle();
"""


@dataclass
class Backlog:
    command_ids: set[uuid.UUID] = field(default_factory=set)
    created: list[uuid.UUID] = field(default_factory=list)
    last_read: dict[uuid.UUID, bool] = field(default_factory=dict)  # the last accepted toggle wins

    @property
    def total(self) -> int:
        return len(self.command_ids)


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    database = make_database()
    execute(database, THROTTLE)
    return database


@pytest.fixture
def worker_app_name(app_name: str) -> str:
    """The worker's application_name: its backends, told apart from the test's own."""
    return f"{app_name}-worker"


@pytest.fixture
def spawn_worker(
    pg_database: str, queue_name: str, worker_app_name: str, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start the worker as the Procfile does, each in its own process group; all killed at the end."""
    env = os.environ | {
        "DATABASE_URL": database_url(pg_database),
        "RABBITMQ_URL": RABBITMQ_URL,
        "BROWNOUT_QUEUE_NAME": queue_name,
        "BROWNOUT_QUEUE_MAX_LENGTH": str(MAX_LENGTH),
        "BROWNOUT_DB_APPLICATION_NAME": worker_app_name,
        "BROWNOUT_COMMANDS": "app.dispatch.notifications:build_registry",
    }
    started: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(started)}.log").open("wb")
        command = [".venv/bin/dramatiq", "brownout._worker.main", "--processes", "1", "--threads", "4", "--queues", queue_name]
        command += ["--worker-shutdown-timeout", str(SHUTDOWN_TIMEOUT_MS)]
        process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        started.append(process)
        return process

    try:
        yield spawn
    finally:
        for process in started:
            kill_group(process)
        for path in sorted(tmp_path.glob("worker-*.log")):
            print(f"--- {path.name} (tail)\n{path.read_text(errors='replace')[-3000:]}")


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's whole tree (the CLI and the worker process it forked) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def group_members(process: subprocess.Popen[bytes]) -> list[int]:
    """Live (not zombie) processes of the worker's group: the CLI and the worker process it forked."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process is gone
            continue
        if int(fields[2]) == process.pid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def execute(db: Database, sql: str, **params: Any) -> None:
    with db.session() as s:
        s.execute(text(sql), params)
        s.commit()


def throttle(db: Database, seconds: float) -> None:
    """Every COMMIT of an apply from now on sleeps *seconds* (0: full speed)."""
    execute(db, "UPDATE brownout_test_throttle SET seconds = :seconds", seconds=seconds)


def committing(dbname: str, application_name: str) -> int:
    """The worker's sessions now inside a COMMIT (sleeping in the deferred trigger)."""
    with admin_cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s"
            " AND state = 'active' AND query ILIKE 'COMMIT%%'",
            (dbname, application_name),
        )
        return int(cur.fetchone()[0])


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def queue_backlog(db: Database, publisher: Publisher, queue_name: str) -> Backlog:
    """CREATES creates, then TOGGLE_ROUNDS rounds of read/unread on TOGGLED of them, all queued."""
    dispatcher = Dispatcher(
        database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=0.3
    )
    db.breaker.force_open()  # the database is "down": every write goes to the queue
    rng = random.Random(7)
    backlog = Backlog()

    def submit(name: str, payload: dict[str, Any], key: str) -> Queued:
        outcome = dispatcher.submit(name, payload, idempotency_key=key)
        assert isinstance(outcome, Queued), outcome
        backlog.command_ids.add(outcome.command_id)
        return outcome

    for i in range(CREATES):
        note = {"user_id": 1 + i % 7, "email": "lin@example.com", "subject": f"Note {i}", "body": "queued"}
        backlog.created.append(submit(CREATE, note, f"create-{i}").id)
    for round_ in range(TOGGLE_ROUNDS):
        for notification_id in rng.sample(backlog.created, TOGGLED):
            read = rng.random() < 0.5
            submit(
                MARK_READ if read else MARK_UNREAD,
                {"notification_id": str(notification_id)},
                f"toggle-{round_}-{notification_id}",
            )
            backlog.last_read[notification_id] = read
    return backlog


def waiting_messages(queue_name: str) -> int:
    """Messages ready in the queue and its delay queue (a deferred write waits in the latter)."""
    return ready_count(queue_name) + ready_count(dq_name(queue_name))


def assert_applied_exactly_once(db: Database, backlog: Backlog, queue_name: str) -> None:
    with db.session() as s:
        recorded = [row.command_id for row in s.execute(select(applied_commands.c.command_id))]
        read_state = {row.id: row.read for row in s.execute(select(notifications.c.id, notifications.c.read))}
    assert len(recorded) == len(set(recorded)) == backlog.total
    assert set(recorded) == backlog.command_ids, "every queued write, and only those, applied"
    assert count(db, notifications) == CREATES, "no create took effect twice, none was lost"
    wrong = {n: read_state.get(n) for n, read in backlog.last_read.items() if read_state.get(n) is not read}
    assert not wrong, f"read state is not the last accepted one for {len(wrong)} notifications"
    assert count(db, dead_letters) == 0 and count(db, command_conflicts) == 0
    assert ready_count(xq_name(queue_name)) == 0, "nothing dead-lettered by Dramatiq"


def drain_and_stop(db: Database, backlog: Backlog, queue_name: str, worker: subprocess.Popen[bytes]) -> float:
    """Wait for *worker* to apply the whole backlog, stop it with SIGTERM; return its rate in writes/s."""
    before = count(db, applied_commands)
    assert wait_until(lambda: count(db, applied_commands) > before, timeout=30, interval=0.02), "the worker starts"
    started, first = time.monotonic(), count(db, applied_commands)
    assert wait_until(lambda: count(db, applied_commands) >= backlog.total, timeout=45, interval=0.05), (
        f"only {count(db, applied_commands)} of {backlog.total} applied"
    )
    rate = (backlog.total - first) / max(time.monotonic() - started, 1e-3)
    assert wait_until(lambda: waiting_messages(queue_name) == 0, timeout=10, interval=0.1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=EXIT_BOUND_SECONDS) == 0
    assert waiting_messages(queue_name) == 0, "the queue is empty at the end"
    return rate


def test_a_worker_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    pg_database: str,
    worker_app_name: str,
    spawn_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    backlog = queue_backlog(db, make_publisher(max_length=MAX_LENGTH), queue_name)
    assert ready_count(queue_name) == backlog.total
    throttle(db, THROTTLE_SECONDS)

    first = spawn_worker()
    assert wait_until(lambda: count(db, applied_commands) >= PARTIAL, timeout=30, interval=0.02)
    assert wait_until(lambda: committing(pg_database, worker_app_name) > 0, timeout=10, interval=0.005)
    kill_group(first)  # no shutdown at all: in-flight transactions and unacked messages are cut off
    assert wait_until(lambda: not group_members(first), timeout=5)
    # its sessions end: a COMMIT under way still completes (for a client that is gone), the rest rolls back
    assert wait_until(lambda: not backend_pids(pg_database, worker_app_name), timeout=10, interval=0.1)
    applied_at_kill = count(db, applied_commands)
    assert PARTIAL <= applied_at_kill < backlog.total, "the kill must land mid-batch"
    # RabbitMQ returns every unacknowledged delivery: at least each write not yet applied waits again
    left = backlog.total - applied_at_kill
    assert wait_until(lambda: waiting_messages(queue_name) >= left, timeout=10, interval=0.1)
    redelivered_duplicates = waiting_messages(queue_name) - left  # committed, killed before the ack
    assert redelivered_duplicates >= 1, "a commit was under way at the kill: its message comes back"

    throttle(db, 0)
    rate = drain_and_stop(db, backlog, queue_name, spawn_worker())
    assert_applied_exactly_once(db, backlog, queue_name)
    print(
        f"killed at {applied_at_kill}/{backlog.total} applied, {redelivered_duplicates} of them committed"
        f" but not acknowledged; second worker: {rate:.0f} writes/s"
    )


def test_sigterm_stops_the_worker_within_the_bound_and_the_next_one_finishes(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    pg_database: str,
    worker_app_name: str,
    spawn_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    backlog = queue_backlog(db, make_publisher(max_length=MAX_LENGTH), queue_name)
    throttle(db, THROTTLE_SECONDS)

    first = spawn_worker()
    assert wait_until(lambda: count(db, applied_commands) >= PARTIAL, timeout=30, interval=0.02)
    signalled = time.monotonic()
    first.send_signal(signal.SIGTERM)  # the main process only, as a platform does
    try:
        returncode = first.wait(timeout=EXIT_BOUND_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within {EXIT_BOUND_SECONDS} s of SIGTERM")
    took = time.monotonic() - signalled
    assert returncode == 0, "dramatiq's clean shutdown (RET_OK)"
    assert wait_until(lambda: not group_members(first), timeout=5), "the forked worker process exited too"
    applied_at_stop = count(db, applied_commands)
    assert applied_at_stop < backlog.total, "a stopping worker must stop taking new messages"
    # a clean stop acknowledges what it committed and returns the rest: exactly the unapplied remain
    assert waiting_messages(queue_name) == backlog.total - applied_at_stop

    assert not backend_pids(pg_database, worker_app_name), "its database sessions closed"

    throttle(db, 0)
    rate = drain_and_stop(db, backlog, queue_name, spawn_worker())
    assert_applied_exactly_once(db, backlog, queue_name)
    print(f"SIGTERM: exit 0 in {took:.2f} s at {applied_at_stop}/{backlog.total} applied; second worker: {rate:.0f} writes/s")


def test_sigterm_does_not_wait_for_a_stuck_apply_past_the_shutdown_timeout(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    pg_database: str,
    worker_app_name: str,
    spawn_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    """Dramatiq's default waits 10 minutes for in-flight work; --worker-shutdown-timeout cuts it short."""
    backlog = queue_backlog(db, make_publisher(max_length=MAX_LENGTH), queue_name)
    throttle(db, THROTTLE_SECONDS)

    first = spawn_worker()
    assert wait_until(lambda: count(db, applied_commands) >= PARTIAL, timeout=30, interval=0.02)
    throttle(db, STUCK_SECONDS)
    # the adaptive drain decides how many threads are in flight (and halves on a stall): at least one
    assert wait_until(lambda: committing(pg_database, worker_app_name) >= 1, timeout=10, interval=0.02), (
        "worker threads inside a long COMMIT"
    )
    signalled = time.monotonic()
    first.send_signal(signal.SIGTERM)
    try:
        returncode = first.wait(timeout=EXIT_BOUND_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within {EXIT_BOUND_SECONDS} s of SIGTERM")
    took = time.monotonic() - signalled
    stuck = committing(pg_database, worker_app_name)  # COMMITs still running server-side after the exit
    applied_at_exit = count(db, applied_commands)  # what they hold is not visible yet
    assert returncode == 0
    assert took < STUCK_SECONDS - 5, "it gave up on the stuck applies instead of waiting them out"
    assert stuck >= 1
    # the stuck messages were never acknowledged: they are back in the queue, although their
    # COMMITs complete server-side after the worker left; redelivered, they must be duplicates.
    # A COMMIT holds one write or a batch of them (src/brownout/_worker/batched_delivery.py): count writes, not COMMITs.
    throttle(db, 0)
    assert wait_until(lambda: not backend_pids(pg_database, worker_app_name), timeout=STUCK_SECONDS + 5, interval=0.1)
    committed_after_exit = count(db, applied_commands) - applied_at_exit
    assert committed_after_exit >= stuck
    assert waiting_messages(queue_name) - (backlog.total - count(db, applied_commands)) == committed_after_exit

    drain_and_stop(db, backlog, queue_name, spawn_worker())
    assert_applied_exactly_once(db, backlog, queue_name)
    print(f"SIGTERM with {STUCK_SECONDS:.0f} s applies in flight: exit 0 in {took:.2f} s")
