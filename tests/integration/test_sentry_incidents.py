"""One Sentry event per incident, from real faults: a disconnect burst, the breaker opening, a dead letter.

Events are captured by a real sentry-sdk client (tests/support/sentry_capture.py); only the rate limit's
clock is fake.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest
from sqlalchemy import text

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout._db import BreakerState, CircuitBreaker, CircuitOpenError, Database, ErrorKind, execute_with_retry
from brownout._db.circuit_breaker import NOT_TRIAL
from brownout._db.retry import Resilience, RetryPolicy
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.publisher import Publisher
from brownout._fleet.assembly import build_fleet_breaker, stop_breaker
from brownout._observability import incident_events
from brownout._observability.sentry import init_sentry
from brownout._settings import Settings
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from tests.conftest import REDIS_URL, database_url, terminate_backends
from tests.support.fakes import FakeClock
from tests.support.polling import wait_until
from tests.support.sentry_capture import SentEvents
from tests.support.tcp_proxy import FaultProxy
from tests.support.worker_rig import WorkerRig

PERSONAL = {"user_id": 7, "email": "grace.hopper@navy.example.com", "subject": "Your biopsy results", "body": "Dear Grace, ..."}


def incidents(sent: SentEvents, incident: str) -> list[dict[str, Any]]:
    return [event for event in sent if event.get("tags", {}).get("incident") == incident]


def select_one(database: Database, **options: Any) -> Any:
    with database.session() as s:
        return execute_with_retry(s, lambda: s.execute(text("SELECT 1")).scalar_one(), **options)


def kill_busy_connections(database: Database, pg_database: str, app_name: str, count: int) -> None:
    """*count* sessions each hold a connection; every backend is killed (SSL), then each session's next call
    meets its dead connection and is retried on a fresh one."""
    retrying = Resilience(breaker=database.breaker, policy=RetryPolicy(), sleep=lambda _: None)
    with ExitStack() as stack:
        sessions = [stack.enter_context(database.session()) for _ in range(count)]
        held = {s.execute(text("SELECT pg_backend_pid()")).scalar_one() for s in sessions}
        assert terminate_backends(pg_database, app_name) == held
        for s in sessions:
            assert execute_with_retry(s, lambda s=s: s.execute(text("SELECT 1")).scalar_one(), resilience=retrying) == 1


def test_a_burst_of_killed_connections_is_one_event_with_its_count(
    sentry_events: SentEvents, make_database: Callable[..., Database], pg_database: str, app_name: str
) -> None:
    database = make_database(pool_pre_ping=False)
    kill_busy_connections(database, pg_database, app_name, 6)
    assert wait_until(lambda: bool(incidents(sentry_events, "disconnect-burst")), timeout=10), sentry_events.text()
    assert wait_until(lambda: len(sentry_events) > 1, timeout=0.5) is False, "more than the burst's event"
    (event,) = sentry_events
    assert event["fingerprint"] == ["brownout", "disconnect-burst", "ssl"]
    assert event["tags"]["error_kind"] == "ssl" and event["level"] == "warning"
    assert event["extra"]["connections"] == 6 and event["extra"]["suppressed"] == 0
    sent = sentry_events.text()
    for where in (pg_database, app_name, "127.0.0.1", "postgresql://"):  # neither the connection string nor the host
        assert where not in sent, where


def test_the_breaker_opening_is_one_event_with_the_kind_that_opened_it_and_its_scope(
    sentry_events: SentEvents, make_database: Callable[..., Database], pg_database: str
) -> None:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5432) as proxy:
        database = make_database(database_url=database_url(pg_database, port=proxy.port), retry_max_retries=0)
        proxy.refuse()  # a database that refuses connections (a failover's first seconds, a stopped server)
        for _ in range(database.breaker.failure_threshold):
            with pytest.raises(Exception) as failure:
                select_one(database)
            assert not isinstance(failure.value, CircuitOpenError)
        assert database.breaker.state is BreakerState.OPEN
        for _ in range(3):
            with pytest.raises(CircuitOpenError):
                select_one(database)  # refusals are no new opening
    (event,) = incidents(sentry_events, "breaker-open")
    assert event["fingerprint"] == ["brownout", "breaker-open", "disconnect"]
    assert event["tags"]["error_kind"] == "disconnect" and event["tags"]["scope"] == "process"
    assert event["tags"]["breaker"] == "database" and event["level"] == "error"
    assert incidents(sentry_events, "disconnect-burst") == []  # a refused connect loses no connection


def test_a_fleet_opening_is_one_event_from_the_process_whose_failure_opened_it(
    sentry_events: SentEvents, make_settings: Callable[..., Settings], redis_prefix: str
) -> None:
    settings = make_settings(
        breaker_backend="redis",
        redis_url=REDIS_URL,
        redis_key_prefix=redis_prefix,
        breaker_failure_threshold=3,
        breaker_probe_interval_seconds=0.2,
    )
    limit = FakeClock()
    incident_events.enable(interval_seconds=600, component="web", clock=limit)
    first, second = build_fleet_breaker(settings), build_fleet_breaker(settings)
    try:
        for breaker, failures in ((first, 2), (second, 1)):  # the third failure fleet-wide is the second's
            for _ in range(failures):
                breaker.record_failure(breaker.before_call(), ErrorKind.SSL)
        assert second.state is BreakerState.OPEN
        assert wait_until(lambda: first.state is BreakerState.OPEN, timeout=5)  # told by Redis: no event of its own
        limit.advance(601)  # so that the limit hides nothing below
        first.record_failure(NOT_TRIAL, ErrorKind.SSL)  # a call in flight when the fleet opened fails after: old news
    finally:
        stop_breaker(first)
        stop_breaker(second)
    (event,) = incidents(sentry_events, "breaker-open")
    assert event["fingerprint"] == ["brownout", "breaker-open", "ssl"]
    assert event["tags"]["scope"] == "fleet" and event["tags"]["error_kind"] == "ssl"


def test_ten_openings_within_the_limit_are_one_event_and_the_next_after_it_carries_the_count(
    sentry_events: SentEvents,
) -> None:
    clock = FakeClock()
    incident_events.enable(interval_seconds=600, component="web", clock=clock)
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=10, clock=clock)

    def open_it() -> None:
        breaker.record_failure(breaker.before_call(), ErrorKind.SSL)
        assert breaker.state is BreakerState.OPEN
        breaker.reset()

    for _ in range(10):
        open_it()
        clock.advance(30)
    assert [event["extra"]["suppressed"] for event in incidents(sentry_events, "breaker-open")] == [0]
    clock.advance(600)
    open_it()
    events = incidents(sentry_events, "breaker-open")
    assert [event["extra"]["suppressed"] for event in events] == [0, 9]
    assert {tuple(event["fingerprint"]) for event in events} == {("brownout", "breaker-open", "ssl")}


def test_a_dead_lettered_write_is_one_event_with_its_reason_and_without_its_payload(
    sentry_events: SentEvents,
    make_database: Callable[..., Database],
    pg_database: str,
    make_publisher: Callable[..., Publisher],
    make_worker_rig: Callable[..., WorkerRig],
    queue_name: str,
) -> None:
    upgrade_database(database_url(pg_database))
    db = make_database()
    rig = make_worker_rig()
    declare_apply_actor(rig.broker, ApplyRuntime(database=make_database(), registry=build_registry()), queue_name=queue_name)
    publisher = make_publisher()
    dispatcher = Dispatcher(
        database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=0.3
    )
    accepted = dispatcher.accept(CREATE, PERSONAL, idempotency_key="poison")
    poison = accepted.model_copy(update={"payload": PERSONAL | {"subject": "Your biopsy results " + "x" * 500}})
    publisher.publish(poison.to_message(queue_name))  # too long for v1: the validator's reason quotes the subject
    rig.start({queue_name}, threads=1)
    assert wait_until(lambda: bool(incidents(sentry_events, "dead-letter")), timeout=20), sentry_events.text()
    rig.stop_workers()
    (event,) = sentry_events  # the dead letter's log line (ERROR) is no event of its own
    assert event["fingerprint"] == ["brownout", "dead-letter", "create_notification"]
    assert event["tags"]["reason"] == "invalid create_notification v1 payload"
    assert event["tags"]["command"] == "create_notification" and event["level"] == "error"
    assert event["extra"]["command_id"] == str(poison.command_id)
    sent = sentry_events.text()
    for personal in ("grace.hopper", "navy.example", "biopsy", "Dear Grace", "xxxxxxxx"):
        at = sent.find(personal)
        assert at < 0, sent[max(0, at - 300) : at + 100]


def test_without_a_dsn_nothing_is_reported_and_no_burst_is_watched(
    make_database: Callable[..., Database], pg_database: str, app_name: str
) -> None:
    assert init_sentry(Settings(database_url="postgresql://u@localhost/db")) is False
    assert incident_events.active() is False
    before = set(threading.enumerate())
    database = make_database(pool_pre_ping=False)
    kill_busy_connections(database, pg_database, app_name, 3)
    breaker = CircuitBreaker(failure_threshold=1, clock=FakeClock())
    breaker.record_failure(breaker.before_call(), ErrorKind.SSL)
    assert breaker.state is BreakerState.OPEN
    timers = [t for t in threading.enumerate() if t.name == "brownout-disconnect-burst" and t not in before]
    assert timers == [], "a burst was watched with Sentry off"
    assert (
        incident_events.breaker_opened(breaker="database", kind="ssl", scope="process", failure_threshold=1, open_seconds=60)
        is False
    )
