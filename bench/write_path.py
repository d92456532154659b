"""What a write costs: `python bench/write_path.py` (see README).

Prints, in one run, against the local services (or DATABASE_URL / RABBITMQ_URL):
- the 1-minute load average at the start and at the end; a run that starts
  above 1.5 is flagged (on this shared machine its figures prove nothing);
- `submit` latency p50/p99 with the breaker open (validate, stamp, publish to
  RabbitMQ and wait for the confirm), beside a bare confirmed persistent
  publish with pika (BlockingConnection, confirm_delivery, delivery_mode=2,
  mandatory, as the service's publisher sends) of a body the size of a queued
  command, to a queue declared with the service's arguments and type
  (queue_declarations), the same number of messages, one at a time; and
  `queued submit p99 ratio` = submit p99 / bare p99 (target <= 1.5);
- applied writes/s on the direct path (breaker closed: BEGIN and the effect in
  one round trip, the record and COMMIT in another), beside PostgreSQL's own single-row INSERT + COMMIT rate
  through psycopg2 (blocking, as it comes), and `direct write ratio` =
  direct / raw (target >= 0.5); also the raw rate with every wait going
  through the wait callback the engine installs process-wide, for reference,
  and the very statements one direct write sends (captured from the engine)
  replayed through psycopg2 with fresh ids: PostgreSQL's own cost of the rows
  a direct write must write, so `direct / its statements raw` is the share of
  the time that is not Brownout's own;
- the worker's drain rate for a backlog queued while the breaker was open
  (the production worker, middleware included, in this process, 8 threads),
  beside Dramatiq's own no-op consume rate on the same broker and threads
  (target: at least 50 % of it);
- with `--worker-processes N`, also the drain of the same backlog by the
  worker dyno itself (`brownout worker`, BROWNOUT_WORKER_PROCESSES=N,
  metrics on), timed from its first applied write to its last, as counted in
  applied_commands (the processes' start-up is left out), beside the same
  one-process no-op rate.

Each comparison (submit and bare publish; direct and the raw rates) runs
interleaved in `--rounds` blocks, the side that goes first rotating, after a
few untimed warm-up calls of each, so that the machine's load drifting during
the run weighs on both sides of a ratio alike.

It works in a throwaway database and throwaway queues, all removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pika
import psycopg2
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/write_path.py`: the reference service (app/) and bench/ importable
    sys.path.insert(0, str(ROOT))

from app.dispatch.notifications import CREATE, build_registry  # noqa: E402
from app.schema import upgrade_database  # noqa: E402
from bench.chaoskit.processes import procfile  # noqa: E402
from brownout._db import Database  # noqa: E402
from brownout._db.pipelined import PipelinedConnection  # noqa: E402
from brownout._dispatch.dispatcher import Applied, Dispatcher, Queued  # noqa: E402
from brownout._dispatch.queues import BrownoutRabbitmqBroker, queue_declarations  # noqa: E402
from brownout._schema import applied_commands  # noqa: E402
from brownout._settings import Settings, load_settings  # noqa: E402

LOCAL_DB = "postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require"
LOCAL_RABBIT = "amqp://guest:guest@127.0.0.1:5672/%2F"
NOTE = {"user_id": 1, "email": "bench@example.com", "subject": "bench", "body": "x" * 200}


def plain_url(url: str, dbname: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if dbname is not None:
        parsed = parsed.set(database=dbname)
    return parsed.render_as_string(hide_password=False)


def admin(url: str, statement: str) -> None:
    conn = psycopg2.connect(plain_url(url, "postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(statement)
    conn.close()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


LOAD_LIMIT = 1.5  # 1-minute load average above which this machine's figures prove nothing
WARM_UP = 20  # untimed calls of each side before a comparison


def load_average() -> float:
    return os.getloadavg()[0]


def blocks(count: int, rounds: int) -> list[int]:
    """*count* split into *rounds* blocks (the first ones one larger), none empty."""
    rounds = max(1, min(rounds, count))
    return [count // rounds + (1 if index < count % rounds else 0) for index in range(rounds)]


def interleaved(runners: list[Callable[[int], None]], count: int, rounds: int) -> None:
    """Run *count* calls of each runner in blocks, one block of each per round, the one that starts
    rotating every round."""
    for index, size in enumerate(blocks(count, rounds)):
        start = index % len(runners)
        for run in runners[start:] + runners[:start]:
            run(size)


class RawInserts:
    """PostgreSQL's own single-row INSERT + COMMIT through psycopg2, on a table of its own.

    *blocking*: psycopg2 as it comes, libpq waiting in C (the baseline). Otherwise every wait goes through
    the wait callback the engine installs process-wide (brownout._db.waiting), as the direct path's do."""

    def __init__(self, url: str, table: str, *, blocking: bool) -> None:
        self.table = table
        self.blocking = blocking
        with self.waits():
            self.conn = psycopg2.connect(url)
            with self.conn.cursor() as cur:
                cur.execute(f"CREATE TABLE {table} (id uuid PRIMARY KEY, body text)")
            self.conn.commit()
        self.elapsed = 0.0
        self.count = 0

    @contextlib.contextmanager
    def waits(self) -> Iterator[None]:
        installed = psycopg2.extensions.get_wait_callback()
        if self.blocking:
            psycopg2.extensions.set_wait_callback(None)
        try:
            yield
        finally:
            psycopg2.extensions.set_wait_callback(installed)

    def run(self, count: int, *, timed: bool = True) -> None:
        statement = f"INSERT INTO {self.table} VALUES (%s, %s)"  # noqa: S608 - the bench's own table name
        with self.waits():
            start = time.perf_counter()
            with self.conn.cursor() as cur:
                for _ in range(count):
                    cur.execute(statement, (str(uuid.uuid4()), NOTE["body"]))
                    self.conn.commit()
            elapsed = time.perf_counter() - start
        if timed:
            self.elapsed += elapsed
            self.count += count

    def rate(self) -> float:
        return self.count / self.elapsed

    def close(self) -> None:
        self.conn.close()


