"""The SSL error, for real: backends killed with pg_terminate_backend under TLS."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack

from sqlalchemy import text

from brownout._db import BreakerListener, BreakerState, CircuitBreaker, Database, ErrorKind, execute_with_retry
from brownout._db.retry import Resilience, RetryPolicy
from tests.conftest import admin_cursor, backend_pids, terminate_backends
from tests.support.polling import wait_until


class FailureLog(BreakerListener):
    def __init__(self) -> None:
        self.kinds: list[ErrorKind] = []

    def on_failure(self, breaker: CircuitBreaker, kind: ErrorKind) -> None:
        self.kinds.append(kind)


def pooled_pids(database: Database, count: int) -> set[int]:
    """Open *count* sessions at once so the pool holds that many connections; their PIDs."""
    with ExitStack() as stack:
        sessions = [stack.enter_context(database.session()) for _ in range(count)]
        return {s.execute(text("SELECT pg_backend_pid()")).scalar_one() for s in sessions}


def test_ssl_kill_invalidates_the_whole_pool(make_database: Callable[..., Database], pg_database: str, app_name: str) -> None:
    database = make_database(pool_pre_ping=False)  # pre-ping would hide the difference
    failures = FailureLog()
    database.breaker.add_listener(failures)
    delays: list[float] = []
    res = Resilience(breaker=database.breaker, policy=RetryPolicy(), sleep=delays.append)

    before = pooled_pids(database, 4)
    assert len(before) == 4
    with database.session() as s:
        victim = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert victim in before
        with admin_cursor() as cur:  # an sslmode=require link, as in production
            cur.execute("SELECT pg_terminate_backend(%s)", (victim,))
        after_retry = execute_with_retry(s, lambda: s.execute(text("SELECT pg_backend_pid()")).scalar_one(), resilience=res)

    assert failures.kinds == [ErrorKind.SSL]
    assert len(delays) == 1 and 0 <= delays[0] <= 0.5
    assert after_retry not in before
    siblings = before - {victim}
    # SQLAlchemy invalidates lazily: live siblings are closed when next checked out.
    assert backend_pids(pg_database, app_name) & siblings, "expected live siblings: only the victim was killed"
    after = pooled_pids(database, 4)
    assert not (after & before), "a connection from before the SSL error was reused"
    assert database.breaker.state is BreakerState.CLOSED


def test_one_incident_counts_once_on_the_breaker(make_database: Callable[..., Database], pg_database: str, app_name: str) -> None:
    """Six sessions caught by one kill-everything event: six retries, one breaker failure."""
    database = make_database(pool_pre_ping=False)
    failures = FailureLog()
    database.breaker.add_listener(failures)
    res = Resilience(breaker=database.breaker, policy=RetryPolicy(), sleep=lambda _: None)
    with ExitStack() as stack:
        sessions = [stack.enter_context(database.session()) for _ in range(6)]
        old = {s.execute(text("SELECT pg_backend_pid()")).scalar_one() for s in sessions}
        assert terminate_backends(pg_database, app_name) == old
        new = {
            execute_with_retry(s, lambda s=s: s.execute(text("SELECT pg_backend_pid()")).scalar_one(), resilience=res)
            for s in sessions
        }
    assert not (new & old)
    assert failures.kinds == [ErrorKind.SSL], "more than one failure counted for one incident"
    assert database.breaker.state is BreakerState.CLOSED


def test_kill_all_backends_under_eight_threads(make_database: Callable[..., Database], pg_database: str, app_name: str) -> None:
    database = make_database(retry_base_seconds=0.02, retry_cap_seconds=0.1)
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0] * 8

    def worker(index: int) -> None:
        with database.session() as s:
            while not stop.is_set():
                try:
                    execute_with_retry(s, lambda: s.execute(text("SELECT count(*) FROM pg_class")).scalar_one())
                    done[index] += 1
                except BaseException as exc:  # noqa: BLE001 - any error here fails the test
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    killed = 0
    for _ in range(5):
        target = sum(done) + 16
        assert wait_until(lambda target=target: sum(done) >= target or bool(errors)), "no progress: the workers hung"
        killed += len(terminate_backends(pg_database, app_name))
    target = sum(done) + 16
    assert wait_until(lambda: sum(done) >= target or bool(errors)), "no progress after the last kill"
    stop.set()
    for t in threads:
        t.join(30)
    assert not [t for t in threads if t.is_alive()], "a worker hung"
    assert errors == []
    assert killed >= 5
    assert all(n > 0 for n in done)
    assert database.breaker.state is BreakerState.CLOSED


def test_a_kill_after_the_work_is_done_does_not_fail_the_session_close(
    make_database: Callable[..., Database], pg_database: str, app_name: str
) -> None:
    """The kill lands between the last statement and the close: the read succeeded and must stay a success."""
    database = make_database()
    with database.session() as s:
        victim = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with admin_cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (victim,))
        assert wait_until(lambda: victim not in backend_pids(pg_database, app_name), timeout=5)
    # The close's rollback met the dead connection and let it go; the pool serves a new one.
    with database.session() as s:
        assert s.execute(text("SELECT pg_backend_pid()")).scalar_one() != victim
    assert database.breaker.state is BreakerState.CLOSED
