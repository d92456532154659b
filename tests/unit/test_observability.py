"""Logs, Sentry scrubbing and metric names: what operators see, checked without a network."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import sentry_sdk
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine

from brownout._db import BreakerState, CircuitBreaker, ErrorKind
from brownout._db.health_check import pool_figures
from brownout._observability.logs import DegradedModeLog, configure_logging
from brownout._observability.metrics import BreakerMetrics, DbCallMetrics, Metrics, metric_names
from brownout._observability.sentry import init_sentry, scrubber
from brownout._settings import Settings
from tests.support.fakes import FakeClock

URL = "postgresql://u:pw@localhost/db"


def test_json_log_lines_and_the_dev_profile() -> None:
    stream = io.StringIO()
    configure_logging(Settings(database_url=URL, log_format="json", log_profile="dev"), stream=stream)
    try:
        logging.getLogger("brownout.test").debug("shown in dev %s", 1, extra={"breaker": "open"})
        line = json.loads(stream.getvalue().strip().splitlines()[-1])
        assert line["message"] == "shown in dev 1" and line["level"] == "DEBUG" and line["breaker"] == "open"
        assert line["logger"] == "brownout.test"
        stream.truncate(0)
        configure_logging(Settings(database_url=URL), stream=stream)
        logging.getLogger("brownout.test").debug("hidden in production")
        assert "hidden" not in stream.getvalue()
    finally:
        configure_logging(Settings(database_url=URL))


def test_degraded_mode_is_logged_on_entering_and_leaving(caplog: Any) -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=10, clock=FakeClock())
    breaker.add_listener(DegradedModeLog())
    with caplog.at_level(logging.WARNING, logger="brownout.degraded"):
        breaker.force_open()
        breaker.reset()
    messages = [record.getMessage() for record in caplog.records if record.name == "brownout.degraded"]
    assert len(messages) == 2
    assert messages[0].startswith("degraded mode entered") and messages[1].startswith("degraded mode left")


def test_breaker_and_call_metrics_count_on_a_private_registry() -> None:
    metrics = Metrics(CollectorRegistry())
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=10, clock=FakeClock())
    metrics.attach_breaker(breaker)
    calls = DbCallMetrics(metrics)
    calls.on_attempt(0.002, None)
    calls.on_attempt(0.5, ErrorKind.SSL)
    calls.on_retry(ErrorKind.SSL, 0.1)
    breaker.force_open()
    assert breaker.refuse_now() is not None
    value = metrics.registry.get_sample_value
    assert value("brownout_db_calls_total") == 2
    assert value("brownout_db_errors_total", {"kind": "ssl"}) == 1
    assert value("brownout_db_retries_total", {"kind": "ssl"}) == 1
    assert value("brownout_db_refused_total") == 1
    assert value("brownout_breaker_state", {"breaker": "database"}) == 2
    assert value("brownout_breaker_transitions_total", {"breaker": "database", "to": "open"}) == 1
    assert isinstance(breaker._listeners[0], BreakerMetrics)  # attached as a listener, as the others are


def test_metric_names_are_prefixed_and_in_base_units() -> None:
    names = metric_names()
    assert names and all(name.startswith("brownout_") for name in names)
    assert not any(name.endswith(("_ms", "_milliseconds")) for name in names)


def test_sentry_is_off_without_a_dsn() -> None:
    assert init_sentry(Settings(database_url=URL)) is False


def test_sentry_events_are_tagged_and_scrubbed() -> None:
    sent: list[dict[str, Any]] = []

    class Capture(sentry_sdk.transport.Transport):
        def capture_envelope(self, envelope: Any) -> None:
            for item in envelope.items:
                if item.type == "event":
                    sent.append(item.payload.json)

    breaker = CircuitBreaker(failure_threshold=1, open_seconds=10, clock=FakeClock())
    breaker.force_open()
    settings = Settings(database_url=URL, sentry_dsn="https://public@sentry.example.invalid/1")
    try:
        assert init_sentry(settings, breaker=breaker, transport=Capture) is True
        try:
            raise RuntimeError("cannot reach postgresql://app:hunter2@db.example:5432/app")
        except RuntimeError:
            sentry_sdk.capture_exception()
        sentry_sdk.flush()
    finally:
        sentry_sdk.init(dsn=None)
    assert len(sent) == 1
    event = sent[0]
    assert event["tags"]["breaker"] == "open"
    assert "hunter2" not in json.dumps(event)


def test_scrubber_drops_auth_headers_and_secret_fields() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=10, clock=FakeClock())
    event = {
        "request": {"headers": {"Authorization": "Bearer t0ken", "Accept": "*/*"}},
        "extra": {"admin_token": "t0ken", "url": "redis://:s3cret@cache:6379/0"},
    }
    scrubbed = scrubber(breaker)(event, {})
    assert scrubbed["tags"]["breaker"] == BreakerState.CLOSED.value
    assert scrubbed["request"]["headers"] == {"Authorization": "[Filtered]", "Accept": "*/*"}
    assert scrubbed["extra"]["admin_token"] == "[Filtered]"
    assert "s3cret" not in json.dumps(scrubbed)


def test_scrubber_drops_bodies_messages_and_frame_variables() -> None:
    event = {
        "request": {"url": "http://api/notifications", "data": {"email": "ada@example.com"}, "cookies": {"s": "1"}},
        "contexts": {"dramatiq": {"type": "dramatiq", "data": {"args": [{"subject": "Your results"}]}}},
        "exception": {"values": [{"value": "refused ada@example.com", "stacktrace": {"frames": [{"vars": {"body": "Dear"}}]}}]},
    }
    scrubbed = scrubber(None)(event, {})
    assert "data" not in scrubbed["request"] and "cookies" not in scrubbed["request"]
    assert scrubbed["contexts"]["dramatiq"] == {"type": "dramatiq"}
    assert scrubbed["exception"]["values"][0] == {"value": "refused ***@example.com", "stacktrace": {"frames": [{}]}}


PSYCOPG2_URL = "postgresql+psycopg2://u:pw@localhost/db"


def test_pool_gauges_export_the_pools_maximum() -> None:
    """Size and max overflow are what the pool-near-its-maximum alert divides by."""
    metrics = Metrics(CollectorRegistry())
    engine = create_engine(PSYCOPG2_URL, pool_size=3, max_overflow=7)  # never connects
    unbounded = create_engine(PSYCOPG2_URL, pool_size=0)  # QueuePool without a limit: no maximum to export
    try:
        assert "max_overflow" not in pool_figures(unbounded)
        metrics.observe_pool(pool_figures(engine))
    finally:
        engine.dispose()
        unbounded.dispose()
    value = metrics.registry.get_sample_value
    assert value("brownout_pool_connections", {"state": "size"}) == 3
    assert value("brownout_pool_max_overflow") == 7
    assert value("brownout_pool_connections", {"state": "checked_out"}) == 0