class SameRowsRaw:
    """The very statements one direct write sends (captured from the engine, in order), replayed through
    psycopg2 with fresh ids and no Python of Brownout's around them, on the same kind of connection (the
    BEGIN rides on the first statement, the COMMIT on the last: the same round trips as the direct write).

    The single-row INSERT is the issue's peer; this one says how much of the gap is PostgreSQL's work on
    the rows a direct write must write (the effect, its email, its record) and how much is ours."""

    _FRESH = {"id", "notification_id", "command_id"}

    def __init__(self, url: str, database: Database, dispatcher: Dispatcher) -> None:
        captured: list[tuple[str, dict[str, Any]]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
            captured.append((statement, dict(parameters)))

        event.listen(database.engine, "before_cursor_execute", capture)
        try:
            direct_submit(dispatcher)
        finally:
            event.remove(database.engine, "before_cursor_execute", capture)
        self.statements = captured
        self.conn = psycopg2.connect(url, connection_factory=PipelinedConnection)
        self.elapsed = 0.0
        self.count = 0

    def _fresh(self, parameters: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
        fresh = dict(parameters)
        for name in self._FRESH & parameters.keys():
            old = parameters[name]
            new = ids.setdefault(str(old), uuid.uuid4())
            fresh[name] = new if isinstance(old, uuid.UUID) else str(new)
        return fresh

    def run(self, count: int, *, timed: bool = True) -> None:
        start = time.perf_counter()
        with self.conn.cursor() as cur:
            for _ in range(count):
                ids: dict[str, Any] = {}
                for statement, parameters in self.statements:
                    cur.execute(statement, self._fresh(parameters, ids))
                self.conn.commit()  # sends nothing when the last statement carried the COMMIT
        if timed:
            self.elapsed += time.perf_counter() - start
            self.count += count

    def rate(self) -> float:
        return self.count / self.elapsed

    def close(self) -> None:
        self.conn.close()


class BarePublisher:
    """A bare confirmed persistent publish with pika, as the service's publisher sends one: BlockingConnection,
    confirm_delivery, delivery_mode=2, mandatory, default exchange, to a queue declared exactly as the service
    declares its own (`queue_declarations`: type, x-max-length, overflow, dead-lettering), with a fixed body
    of *body_size* bytes. `basic_publish` returns once RabbitMQ acknowledged the message (raises on a nack or
    a return)."""

    def __init__(self, settings: Settings, queue: str, body_size: int) -> None:
        assert settings.rabbitmq_url is not None
        self.queue = queue
        self.body = b"x" * body_size
        self.properties = pika.BasicProperties(delivery_mode=2)
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        for declaration in queue_declarations(
            queue,
            max_length=settings.queue_max_length,
            queue_type=settings.queue_type,
            delivery_limit=settings.queue_delivery_limit,
        ):
            self.channel.queue_declare(queue=declaration.name, durable=declaration.durable, arguments=declaration.arguments)

    def publish(self) -> None:
        self.channel.basic_publish(
            exchange="", routing_key=self.queue, body=self.body, properties=self.properties, mandatory=True
        )

    def close(self) -> None:
        self.connection.close()


def timed_calls(call: Callable[[], object], samples: list[float]) -> Callable[[int], None]:
    """A block runner for `interleaved`: *count* sequential calls, each one's milliseconds appended to *samples*."""

    def run(count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1000)

    return run


def queued_submit(dispatcher: Dispatcher) -> None:
    outcome = dispatcher.submit(CREATE, NOTE, idempotency_key=uuid.uuid4().hex)
    assert isinstance(outcome, Queued), outcome


def direct_submit(dispatcher: Dispatcher) -> None:
    outcome = dispatcher.submit(CREATE, NOTE, idempotency_key=uuid.uuid4().hex)
    assert isinstance(outcome, Applied), outcome


def queued_message_size(dispatcher: Dispatcher, queue: str) -> int:
    """Bytes of the body the service publishes for the bench's create (an envelope in a Dramatiq message)."""
    return len(dispatcher.accept(CREATE, NOTE, idempotency_key=uuid.uuid4().hex).to_message(queue).encode())


def compare_queued(settings: Settings, database: Database, dispatcher: Dispatcher, count: int, rounds: int) -> dict[str, Any]:
    """Submit latency with the breaker open beside the bare publish, interleaved; milliseconds."""
    bare_queue = f"{settings.queue_name}-bare"
    size = queued_message_size(dispatcher, settings.queue_name)
    bare = BarePublisher(settings, bare_queue, size)
    submits: list[float] = []
    publishes: list[float] = []
    database.breaker.force_open()
    try:
        timed_calls(lambda: queued_submit(dispatcher), [])(WARM_UP)
        timed_calls(bare.publish, [])(WARM_UP)
        interleaved(
            [timed_calls(lambda: queued_submit(dispatcher), submits), timed_calls(bare.publish, publishes)], count, rounds
        )
    finally:
        database.breaker.reset()
        bare.close()
        delete_queues(settings, bare_queue)
    return {
        "size": size,
        "submit": (statistics.median(submits), percentile(submits, 0.99)),
        "bare": (statistics.median(publishes), percentile(publishes, 0.99)),
    }


def compare_direct(settings: Settings, database: Database, dispatcher: Dispatcher, count: int, rounds: int) -> dict[str, float]:
    """Applied writes/s on the direct path beside raw INSERT + COMMIT/s (blocking psycopg2, and under the
    engine's wait callback) and the direct write's own statements replayed raw, interleaved."""
    url = plain_url(settings.database_url)
    raw = RawInserts(url, "bench_raw", blocking=True)
    raw_waits = RawInserts(url, "bench_raw_waits", blocking=False)
    same_rows = SameRowsRaw(plain_url(settings.database_url), database, dispatcher)
    elapsed = 0.0

    def direct(block: int) -> None:
        nonlocal elapsed
        start = time.perf_counter()
        for _ in range(block):
            direct_submit(dispatcher)
        elapsed += time.perf_counter() - start

    try:
        for _ in range(50):  # warm the pool
            direct_submit(dispatcher)
        raw.run(WARM_UP, timed=False)
        raw_waits.run(WARM_UP, timed=False)
        same_rows.run(WARM_UP, timed=False)
        interleaved([direct, raw.run, raw_waits.run, same_rows.run], count, rounds)
        return {"direct": count / elapsed, "raw": raw.rate(), "raw_waits": raw_waits.rate(), "same_rows": same_rows.rate()}
    finally:
        raw.close()
        raw_waits.close()
        same_rows.close()


def queue_backlog(settings: Settings, database: Database, backlog: int) -> None:
    """Submit *backlog* creates to *settings*' queue with the breaker open (all queued)."""
    dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
    try:
        database.breaker.force_open()
        for _ in range(backlog):
            assert isinstance(dispatcher.submit(CREATE, NOTE, idempotency_key=uuid.uuid4().hex), Queued)
        database.breaker.reset()
    finally:
        dispatcher.close()


def drain_rate(settings: Settings, database: Database, backlog: int) -> float:
    """Queue *backlog* creates with the breaker open, then time the production worker draining them."""
    from brownout._worker.assembly import build_worker_broker

    queue = f"{settings.queue_name}-drain"
    drain_settings = settings.model_copy(update={"queue_name": queue})
    queue_backlog(drain_settings, database, backlog)
    worker_database = Database.from_settings(drain_settings)
    broker = build_worker_broker(drain_settings, worker_database, registry=build_registry())
    before = applied_count(database)
    worker = dramatiq.Worker(broker, queues={queue}, worker_threads=8, worker_timeout=100)
    start = time.perf_counter()
    worker.start()
    try:
        while applied_count(database) - before < backlog:
            time.sleep(0.05)
        return backlog / (time.perf_counter() - start)
    finally:
        worker.stop(timeout=10_000)
        broker.close()
        worker_database.close()
        delete_queues(settings, queue)


def dyno_drain_rate(settings: Settings, database: Database, backlog: int, processes: int) -> float:
    """Queue *backlog* creates, then time `brownout worker` with *processes* processes draining
    them: from the first write applied to the last (its processes' start-up is not counted)."""
    queue = f"{settings.queue_name}-dyno"
    dyno_settings = settings.model_copy(update={"queue_name": queue, "email_queue_name": f"{queue}-email"})
    queue_backlog(dyno_settings, database, backlog)
    before = applied_count(database)
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {
        "DATABASE_URL": dyno_settings.database_url,
        "RABBITMQ_URL": dyno_settings.rabbitmq_url or LOCAL_RABBIT,
        "BROWNOUT_QUEUE_NAME": queue,
        "BROWNOUT_EMAIL_QUEUE_NAME": dyno_settings.email_queue_name,
        "BROWNOUT_QUEUE_MAX_LENGTH": str(dyno_settings.queue_max_length),  # declared as the publisher did
        "BROWNOUT_WORKER_PROCESSES": str(processes),
        "BROWNOUT_METRICS_PORT": str(free_port()),
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = tempfile.TemporaryFile("w+")  # Dramatiq logs at INFO: kept out of the figures, shown if it fails
    dyno = subprocess.Popen(procfile()["worker"], env=env, cwd=root, stdout=output, stderr=subprocess.STDOUT)

    def failed(what: str) -> RuntimeError:
        output.seek(0)
        return RuntimeError(f"the worker dyno {what}:\n{output.read()[-4000:]}")

    try:
        give_up = time.monotonic() + 120
        while (first := applied_count(database) - before) == 0:
            if dyno.poll() is not None or time.monotonic() > give_up:
                raise failed(f"applied nothing (exit code {dyno.poll()})")
            time.sleep(0.01)
        start = time.perf_counter()
        while applied_count(database) - before < backlog:
            if dyno.poll() is not None:
                raise failed(f"exited with {dyno.returncode}")
            time.sleep(0.05)
        return (backlog - first) / (time.perf_counter() - start)
    finally:
        output.close()
        dyno.send_signal(signal.SIGTERM)  # its graceful shutdown, as Railway's deploy does
        try:
            dyno.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dyno.kill()
            dyno.wait()
        delete_queues(settings, queue)
        delete_queues(settings, dyno_settings.email_queue_name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def noop_consume_rate(settings: Settings, count: int) -> float:
    """Dramatiq's own ceiling here: the same broker class and threads, an actor that does nothing."""
    queue = f"{settings.queue_name}-noop"
    broker = BrownoutRabbitmqBroker(url=settings.rabbitmq_url, max_length=max(count * 2, 1000))
    done = threading.Semaphore(0)

    def noop(index: int) -> None:
        done.release()

    actor = dramatiq.actor(broker=broker, actor_name="noop", queue_name=queue)(noop)
    for index in range(count):
        actor.send(index)
    worker = dramatiq.Worker(broker, queues={queue}, worker_threads=8, worker_timeout=100)
    start = time.perf_counter()
    worker.start()
    try:
        for _ in range(count):
            done.acquire()
        return count / (time.perf_counter() - start)
    finally:
        worker.stop(timeout=10_000)
        broker.close()
        delete_queues(settings, queue)


def applied_count(database: Database) -> int:
    with database.session() as s:
        return int(s.execute(select(func.count()).select_from(applied_commands)).scalar_one())


def delete_queues(settings: Settings, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url or LOCAL_RABBIT))
    channel = connection.channel()
    for declaration in queue_declarations(queue, max_length=1):
        channel.queue_delete(declaration.name)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=2000, help="submits with the breaker open, and as many bare publishes")
    parser.add_argument("--direct", type=int, default=1000, help="submits applied directly, and as many raw INSERT + COMMIT")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved blocks per comparison (see above)")
    parser.add_argument("--drain", type=int, default=10_000, help="backlog the worker drains (0: skip)")
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=0,
        metavar="N",
        help="also drain the backlog with `brownout worker` and N processes (0: skip)",
    )
    args = parser.parse_args()
    load_start = load_average()
    print(f"load average (1 min) at start: {load_start:.2f}", flush=True)
    if load_start > LOAD_LIMIT:
        print(f"WARNING: started above {LOAD_LIMIT} load: these figures prove nothing", flush=True)

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    os.environ.setdefault("DATABASE_URL", LOCAL_DB)
    os.environ.setdefault("RABBITMQ_URL", LOCAL_RABBIT)
    base = load_settings()
    dbname = f"bo_bench_{uuid.uuid4().hex[:8]}"
    queue = f"bo-bench-{uuid.uuid4().hex[:8]}"
    admin(base.database_url, f'CREATE DATABASE "{dbname}"')
    settings = load_settings(
        database_url=make_url(base.database_url).set(database=dbname).render_as_string(hide_password=False),
        queue_name=queue,
        queue_max_length=max(10_000, args.queued * 2),
    )
    assert settings.rabbitmq_url is not None
    database: Database | None = None
    dispatcher: Dispatcher | None = None
    try:
        upgrade_database(settings.database_url)
        database = Database.from_settings(settings)
        dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
        queued = compare_queued(settings, database, dispatcher, args.queued, args.rounds)
        direct = compare_direct(settings, database, dispatcher, args.direct, args.rounds)

        (submit_p50, submit_p99), (bare_p50, bare_p99) = queued["submit"], queued["bare"]
        print(f"submit, breaker open (queued, confirm included): p50 {submit_p50:.2f} ms, p99 {submit_p99:.2f} ms")
        print(f"bare pika confirmed persistent publish:          p50 {bare_p50:.2f} ms, p99 {bare_p99:.2f} ms")
        print(f"  each over {args.queued} sequential calls, {queued['size']} B messages, {settings.queue_type} queue")
        print(f"queued submit p50 ratio: {submit_p50 / bare_p50:.2f}")
        print(f"queued submit p99 ratio: {submit_p99 / bare_p99:.2f} (target <= 1.50)")
        print(f"direct path, applied writes/s:                   {direct['direct']:8.0f}")
        print(f"PostgreSQL single-row INSERT + COMMIT/s (raw):   {direct['raw']:8.0f}")
        print(f"  the same under the engine's wait callback:     {direct['raw_waits']:8.0f}")
        print(f"direct write ratio: {direct['direct'] / direct['raw']:.2f} (target >= 0.50)")
        print(f"the direct write's own statements replayed raw/s: {direct['same_rows']:8.0f}")
        print(f"  direct / its statements raw: {direct['direct'] / direct['same_rows']:.2f} (what is Brownout's own cost)")
        if args.drain:
            dispatcher.close()
            dispatcher = None
            drained = drain_rate(settings, database, args.drain)
            noop = noop_consume_rate(settings, args.drain)
            print(f"worker drain, {args.drain} queued writes, 8 threads:  {drained:8.0f} writes/s")
            print(f"Dramatiq no-op consume, same broker and threads: {noop:8.0f} msgs/s")
            print(f"ratio drain/no-op: {drained / noop:.2f} (target >= 0.50)")
            if args.worker_processes:
                n = args.worker_processes
                dyno = dyno_drain_rate(settings, database, args.drain, n)
                print(f"worker dyno drain (brownout worker), {n} process(es) of 8 threads: {dyno:8.0f} writes/s")
                print(f"  per process: {dyno / n:8.0f} writes/s, ratio {dyno / n / noop:.2f} of the no-op above")
                print(f"ratio {n}-process dyno drain / 1-process no-op: {dyno / noop:.2f}")
    finally:
        if dispatcher is not None:
            dispatcher.close()
        if database is not None:
            database.close()
        admin(base.database_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        delete_queues(base, queue)
        load_end = load_average()
        print(f"load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end")
        if load_start > LOAD_LIMIT:
            print(f"WARNING: started above {LOAD_LIMIT} load: these figures prove nothing")


if __name__ == "__main__":
    main()
