"""A web-like process for fleet tests: its own engine, breaker, publisher and clock.

Runs in a separate OS process (multiprocessing "spawn"), driven by the test
through a command queue, so nothing is shared with the test or with another
web process but PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any


def serve(settings_fields: dict[str, Any], commands: mp.Queue, results: mp.Queue) -> None:  # type: ignore[type-arg]
    from app.dispatch.notifications import build_registry
    from brownout._db import Database
    from brownout._dispatch.dispatcher import Dispatcher
    from brownout._settings import Settings

    settings = Settings(**settings_fields)
    database = Database.from_settings(settings)
    dispatcher = Dispatcher.from_settings(settings, database, registry=build_registry())
    try:
        while True:
            command = commands.get()
            if command is None:
                break
            op, args = command
            try:
                if op == "open":
                    database.breaker.force_open()
                    results.put(("ok", None))
                elif op == "close":
                    database.breaker.reset()
                    results.put(("ok", None))
                elif op == "submit":
                    name, payload, key = args
                    outcome = dispatcher.submit(name, payload, idempotency_key=key)
                    fields = {k: str(v) if k in ("id", "command_id") else v for k, v in vars(outcome).items()}
                    results.put((type(outcome).__name__, fields))
                else:
                    results.put(("error", f"unknown op {op}"))
            except Exception:
                results.put(("error", traceback.format_exc()))
    finally:
        dispatcher.close()
        database.close()
