"""A fleet in an outage, local versus shared breakers: `.venv/bin/python bench/fleet_breaker.py`.

    .venv/bin/python bench/fleet_breaker.py                       # 8 processes, 20 calls/s each, 30 s outage
    .venv/bin/python bench/fleet_breaker.py --outage-seconds 10 --modes local,redis

N processes (multiprocessing "spawn"; engine, breaker and health monitor built by
src/brownout/_fleet/assembly.py as the web's are) call `execute_with_retry(session, SELECT 1,
deadline=0.3)` at a steady, open-loop rate, like a request path, to PostgreSQL
through this process's FaultProxy: warm-up (3 s, and until every breaker is CLOSED),
outage (new and open connections reset), recovery (pass-through, until all CLOSED, or 90 s).
Run with BROWNOUT_BREAKER_BACKEND=local, then =redis; the default settings otherwise
(threshold 5, open 60 s, success 2, 4 retries, health check every 30 s, 1 s while not CLOSED).

Counted over the outage window, fleet-wide: (a) attempts of the load that reached
the database (a CallObserver in each process), (b) connections the proxy accepted
(health probes and pre-pings included), (c) calls the breaker refused; and the
times until every process's breaker was OPEN, and from the database's return
until every one was CLOSED, and how long the news of the opening takes to reach each other process.
Targets: (a) at most the threshold + 2 with the shared breaker (each process that failed has at most one
call in flight until the fleet opens), and at least 8 times fewer than with local breakers.
DATABASE_URL / REDIS_URL default to the local set-up; a throwaway database and
Redis key prefix are used and removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2
import redis
from sqlalchemy import text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/fleet_breaker.py`: tests.support importable
    sys.path.insert(0, str(ROOT))

from brownout._db import CircuitOpenError, execute_with_retry  # noqa: E402
from brownout._db.circuit_breaker import BreakerListener, BreakerState, CircuitBreaker  # noqa: E402
from brownout._db.errors import ErrorKind  # noqa: E402
from brownout._db.retry import CallObserver  # noqa: E402
from brownout._fleet.assembly import build_database, build_monitor, stop_breaker  # noqa: E402
from brownout._settings import Settings  # noqa: E402
from tests.support.tcp_proxy import FaultProxy  # noqa: E402

LOCAL_DB = "postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
WARMUP_SECONDS, RECOVERY_LIMIT_SECONDS = 3.0, 90.0
DEFAULTS: dict[str, Any] = {
    "breaker_failure_threshold": 5,
    "breaker_open_seconds": 60.0,
    "breaker_success_threshold": 2,
    "retry_max_retries": 4,
    "health_interval_seconds": 30.0,
    "breaker_probe_interval_seconds": 1.0,
}
Events = list[tuple[float, Any]]  # (time.monotonic(), what): CLOCK_MONOTONIC is system-wide on Linux


class Recorder(CallObserver, BreakerListener):
    """One process's log: attempts that reached the database, calls, transitions, health checks."""

    def __init__(self) -> None:
        self.attempts: Events = []
        self.retries: Events = []  # (when the retry was decided, its wait)
        self.calls: Events = []
        self.transitions: Events = []
        self.probes: Events = []
        self.modes: Events = []

    def on_attempt(self, seconds: float, kind: ErrorKind | None) -> None:
        self.attempts.append((time.monotonic(), kind is None))

    def on_retry(self, kind: ErrorKind, wait: float) -> None:
        self.retries.append((time.monotonic(), wait))

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        self.transitions.append((time.monotonic(), new.value))

    def on_mode(self, breaker: CircuitBreaker, shared: bool) -> None:  # SharedBreaker: Redis lost (False) or back
        self.modes.append((time.monotonic(), shared))

    def on_health(self, result: dict[str, Any]) -> None:
        self.probes.append((time.monotonic(), bool(result["healthy"])))


def member(fields: dict[str, Any], commands: Any, results: Any) -> None:
    """A fleet member's process: builds its database, then serves commands (start, state, stop)."""
    logging.basicConfig(level=logging.ERROR)
    settings = Settings(**fields)
    database = build_database(settings)
    record = Recorder()
    database.resilience.observers.append(record)
    database.breaker.add_listener(record)
    monitor = build_monitor(settings, database, on_result=[record.on_health]).start()
    select_one = text("SELECT 1")
    stop = threading.Event()
    executor = ThreadPoolExecutor(max_workers=32)  # open loop: a slow call does not delay the next

    def call(deadline: float) -> None:
        started = time.monotonic()
        with database.session() as session:
            try:
                execute_with_retry(session, lambda: session.execute(select_one).scalar_one(), deadline=deadline)
                outcome = "ok"
            except CircuitOpenError as exc:  # refused outright, or after attempts that opened it
                outcome = "refused" if exc.__cause__ is None else "failed"
            except Exception:
                outcome = "failed"
        record.calls.append((started, outcome))

    def load(rate: float, deadline: float) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            executor.submit(call, deadline)
            next_at += 1 / rate
            stop.wait(max(0.0, next_at - time.monotonic()))

    loader: threading.Thread | None = None
    try:
        while (command := commands.get()) is not None:
            op, args = command
            if op == "start":
                loader = threading.Thread(target=load, args=args, daemon=True)
                loader.start()
                results.put(None)
            elif op == "state":
                results.put((database.breaker.state.value, bool(getattr(database.breaker, "shared", False))))
            elif op == "stop":
                stop.set()
                if loader is not None:
                    loader.join()
                executor.shutdown(wait=True)
                results.put(vars(record))
    finally:
        monitor.stop()
        stop_breaker(database.breaker)
        database.close()


