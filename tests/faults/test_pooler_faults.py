"""Faults seen through a real PgBouncer in transaction mode with client TLS, as on
Supabase's pooler (port 6543): what `BROWNOUT_DATABASE_POOLER=transaction`
changes, and what an outage or a silent pooler looks like from the app.

Breaker time is a fake clock and retry waits go to a list: no test sleeps for
them. Real-time bounds are wide (the machine is shared).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from brownout._db import (
    BreakerListener,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Database,
    DeadlineExceeded,
    ErrorKind,
    check_db_health,
    classify,
    execute_with_retry,
)
from brownout._db.database import build_breaker, build_resilience
from brownout._db.retry import Resilience, RetryPolicy
from brownout._settings import Settings
from tests.conftest import admin_cursor
from tests.support.fakes import FakeClock
from tests.support.pgbouncer import PgBouncer, start_pgbouncer_or_skip
from tests.support.polling import wait_until
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.pgbouncer

USER = PASSWORD = "brownout"  # the local role; it may terminate its own backends


# Unlike a kill mid-query (see tests/support/pgbouncer.py), a kill while the client
# idles in its transaction has PgBouncer pass PostgreSQL's FATAL on, add its own,
# and close the TLS link; psycopg2 reports all three at the next query.
KILLED_UNDER_A_TRANSACTION = (
    "FATAL:  terminating connection due to administrator command\n"
    "FATAL:  server conn crashed?\n"
    "SSL connection has been closed unexpectedly\n"
)


# What a client of PgBouncer gets while PostgreSQL is unreachable from it.
POOLER_OUTAGE_TEXTS = ("server login has been failing", "query_wait_timeout", "pgbouncer cannot connect to server")


class Recorder(BreakerListener):
    """Every failure kind the breaker counted, and every transition."""

    def __init__(self) -> None:
        self.kinds: list[ErrorKind] = []
        self.transitions: list[tuple[BreakerState, BreakerState]] = []

    def on_failure(self, breaker: CircuitBreaker, kind: ErrorKind) -> None:
        self.kinds.append(kind)

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        self.transitions.append((old, new))


@dataclasses.dataclass
class Rig:
    """A Database whose breaker runs on a fake clock and whose retries never sleep."""

    database: Database
    clock: FakeClock
    delays: list[float]
    recorder: Recorder

    @property
    def breaker(self) -> CircuitBreaker:
        return self.database.breaker


@pytest.fixture
def make_rig(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Rig]]:
    """Build Rigs and close them at the end (tests/conftest.py resets the wait callback)."""
    built: list[Database] = []

    def factory(**overrides: Any) -> Rig:
        settings = make_settings(**overrides)
        clock = FakeClock()
        delays: list[float] = []
        breaker = build_breaker(settings, clock=clock)
        resilience = dataclasses.replace(build_resilience(settings, breaker=breaker), sleep=delays.append)
        database = Database.from_settings(settings, resilience=resilience)
        built.append(database)
        recorder = Recorder()
        database.breaker.add_listener(recorder)
        return Rig(database=database, clock=clock, delays=delays, recorder=recorder)

    yield factory
    for database in built:
        database.close()


def link_id(s: Session) -> int:
    """The client link to the pooler: PgBouncer hands each client its own fake backend pid."""
    return int(s.connection().connection.dbapi_connection.info.backend_pid)  # type: ignore[union-attr]


def links_at_once(database: Database, count: int) -> list[int]:
    """Open *count* sessions at once (each in a transaction); their client links."""
    with ExitStack() as stack:
        sessions = [stack.enter_context(database.session()) for _ in range(count)]
        for s in sessions:
            s.execute(text("SELECT 1"))
        return [link_id(s) for s in sessions]


def ssl_kill(bouncer: PgBouncer, rig: Rig, dbname: str) -> tuple[list[int], int, int, list[Exception]]:
    """Pool four client links, kill every server backend under a transaction, retry.

    Returns the links from before, the victim's link, the retry's link and the
    errors the retried function saw.
    """
    database = rig.database
    before = links_at_once(database, 4)
    assert len(set(before)) == 4
    seen: list[Exception] = []
    with database.session() as s:
        s.execute(text("SELECT 1"))  # in a transaction: PgBouncer has given this client a server
        victim = link_id(s)
        assert victim in before
        killed = bouncer.terminate_server_backends(dbname=dbname, superuser=USER, password=PASSWORD)
        assert killed, "no server connection behind the pooler to kill"
        # PgBouncer drops idle dead servers as it reads their close; wait for it, so
        # that the retry meets a pool without corpses (deterministic, one failure).
        assert wait_until(lambda: not set(bouncer.server_backend_pids(dbname)) & set(killed))

        def select_one() -> int:
            try:
                return int(s.execute(text("SELECT 1")).scalar_one())
            except Exception as exc:
                seen.append(exc)
                raise

        assert execute_with_retry(s, select_one) == 1
        retried_on = link_id(s)
    return before, victim, retried_on, seen


def assert_killed_under_a_transaction(error: Exception) -> None:
    """What psycopg2 reports when the server behind an idle-in-transaction client is killed."""
    orig = getattr(error, "orig", None)
    assert str(orig) == KILLED_UNDER_A_TRANSACTION
    assert orig.pgcode is None  # type: ignore[union-attr]  # no SQLSTATE: the text decides


def pooled_default_statement_timeout(bouncer: PgBouncer, dbname: str) -> str:
    """`SHOW statement_timeout` from a plain psycopg2 client of the same pooler."""
    conn = psycopg2.connect(bouncer.dsn(dbname, USER, PASSWORD), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            return str(cur.fetchone()[0])
    finally:
        conn.close()


def test_ssl_kill_behind_the_pooler_invalidates_only_the_failed_link(
    bouncer: PgBouncer, make_rig: Callable[..., Rig], pg_database: str
) -> None:
    rig = make_rig(
        database_url=bouncer.dsn(pg_database, USER, PASSWORD),
        database_pooler="transaction",
        pool_pre_ping=False,  # pre-ping would hide what invalidation did
    )

    before, victim, retried_on, seen = ssl_kill(bouncer, rig, pg_database)

    assert len(seen) == 1
    assert_killed_under_a_transaction(seen[0])
    assert rig.recorder.kinds == [ErrorKind.SSL]
    assert len(rig.delays) == 1 and 0 <= rig.delays[0] <= 0.5
    # Only the victim was discarded: the retry and later sessions reuse healthy links.
    assert retried_on != victim and retried_on in before
    after = links_at_once(rig.database, 4)
    assert victim not in after
    assert set(after) & (set(before) - {victim}), "no client link from before the kill was reused"
    assert rig.breaker.state is BreakerState.CLOSED


def test_ssl_kill_in_direct_mode_invalidates_the_whole_pool(
    bouncer: PgBouncer, make_rig: Callable[..., Rig], pg_database: str
) -> None:
    """The same kill with `database_pooler="none"`: every pooled link is replaced,
    though all but one were healthy. This pair is why the scope is chosen per mode."""
    rig = make_rig(
        database_url=bouncer.dsn(pg_database, USER, PASSWORD),
        database_pooler="none",
        pool_pre_ping=False,
    )

    before, victim, retried_on, seen = ssl_kill(bouncer, rig, pg_database)

    assert len(seen) == 1
    assert_killed_under_a_transaction(seen[0])
    assert rig.recorder.kinds == [ErrorKind.SSL]
    assert retried_on not in before
    after = links_at_once(rig.database, 4)
    assert not set(after) & set(before), "a client link from before the kill was reused"
    assert rig.breaker.state is BreakerState.CLOSED


def test_startup_options_are_refused_by_the_pooler_but_set_local_works(
    bouncer: PgBouncer, make_rig: Callable[..., Rig], pg_database: str
) -> None:
    url = bouncer.dsn(pg_database, USER, PASSWORD)
    direct = make_rig(database_url=url, database_pooler="none", db_statement_timeout_seconds=5)
    seen: list[Exception] = []
    with direct.database.session() as s:

        def select_one() -> int:
            try:
                return int(s.execute(text("SELECT 1")).scalar_one())
            except Exception as exc:
                seen.append(exc)
                raise

        started = time.monotonic()
        with pytest.raises(OperationalError) as refused:
            execute_with_retry(s, select_one)
        elapsed = time.monotonic() - started
    # Refused at login, by PgBouncer (psycopg2's asynchronous connect, used under
    # our wait callback, omits libpq's 'connection to server at ... failed:').
    assert "unsupported startup parameter: options" in str(refused.value)
    assert seen == [refused.value]
    # A configuration error: not retried, not counted (retrying cannot fix it, and
    # an open breaker would only queue writes the worker cannot apply either).
    assert classify(refused.value) is ErrorKind.PERMANENT
    assert direct.delays == [] and direct.recorder.kinds == []
    assert elapsed < 2

    pooled = make_rig(database_url=url, database_pooler="transaction", db_statement_timeout_seconds=5)
    with pooled.database.session() as s:
        assert execute_with_retry(s, lambda: s.execute(text("SHOW statement_timeout")).scalar_one()) == "5s"
        s.commit()
        # SET LOCAL again at the next begin: the server connection may be another one.
        assert execute_with_retry(s, lambda: s.execute(text("SHOW statement_timeout")).scalar_one()) == "5s"
        s.commit()
    # ... and it never leaks to other clients of the same server connections.
    with admin_cursor(pg_database) as cur:
        cur.execute("SHOW statement_timeout")
        server_default = cur.fetchone()[0]
    plain = pooled_default_statement_timeout(bouncer, pg_database)
    assert plain == server_default != "5s"


def test_database_outage_behind_the_pooler_opens_and_then_closes_the_breaker(
    make_rig: Callable[..., Rig], pg_database: str
) -> None:
    """PostgreSQL unreachable from PgBouncer; PgBouncer itself fine. Transient
    failures open the breaker, which then refuses with no I/O at all; once
    PostgreSQL is back, two trial calls close it."""
    with ExitStack() as stack:
        upstream = stack.enter_context(FaultProxy(upstream_host="127.0.0.1", upstream_port=5432))
        bouncer = start_pgbouncer_or_skip(server_port=upstream.port, query_wait_timeout=2)
        stack.callback(bouncer.stop)
        rig = make_rig(
            database_url=bouncer.dsn(pg_database, USER, PASSWORD),
            database_pooler="transaction",
            retry_max_retries=0,
        )
        engine = rig.database.engine
        checkouts: list[object] = []
        event.listen(engine, "checkout", lambda *args: checkouts.append(args[0]))
        with rig.database.session() as s:

            def select_one() -> int:
                return int(s.execute(text("SELECT 1")).scalar_one())

            assert execute_with_retry(s, select_one) == 1
            s.commit()

            upstream.refuse()
            upstream.reset_existing()  # PgBouncer's server connections die; its clients' links do not
            threshold = rig.breaker.failure_threshold
            failures: list[Exception] = []
            for _ in range(threshold):
                with pytest.raises(OperationalError) as failed:
                    execute_with_retry(s, select_one)
                failures.append(failed.value)
            # Observed (PgBouncer 1.18, psycopg2 2.9.13 under our wait callback, which,
            # unlike a blocking psycopg2, reports the pooler's FATAL before the close):
            # - 1st call, ~2.1 s: pre-ping on the warm link waits in PgBouncer's queue
            #   until query_wait_timeout and fails (SQLAlchemy then invalidates the
            #   pool and reconnects); the query on the new link gets, at once,
            #   "FATAL:  server login has been failing, try again later (server_login_retry)\n
            #    SSL connection has been closed unexpectedly\n"
            #   (with pre-ping off the 1st call gets "FATAL:  query_wait_timeout\n
            #    SSL connection has been closed unexpectedly\n" after ~2.2 s);
            # - 2nd to 5th calls, ~20 ms each: the same "server login has been failing".
            # All classify as SSL (the closed TLS link is matched first): transient.
            for failure in failures:
                message = str(getattr(failure, "orig", failure))
                assert any(text_ in message for text_ in POOLER_OUTAGE_TEXTS), message
                assert classify(failure) in (ErrorKind.SSL, ErrorKind.DISCONNECT), message
            assert len(rig.recorder.kinds) == threshold
            assert all(kind.is_disconnect for kind in rig.recorder.kinds)
            assert rig.breaker.state is BreakerState.OPEN
            assert rig.delays == []

            # Open: refused at once; the function never runs and no connection is even
            # checked out (the upstream proxy, refusing, could not count anything).
            calls: list[int] = []
            seen_checkouts = len(checkouts)
            started = time.monotonic()
            with pytest.raises(CircuitOpenError) as refused:
                execute_with_retry(s, lambda: calls.append(1))
            assert time.monotonic() - started < 0.5
            assert calls == [] and len(checkouts) == seen_checkouts
            assert 60 <= refused.value.retry_after <= 66

            upstream.pass_through()
            # PgBouncer reconnects after server_login_retry (1 s): wait for it with real
            # health checks, which never go through the breaker.
            with rig.database.session() as probe:
                assert wait_until(lambda: check_db_health(probe, timeout=2)["healthy"], timeout=15)
            assert rig.breaker.state is BreakerState.OPEN  # health checks do not close it

            rig.clock.advance(70)  # past 60 s + up to 10 % jitter
            assert execute_with_retry(s, select_one) == 1
            assert rig.recorder.transitions[-1] == (BreakerState.OPEN, BreakerState.HALF_OPEN)
            s.commit()
            assert execute_with_retry(s, select_one) == 1
            assert rig.recorder.transitions[-1] == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
        assert rig.recorder.transitions == [
            (BreakerState.CLOSED, BreakerState.OPEN),
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED),
        ]


def test_a_silent_pooler_is_cut_by_deadlines(bouncer: PgBouncer, make_rig: Callable[..., Rig], pg_database: str) -> None:
    """The pooler accepts and never answers (a hung PgBouncer or load balancer):
    keepalives cannot see it; our wait callback must."""
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=bouncer.port) as front:
        url = make_url(bouncer.dsn(pg_database, USER, PASSWORD)).set(port=front.port)
        rig = make_rig(
            database_url=url.render_as_string(hide_password=False),
            database_pooler="transaction",
            db_io_timeout_seconds=1,
            db_connect_timeout_seconds=1,
        )
        database = rig.database
        warm = links_at_once(database, 3)  # one pooled link for each call below
        assert len(set(warm)) == 3
        front.silence()

        # Request path: the 0.3 s deadline cuts the wait. Observed, in 0.30 s:
        # DeadlineExceeded("database deadline of 0.300 s spent after 1 attempt(s)")
        # from "brownout deadline reached connecting to the database after -0.003 s"
        # (pre-ping on the silent link spent the budget; the reconnect had none left).
        with database.session() as s:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as cut:
                execute_with_retry(s, lambda: s.execute(text("SELECT 1")).scalar_one(), deadline=0.3)
            assert time.monotonic() - started < 3
        assert classify(cut.value.__cause__) is ErrorKind.DISCONNECT  # type: ignore[arg-type]
        assert "brownout deadline reached" in str(cut.value.__cause__)

        # Background (no deadline, no retry): db_io_timeout_seconds / db_connect_timeout_seconds
        # bound it. Observed in 1.0 s: "brownout deadline reached connecting to the
        # database after 1.000 s" (the pool was invalidated by the failed pre-ping
        # above, so this checkout reconnected instead of pinging).
        background = Resilience(breaker=database.breaker, policy=RetryPolicy(max_retries=0), sleep=rig.delays.append)
        with database.session() as s:
            started = time.monotonic()
            with pytest.raises(OperationalError) as failed:
                execute_with_retry(s, lambda: s.execute(text("SELECT 1")).scalar_one(), resilience=background)
            assert time.monotonic() - started < 5
        assert classify(failed.value) is ErrorKind.DISCONNECT
        assert "brownout deadline reached" in str(failed.value)

        # The health check has its own deadline and never raises. Observed in 0.50 s:
        # error "DatabaseDeadlineReached: brownout deadline reached connecting to the
        # database after 0.49 s", error_kind "disconnect".
        with database.session() as s:
            started = time.monotonic()
            health = check_db_health(s, timeout=0.5)
            assert time.monotonic() - started < 3
        assert health["healthy"] is False
        assert health["error_kind"] == ErrorKind.DISCONNECT.value
        assert "brownout deadline reached" in health["error"]
        for shown in (health["error"], str(cut.value.__cause__), str(failed.value)):
            assert f":{PASSWORD}@" not in shown and "password=" not in shown

        assert rig.recorder.kinds == [ErrorKind.DISCONNECT, ErrorKind.DISCONNECT]  # the health check counts nothing
        assert rig.delays == []  # the deadline was spent before any wait; no retry in the background call
        assert rig.breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("pooler", ["transaction", "none"])
def test_a_ping_cut_by_the_deadline_keeps_the_healthy_links(make_rig: Callable[..., Rig], pg_database: str, pooler: str) -> None:
    """A busy pooler (its only server connection held elsewhere) makes the pre-ping wait;
    the request's deadline cuts it. That proves the database slow, not the pool dead:
    the other pooled links must survive (SQLAlchemy's own pre-ping would drop them all)."""
    busy = start_pgbouncer_or_skip(default_pool_size=1, query_wait_timeout=10)
    try:
        rig = make_rig(database_url=busy.dsn(pg_database, USER, PASSWORD), database_pooler=pooler)
        engine = rig.database.engine
        with engine.connect() as a, engine.connect() as b:  # two client links sharing one server conn
            before = set()
            for conn in (a, b):
                conn.execute(text("SELECT 1"))
                conn.commit()  # the pooler takes the server connection back; the link stays ours
                before.add(int(conn.connection.dbapi_connection.info.backend_pid))  # type: ignore[union-attr]
        assert len(before) == 2
        holder = psycopg2.connect(busy.dsn(pg_database, USER, PASSWORD))
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT 1")  # in a transaction: holds the pooler's only server connection
            with rig.database.session() as s, pytest.raises(DeadlineExceeded):
                execute_with_retry(s, lambda: s.execute(text("SELECT 1")).scalar_one(), deadline=0.3)
        finally:
            holder.close()
        with rig.database.session() as s:
            s.execute(text("SELECT 1"))
            after = link_id(s)
        assert after in before, "a healthy pooled link was discarded because a ping was slow"
    finally:
        busy.stop()
