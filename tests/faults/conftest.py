"""Fault fixtures: a database reached through a TCP proxy the test controls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from brownout._db import Database
from brownout._db.database import build_breaker, build_resilience
from tests.conftest import database_url
from tests.support.fakes import FakeClock
from tests.support.tcp_proxy import FaultProxy


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5432) as p:
        yield p


@pytest.fixture
def proxied(make_settings: Any, pg_database: str, proxy: FaultProxy) -> Iterator[Any]:
    """Build a Database whose URL goes through the proxy; breaker on a fake clock."""
    built: list[Database] = []

    def factory(*, clock: FakeClock | None = None, **overrides: Any) -> Database:
        settings = make_settings(database_url=database_url(pg_database, port=proxy.port), **overrides)
        breaker = build_breaker(settings, clock=clock or FakeClock())
        database = Database.from_settings(settings, resilience=build_resilience(settings, breaker=breaker))
        built.append(database)
        return database

    yield factory
    for database in built:
        database.close()
