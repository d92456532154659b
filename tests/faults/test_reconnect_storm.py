"""A reconnect storm after an incident counts once on the breaker (src/brownout/_db/incidents.py).

After an SSL kill every busy thread of a process reconnects at once over TLS;
on a loaded host some of those connects run past the request deadline. They
belong to the incident already counted: without this rule, SSL kills every few
seconds opened the breaker of a healthy database in the chaos run. The control:
the same slow connects with no incident before them count, one by one.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any

from sqlalchemy import text

from brownout._db import (
    BreakerListener,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Database,
    DeadlineExceeded,
    ErrorKind,
    execute_with_retry,
)
from tests.support.tcp_proxy import FaultProxy

THREADS = 4


class FailureLog(BreakerListener):
    def __init__(self) -> None:
        self.kinds: list[ErrorKind] = []

    def on_failure(self, breaker: CircuitBreaker, kind: ErrorKind) -> None:
        self.kinds.append(kind)


def select_one(database: Database, deadline: float) -> BaseException | None:
    try:
        with database.session() as s:
            execute_with_retry(s, lambda: s.execute(text("SELECT 1")).scalar_one(), deadline=deadline)
    except Exception as exc:  # returned for the test to inspect
        return exc
    return None


def at_once(database: Database, deadline: float) -> list[BaseException | None]:
    results: list[BaseException | None] = [None] * THREADS

    def run(i: int) -> None:
        results[i] = select_one(database, deadline)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def _wary_refusal(exc: BaseException | None) -> bool:
    return isinstance(exc, CircuitOpenError) and exc.state == "wary"


def build(proxied: Any) -> tuple[Database, FailureLog]:
    # Retries come at once (10 ms), so each thread's retry is a connect that meets the silence.
    database = proxied(retry_base_seconds=0.01, breaker_failure_threshold=THREADS)
    failures = FailureLog()
    database.breaker.add_listener(failures)
    return database, failures


def test_slow_reconnects_right_after_an_incident_count_once(proxied: Any, proxy: FaultProxy) -> None:
    database, failures = build(proxied)
    with ExitStack() as stack:  # THREADS pooled connections
        for session in [stack.enter_context(database.session()) for _ in range(THREADS)]:
            session.execute(text("SELECT 1"))
    proxy.silence()  # new connects are accepted and never answered: slow, as under a reconnect storm
    proxy.reset_existing()  # the incident: every pooled connection dies at once

    results = at_once(database, deadline=1.0)
    # Cut by the deadline; or refused at once: a thread whose own failure counted retries only with the
    # breaker's one wary call (src/brownout/_db/circuit_breaker.py), which another thread may hold.
    assert all(isinstance(exc, DeadlineExceeded) or _wary_refusal(exc) for exc in results), results
    assert len(failures.kinds) == 1, failures.kinds  # the incident; its slow reconnects are excused
    assert database.breaker.state is BreakerState.CLOSED


def test_slow_connects_with_no_incident_before_them_count(proxied: Any, proxy: FaultProxy) -> None:
    database, failures = build(proxied)
    proxy.silence()
    results = at_once(database, deadline=1.0)
    assert all(isinstance(exc, DeadlineExceeded) for exc in results), results
    assert len(failures.kinds) == THREADS
    assert database.breaker.state is BreakerState.OPEN
