"""Does the worker yield to the web on a shared machine? `.venv/bin/python bench/worker_yield.py [--rate R] [--writes N]`

One web process of the reference service (the Procfile's web line, as in bench/overload.py's stage) serves
cached reads open loop at --rate requests/s (default 400: below one process's capacity here, so what
moves is the worker's doing) for --seconds; three steps, each from the same state:

- `alone`: no worker;
- `nice 0`: a backlog of --writes queued creations, and `brownout worker` started with the step, at the
  web's priority (BROWNOUT_WORKER_NICE=0);
- `nice 10`: the same backlog, the default priority (the worker leads its own session, as a container's
  first process, so its autogroup is lowered too).

Printed per step: the web's goodput and p50/p99 (from each request's scheduled time), the share answered
within 100 ms, and how many of the backlog's writes the worker applied during the step. The ratio that
matters is the web's p99 beside the worker against `alone`, at nice 0 and at 10, in the same run.
DATABASE_URL, RABBITMQ_URL and REDIS_URL default to the local set-up; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/worker_yield.py`: bench.* and app importable
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=400.0, help="cached reads per second offered (default 400)")
    parser.add_argument("--writes", type=int, default=12000, help="queued creations the worker drains (default 12000)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per step (default 8)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.chaoskit.dynos import Dyno
    from bench.chaoskit.helpers import free_port
    from bench.chaoskit.processes import procfile
    from bench.overloadkit.stage import Stage
    from bench.overloadkit.steps import StepRunner

    out_dir = ROOT / "bench" / "out" / f"worker-yield-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    print(f"worker yield: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC; load average (1 min) {load_start:.2f}")
    print(f"  {args.rate:g} cached reads/s for {args.seconds:g} s per step; backlog {args.writes} queued creations")
    stage = Stage(out_dir)
    runner = StepRunner(stage, seconds=args.seconds, timeout=2.0, connections=64, echo=lambda line: None)
    rows = []
    try:
        stage.create_database()
        url = stage.start_web("brownout")
        stage.warm_cache(url)
        runner.run("brownout", url, "cached", args.rate / 4, "warm")
        for label, nice in (("alone", None), ("nice 0", 0), ("nice 10", 10)):
            worker = None
            before = applied(stage)
            if nice is not None:
                fill_backlog(stage, args.writes, tag=label.replace(" ", ""))
                before = applied(stage)
                env = stage._env() | {"BROWNOUT_METRICS_PORT": str(free_port()), "BROWNOUT_WORKER_NICE": str(nice)}
                worker = Dyno(f"worker-{nice}", procfile()["worker"], env, out_dir, None).start()
            try:
                step = runner.run("brownout", url, "cached", args.rate, label.replace(" ", ""))
            finally:
                drained = applied(stage) - before
                if worker is not None:
                    worker.stop()
                    drain_rest(stage)
            rows.append((label, step, drained))
    finally:
        stage.close()
    alone = rows[0][1].p99 or 1.0
    print(f"  {'step':8} {'goodput/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'p99/alone':>9} {'applied':>8}")
    for label, step, drained in rows:
        print(f"  {label:8} {step.goodput:9.0f} {step.p50:7.1f} {step.p99:7.1f} {step.p99 / alone:9.2f} {drained:8d}")
    print(f"  load average (1 min): {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


def applied(stage: object) -> int:
    from bench.chaoskit.urls import admin_connect

    conn = admin_connect(stage.base_db, stage.dbname)  # type: ignore[attr-defined]
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM notifications")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def fill_backlog(stage: object, count: int, *, tag: str) -> None:
    """*count* creations queued through the service's own dispatcher (8 publishing threads)."""
    from app.dispatch.notifications import CREATE, build_registry
    from bench.overloadkit.stage import KEY_NAME
    from brownout._db import Database
    from brownout._dispatch.dispatcher import Dispatcher, Queued
    from brownout._settings import Settings

    settings = Settings(
        database_url=stage.db_url,  # type: ignore[attr-defined]
        rabbitmq_url=stage.base_rabbit,  # type: ignore[attr-defined]
        queue_name=stage.queue,  # type: ignore[attr-defined]
        auth="disabled",
    )
    database = Database.from_settings(settings)
    dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
    try:

        def one(index: int) -> None:
            payload = {"user_id": f"yield-{tag}-{index % 500}", "email": "y@example.com", "subject": "s", "body": "b"}
            envelope = dispatcher.accept(CREATE, payload, idempotency_key=f"{tag}-{index}", caller=KEY_NAME)
            if not isinstance(dispatcher.enqueue(envelope), Queued):
                raise RuntimeError("a backlog write was not queued")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))
    finally:
        dispatcher.close()
        database.close()


def drain_rest(stage: object) -> None:
    """Purge what the worker left, so each step starts from an empty queue."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(stage.base_rabbit))  # type: ignore[attr-defined]
    try:
        connection.channel().queue_purge(stage.queue)  # type: ignore[attr-defined]
    finally:
        connection.close()
    time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
