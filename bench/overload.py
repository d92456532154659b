"""Capacity and overload: how one web process behaves at and past its CPU capacity, Brownout's and the naive one's.

    .venv/bin/python bench/overload.py                          # both mixes, 4 s steps: about 5 minutes
    .venv/bin/python bench/overload.py --mix cached --step-seconds 2

For each mix (`cached`, `uncached`, or `both`), in one run:

1. a throwaway database (the Procfile's release line, then rows seeded in SQL), queue names and Redis key
   prefix; one web process of the reference service started as the Procfile's web line (`brownout web`, one
   uvicorn process, access log off), authentication on with a service key of this run in BROWNOUT_API_KEYS
   (every scope: the load, and /metrics; no per-caller rate limit, one key carrying the whole load), and
   BROWNOUT_CACHE_FRESH_SECONDS=3600 so the cached mix stays fresh. No worker: the database is healthy and
   writes are applied at once.
2. its capacity: the highest open-loop rate served with p99 under 100 ms (every request counted, 99 % 2xx),
   doubling from --start-rate (halving if it fails) until a step fails, then --bisections
   bisections; a failed step is run once more before it counts.
   - cached mix: GET /notifications/{id} of 400 notifications read once beforehand (fresh in Redis);
   - uncached mix: of every 5 requests 1 POST /notifications (with an Idempotency-Key), 2 GET
     /notifications/{id} and 2 GET /users/{id}/notifications?limit=20, each read naming a notification or a
     user no request of the run has read before (its cache entry missing; a user has 3 notifications).
3. 0.5x, 1x, 2x and 3x that capacity, to Brownout, then to the naive service (bench/chaoskit/naive_app.py,
   plain SQLAlchemy, no cache) at the same absolute rates. Per step: offered rate, goodput (2xx per second,
   stale reads included), p50/p99 of admitted requests (all but 503 {"detail": "overloaded"}), answers by
   kind (2xx, shed = 503 overloaded, other 503, other 5xx, client timeout, connection error), the share
   answered within 1 s, breaker transitions (brownout_breaker_transitions_total from /metrics), new
   PostgreSQL sessions (pg_stat_database.sessions of the throwaway database, raw) and the web's pool gauges.
4. Brownout's targets, PASS/FAIL: at 2x, goodput >= 90 % of capacity, admitted p99 <= 2 x its value at 0.5x,
   no new database connection beyond 0.5x's count; from 0.5x to 3x, no breaker transition; at 3x, every
   request answered (admitted or shed) within 1 s. Also the 1-minute load average at the start and the end,
   the generator's CPU seconds and loop lag (per step too), and "THIS RUN PROVES NOTHING" when the load
   average at the start was above 1.5, the generator's own loop sent more than 1 % of a step's requests
   over 10 ms late, or the generator used more than 80 % of its core while sending a step.

The web process and the load generator run on different cores (os.sched_setaffinity on each child: the web
process on CPU 0, the generator on CPU 1; PostgreSQL, Redis, RabbitMQ and this process float), so a step
measures the web process and not the generator's share of the machine. On a machine with one core nothing
is pinned, and the header says so.

The load generator (bench/overloadkit/generator.py) is a child process per step, built as
bench/readkit/load.py is (uvloop, raw keep-alive connections as asyncio protocols, each request's bytes
built before the step): open loop, latency from each request's scheduled time, at most --connections
connections. A request that finds them all busy waits for one: counted as sent late (its wait is in its
latency), never dropped; that wait is the server's backlog seen through a client pool and is reported apart
from the generator's own lag.
Records of each step go to --out (default bench/out/overload-<time>/). DATABASE_URL, RABBITMQ_URL and
REDIS_URL default to the local set-up; every address must be 127.0.0.1. The exit status is 0 when every
target is met on a run that counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/overload.py`: bench.* and app importable
    sys.path.insert(0, str(ROOT))

MULTIPLES = (("0.5x", 0.5), ("1x", 1.0), ("2x", 2.0), ("3x", 3.0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", choices=("cached", "uncached", "both"), default="both")
    parser.add_argument("--step-seconds", type=float, default=4.0, help="seconds of load per step (default 4)")
    parser.add_argument("--start-rate", type=float, default=100.0, help="first rate of the capacity search, per second")
    parser.add_argument("--bisections", type=int, default=2, help="bisections after the doubling (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="the generator's connections (default 64)")
    parser.add_argument("--timeout", type=float, default=2.0, help="client timeout from the scheduled time, s (default 2)")
    parser.add_argument("--no-naive", action="store_true", help="measure Brownout only")
    parser.add_argument("--out", type=Path, help="records folder (default bench/out/overload-<time>)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of Brownout's web process for this run (repeatable), e.g. BROWNOUT_ADMISSION=false",
    )
    return parser.parse_args(argv)


def git_state() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = [line for line in git("status", "--porcelain", "--", "src", "app").splitlines() if line]
    return git("rev-parse", "--short", "HEAD") + (f" + {len(changed)} uncommitted file(s) in src/ and app/" if changed else "")


def pool_text(pool: dict[str, float]) -> str:
    return "/".join(f"{pool.get(key, 0):.0f}" for key in ("size", "checked_out", "overflow"))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so the stage is removed on SIGTERM too


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from sqlalchemy.engine import make_url

    from bench.overloadkit.mixes import LIST_USERS, MIX_TEXT, UNCACHED_ITEMS
    from bench.overloadkit.report import LEGEND, table, validity, verdicts
    from bench.overloadkit.stage import Stage
    from bench.overloadkit.steps import StepResult, StepRunner

    started = time.monotonic()
    load_start = os.getloadavg()[0]
    out_dir = args.out or ROOT / "bench" / "out" / f"overload-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"overload: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC, code {git_state()}")
    print(f"  load average (1 min) at the start: {load_start:.2f}; {os.cpu_count()} cores; records in {out_dir}")
    print(f"  steps of {args.step_seconds:g} s, {args.connections} connections, client timeout {args.timeout:g} s")
    print("  the naive service is offered the same absolute rates as Brownout's multiples of its own capacity")
    pinned = {0, 1} <= os.sched_getaffinity(0)
    web_cpu, generator_cpu = (0, 1) if pinned else (None, None)
    if pinned:
        print(
            "  web process pinned to CPU 0, load generator to CPU 1 (os.sched_setaffinity); "
            "PostgreSQL, Redis, RabbitMQ and this process float"
        )
    else:
        print(f"  nothing pinned (CPUs {sorted(os.sched_getaffinity(0))}): the generator and the web process share them")
    mixes = ("cached", "uncached") if args.mix == "both" else (args.mix,)
    settings = dict(item.split("=", 1) for item in args.set)
    if settings:
        print("  Brownout's web process with " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    stage = Stage(out_dir, settings=settings, web_cpu=web_cpu)
    print(f"  PostgreSQL: {make_url(stage.base_db).render_as_string(hide_password=True)} (the run's database: {stage.dbname})")
    runner = StepRunner(
        stage,
        seconds=args.step_seconds,
        timeout=args.timeout,
        connections=args.connections,
        echo=print,
        generator_cpu=generator_cpu,
    )
    results: list[tuple[str, float, list[StepResult], list[StepResult], list[StepResult]]] = []
    try:
        stage.create_database()
        for mix in mixes:
            print(f"\n{mix} mix: {MIX_TEXT[mix]}")
            url = stage.start_web("brownout")
            if mix == "cached":
                stage.warm_cache(url)
            runner.run("brownout", url, mix, args.start_rate / 2, "warm")  # its pool's connections, before the ramp
            capacity, ramp = runner.capacity("brownout", url, mix, args.start_rate, args.bisections)
            if not capacity:
                print("  Brownout served no rate tried, down to 5/s: nothing to measure on this machine now")
                return 1
            print(f"  capacity: {capacity:.0f}/s")
            brownout = [runner.run("brownout", url, mix, capacity * m, label) for label, m in MULTIPLES]
            naive: list[StepResult] = []
            if not args.no_naive:
                url = stage.start_web("naive")
                runner.run("naive", url, mix, capacity * 0.25, "warm")  # its pool and connections, as the ramp did Brownout's
                naive = [runner.run("naive", url, mix, capacity * m, label) for label, m in MULTIPLES]
            stage.stop_web()
            results.append((mix, capacity, ramp, brownout, naive))
    finally:
        stage.close()

    print(f"\n{LEGEND}")
    every_target = True
    for mix, capacity, ramp, brownout, naive in results:
        print(f"\n{mix} mix ({MIX_TEXT[mix]}): Brownout's capacity {capacity:.0f}/s (p99 < 100 ms)")
        tried = ", ".join(f"{s.rate:.0f} {'ok' if s.serves else f'p99 {s.p99_all:.0f} ms'}" for s in ramp)
        print(f"  the search, per step (rate/s, then ok or its p99 of all requests): {tried}")
        table("Brownout, one web process:", brownout, print)
        if naive:
            table("naive service, one web process, the same rates:", naive, print)
        print("  Brownout per request kind (p50/p99 from the scheduled time):")
        for step in brownout[1:]:
            print(f"  {step.label}: " + "; ".join(f"{kind} {text}" for kind, text in sorted(step.by_kind.items())))
        print("  after each step, Brownout's pool (size/checked out/overflow) and the database's backends in brackets:")
        print("  " + ", ".join(f"{s.label} {pool_text(s.pool)} ({s.backends})" for s in brownout))
        print("Brownout's targets:")
        every_target = verdicts(capacity, {s.label: s for s in brownout}, print) and every_target
    load_end = os.getloadavg()[0]
    every_step = [step for _, _, ramp, brownout, naive in results for step in ramp + brownout + naive]
    elapsed = time.monotonic() - started
    print(f"\nload average (1 min): {load_start:.2f} at the start, {load_end:.2f} at the end; run {elapsed:.0f} s")
    print(f"generator CPU: {runner.cpu_seconds:.1f} s over {runner.count} steps of {args.step_seconds:g} s")
    if every_step:
        busiest = max(every_step, key=lambda s: s.core_share)
        laggiest = max(every_step, key=lambda s: s.lag_p99)
        print(
            f"  busiest step: {busiest.service} {busiest.mix} {busiest.label} at {busiest.rate:.0f}/s, "
            f"{busiest.cpu_seconds:.2f} s, {busiest.core_share:.0%} of its core (CPUs {list(busiest.generator_cpus)}); "
            f"its loop lag p99 at worst {laggiest.lag_p99:.1f} ms ({laggiest.service} {laggiest.mix} {laggiest.label})"
        )
    if not any(step.counts["shed"] for _, _, _, brownout, _ in results for step in brownout):
        print("no request was answered 503 overloaded: this code has no admission control, or it never refused")
    if runner.item_cursor > UNCACHED_ITEMS or runner.list_cursor > LIST_USERS:
        print("the uncached mix ran out of unread rows and read some twice: a few of its reads may have been cache hits")
    counts = validity(load_start, every_step, print)
    return 0 if counts and every_target else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("overload: interrupted; the web process, database, queues and Redis keys it made are removed", file=sys.stderr)
        sys.exit(130)
