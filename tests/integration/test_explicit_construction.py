"""A service with a settings object of its own builds Brownout's pieces from explicit arguments: nothing is read
from the environment, and its own breaker and retry policy are the ones used."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout import (
    Applied,
    CircuitBreaker,
    Database,
    Dispatcher,
    Publisher,
    Queued,
    Resilience,
    RetryPolicy,
    execute_with_retry,
    settings_from_values,
)
from tests.conftest import database_url
from tests.support.rabbit import RABBITMQ_URL

NOTE = {"user_id": 5, "email": "grace@example.com", "subject": "explicit", "body": "b"}


@pytest.fixture
def hostile_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Brownout would pick up if it read the environment: all of it wrong."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody:x@127.0.0.1:9/none")
    monkeypatch.setenv("BROWNOUT_POOL_SIZE", "1")
    monkeypatch.setenv("BROWNOUT_QUEUE_NAME", "not-this-queue")
    monkeypatch.setenv("BROWNOUT_BREAKER_FAILURE_THRESHOLD", "99")


def test_settings_from_values_read_nothing_from_the_environment(hostile_environment: None) -> None:
    settings = settings_from_values(database_url="postgresql://app:pw@db.internal:5432/app", pool_size=4)
    assert settings.database_url.endswith("@db.internal:5432/app?sslmode=require")  # a remote host: TLS required
    assert settings.pool_size == 4 and settings.queue_name == "brownout-commands"
    assert settings.breaker_failure_threshold == 5
    with pytest.raises(ValidationError, match="pool_sise"):  # a misspelt setting is an error, not a default
        settings_from_values(database_url="postgresql://app:pw@db.internal:5432/app", pool_sise=4)


def test_a_database_and_a_dispatcher_from_explicit_arguments(
    hostile_environment: None, pg_database: str, queue_name: str, make_database: Callable[..., Database]
) -> None:
    url = database_url(pg_database)
    upgrade_database(url)
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=1.0)
    database = Database.from_url(url, pool_size=2, resilience=Resilience(breaker=breaker, policy=RetryPolicy(max_retries=1)))
    publisher = Publisher(url=RABBITMQ_URL, queue_name=queue_name, max_length=1000)
    publisher.start()
    dispatcher = Dispatcher(
        database=database, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=2.0
    )
    try:
        assert database.breaker is breaker and database.engine.pool.size() == 2  # type: ignore[attr-defined]
        with database.session() as session:
            assert execute_with_retry(session, lambda: session.execute(text("SELECT 1")).scalar_one(), idempotent=True) == 1
        assert isinstance(dispatcher.submit(CREATE, NOTE, idempotency_key="explicit-1"), Applied)
        breaker.force_open()
        assert isinstance(dispatcher.submit(CREATE, NOTE | {"subject": "queued"}, idempotency_key="explicit-2"), Queued)
    finally:
        dispatcher.close()
        database.close()