def admin(url: str, statement: str) -> None:
    conn = psycopg2.connect(make_url(url).set(drivername="postgresql", database="postgres").render_as_string(False))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(statement)
    conn.close()


def total(logs: list[dict[str, Events]], key: str, lo: float, hi: float, what: Any = None) -> int:
    return sum(1 for log in logs for at, value in log[key] if lo <= at < hi and (what is None or value == what))


def first_attempts(logs: list[dict[str, Events]], lo: float, hi: float) -> str:
    """Milliseconds after the outage's start of each load attempt that reached the database, fleet-wide."""
    times = sorted(at for log in logs for at, _ in log["attempts"] if lo <= at < hi)
    return " ".join(f"{(at - lo) * 1000:.0f}" for at in times[:12]) or "-"


def opening_news(logs: list[dict[str, Events]], since: float) -> list[float]:
    """Milliseconds from the fleet's opening (the first process's OPEN) to each other process's first OPEN."""
    firsts = [min((at for at, value in log["transitions"] if at >= since and value == "open"), default=None) for log in logs]
    seen = sorted(at for at in firsts if at is not None)
    return [(at - seen[0]) * 1000 for at in seen[1:]] if seen else []


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fleet_wide(logs: list[dict[str, Events]], state: str, since: float, last: bool = False) -> float | None:
    """Seconds from *since* until every process reached *state* (its first, or *last*, entry); None: one never did."""
    times = [[at for at, value in log["transitions"] if at >= since and value == state] for log in logs]
    if not all(times):
        return None
    return max(max(each) if last else min(each) for each in times) - since


def run(mode: str, args: argparse.Namespace, url: str, redis_url: str, prefix: str, proxy: FaultProxy) -> dict[str, Any]:
    overrides: dict[str, Any] = {"redis_url": redis_url, "redis_key_prefix": prefix, "breaker_backend": mode}
    settings = Settings(database_url=url, **overrides, **DEFAULTS)
    fields = {name: getattr(settings, name) for name in type(settings).model_fields}
    context = mp.get_context("spawn")
    queues = [(context.Queue(), context.Queue()) for _ in range(args.processes)]
    processes = [context.Process(target=member, args=(fields, *pair), daemon=True) for pair in queues]
    for process in processes:
        process.start()

    def ask(op: str, *params: Any, timeout: float = 120) -> list[Any]:
        for commands, _ in queues:
            commands.put((op, params))
        return [answers.get(timeout=timeout) for _, answers in queues]

    def settle(limit: float) -> bool:  # every member's breaker CLOSED (True), or *limit* seconds passed
        give_up = time.monotonic() + limit
        while not (closed := all(state == "closed" for state, _ in ask("state"))) and time.monotonic() < give_up:
            time.sleep(0.2)
        return closed

    try:
        ask("start", args.rate, 0.3)  # each answers once it is built
        time.sleep(WARMUP_SECONDS)
        settle(RECOVERY_LIMIT_SECONDS)  # a fleet slowed down by a busy machine may have opened: start from CLOSED
        accepted, down = proxy.connection_count, time.monotonic()
        proxy.reset()  # every new connection is accepted and reset: a database that is down
        proxy.reset_existing()
        time.sleep(args.outage_seconds)
        accepted, back = proxy.connection_count - accepted, time.monotonic()
        proxy.pass_through()
        recovered = settle(RECOVERY_LIMIT_SECONDS)
        logs = ask("stop")
        for commands, _ in queues:
            commands.put(None)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    return {
        "attempts": total(logs, "attempts", down, back),
        "attempts_ok": total(logs, "attempts", down, back, True),
        "retries": total(logs, "retries", down, back),
        "first_attempts": first_attempts(logs, down, back),
        "accepted": accepted,
        "probes": total(logs, "probes", down, back),
        "refused": total(logs, "calls", down, back, "refused"),
        "failed": total(logs, "calls", down, back, "failed"),
        "calls": total(logs, "calls", down, back),
        "warmup_failed": total(logs, "attempts", 0, down, False),
        "open_all": fleet_wide(logs, "open", down),
        "news_p50_ms": percentile(opening_news(logs, down), 0.5),
        "news_p99_ms": percentile(opening_news(logs, down), 0.99),
        "closed_all": fleet_wide(logs, "closed", back, last=True) if recovered else None,
        "recovery_attempts": total(logs, "attempts", back, float("inf")),
        "recovery_refused": total(logs, "calls", back, float("inf"), "refused"),
        "fallbacks": total(logs, "modes", 0, float("inf"), False),
    }


