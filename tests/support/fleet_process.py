"""A member of the fleet for shared-breaker tests: its own engine and breaker, in its own OS process.

Driven through a command queue (multiprocessing "spawn"), so nothing is shared
with the test or the other members but PostgreSQL (through the test's proxy)
and Redis.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Any


def serve(settings_fields: dict[str, Any], commands: mp.Queue, results: mp.Queue) -> None:  # type: ignore[type-arg]
    from sqlalchemy import text

    from brownout._db import CircuitOpenError, execute_with_retry
    from brownout._db.circuit_breaker import NOT_TRIAL
    from brownout._fleet.assembly import build_database, build_monitor, stop_breaker
    from brownout._settings import Settings

    settings = Settings(**settings_fields)
    database = build_database(settings)
    monitor = build_monitor(settings, database).start()
    breaker = database.breaker

    def call(deadline: float) -> str:
        with database.session() as session:
            try:
                execute_with_retry(session, lambda: session.execute(text("SELECT 1")).scalar_one(), deadline=deadline)
                return "ok"
            except CircuitOpenError:
                return "refused"
            except Exception as exc:
                return type(exc).__name__

    def trials(seconds: float, hold: float) -> list[tuple[float, float]]:
        """Call for *seconds*; the wall-clock intervals of the HALF_OPEN trials this process ran."""
        spans = []
        give_up = time.monotonic() + seconds
        while time.monotonic() < give_up:
            try:
                permit = breaker.before_call()
            except CircuitOpenError:
                time.sleep(0.005)
                continue
            started = time.time()
            try:
                with database.session() as session:
                    session.execute(text("SELECT pg_sleep(:s)"), {"s": hold}).all()
            except Exception:
                breaker.release(permit)
                continue
            ended = time.time()
            breaker.record_success(permit)
            if permit != NOT_TRIAL:
                spans.append((started, ended))
        return spans

    try:
        while True:
            command = commands.get()
            if command is None:
                break
            op, args = command
            try:
                if op == "calls":
                    count, deadline, pause = args
                    outcomes = []
                    for _ in range(count):
                        outcomes.append(call(deadline))
                        time.sleep(pause)
                    results.put(("ok", outcomes))
                elif op == "state":
                    results.put(("ok", (breaker.state.value, bool(getattr(breaker, "shared", False)))))
                elif op == "trials":
                    results.put(("ok", trials(*args)))
                else:
                    results.put(("error", f"unknown op {op}"))
            except Exception:
                results.put(("error", traceback.format_exc()))
    finally:
        monitor.stop()
        stop_breaker(breaker)
        database.close()