def show(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    modes = list(results)
    print(
        f"{args.processes} processes x {args.rate:g} calls/s, SELECT 1 through execute_with_retry (deadline 0.3 s), "
        f"{args.outage_seconds:g} s outage (proxy resets every connection); threshold 5, open 60 s, "
        "success 2, 4 retries, health probe every 1 s while not CLOSED"
    )
    ratio = len(modes) == 2 and modes[0] == "local"
    header = "".join(f"{'shared' if mode == 'redis' else mode:>10}" for mode in modes)
    print(f"  {'during the outage, fleet-wide':<52}{header}" + ("  local/shared" if ratio else ""))

    def row(label: str, key: str, with_ratio: bool = False, unit: str = "") -> None:
        cells = []
        for mode in modes:
            value = results[mode][key]
            cells.append(f"{'never':>10}" if value is None else f"{value:>10.1f}" if unit else f"{value:>10}")
        line = f"  {label:<52}" + "".join(cells)
        if ratio and with_ratio:
            local, shared = results["local"][key], results[modes[1]][key]
            line += f"  {local / shared:>12.1f}" if shared else f"  {'inf':>12}"
        print(line)

    row("warm-up: failed attempts (0 unless CPU-starved)", "warmup_failed")
    row("(a) load attempts that reached the database", "attempts", True)
    row("    of which succeeded", "attempts_ok")
    row("    retries decided (execute_with_retry)", "retries")
    row("(b) connections accepted by the proxy", "accepted", True)
    row("    health checks run (all processes)", "probes")
    row("(c) calls refused by the breaker", "refused")
    row("    calls failed (error or deadline, not refused)", "failed")
    row("    calls made", "calls")
    row("seconds from outage start to OPEN in every process", "open_all", unit="s")
    row("ms from the opening to another process's view, p50", "news_p50_ms", unit="ms")
    row("ms from the opening to another process's view, p99", "news_p99_ms", unit="ms")
    row("seconds from the database's return to all CLOSED", "closed_all", unit="s")
    row("after the return: load attempts", "recovery_attempts")
    row("after the return: calls refused", "recovery_refused")
    row("shared breakers fallen back to local (whole run)", "fallbacks")
    for mode in modes:
        label = "shared" if mode == "redis" else mode
        print(f"  {label}: first attempts at ms after the outage began: {results[mode]['first_attempts']}")
    if "redis" in results:
        attempts, bound = results["redis"]["attempts"], DEFAULTS["breaker_failure_threshold"] + 2
        print(f"  target: shared, (a) at most threshold + 2 = {bound}: {attempts}, {'met' if attempts <= bound else 'NOT met'}")
    if ratio:
        shared = results[modes[1]]["attempts"]
        times = results["local"]["attempts"] / shared if shared else float("inf")
        print(f"  target: (a) at least 8 times fewer with the shared breaker: {times:.1f}x, {'met' if times >= 8 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8, help="fleet members (OS processes)")
    parser.add_argument("--rate", type=float, default=20.0, help="calls per second per process")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="how long the database is down")
    parser.add_argument("--modes", default="local,redis", help="breaker backends to run, in order: local,redis")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= {"local", "redis"}:
        parser.error("--modes: a comma-separated list of local and redis")

    base_url = os.environ.get("DATABASE_URL", LOCAL_DB)
    redis_url = os.environ.get("REDIS_URL", LOCAL_REDIS)
    upstream = make_url(base_url)
    tag = uuid.uuid4().hex[:8]
    dbname, prefix = f"bo_bench_fleet_{tag}", f"bo-bench-fleet-{tag}"
    admin(base_url, f'CREATE DATABASE "{dbname}"')
    rds = redis.Redis.from_url(redis_url)
    proxy = FaultProxy(upstream_host=upstream.host or "127.0.0.1", upstream_port=upstream.port or 5432).start()
    results: dict[str, dict[str, Any]] = {}
    try:
        url = upstream.set(host="127.0.0.1", port=proxy.port, database=dbname).render_as_string(hide_password=False)
        for mode in modes:
            results[mode] = run(mode, args, url, redis_url, f"{prefix}-{mode}:", proxy)
            proxy.pass_through()
    finally:
        proxy.stop()
        admin(base_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        for key in rds.scan_iter(match=f"{prefix}*", count=1000):
            rds.delete(key)
        rds.close()
    show(args, results)


if __name__ == "__main__":
    main()
