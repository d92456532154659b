"""Everything one process needs to talk to PostgreSQL, built once at the entry point."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from brownout._db.circuit_breaker import BreakerListener, CircuitBreaker
from brownout._db.engine import build_engine
from brownout._db.errors import classify
from brownout._db.retry import RESILIENCE_KEY, Resilience, RetryPolicy
from brownout._db.retry_budget import RetryBudget
from brownout._settings import Settings, settings_from_values


def build_breaker(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    listeners: Iterable[BreakerListener] = (),
) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=settings.breaker_failure_threshold,
        open_seconds=settings.breaker_open_seconds,
        success_threshold=settings.breaker_success_threshold,
        open_jitter=settings.breaker_open_jitter,
        clock=clock,
        rng=rng,
        listeners=listeners,
    )


def build_resilience(settings: Settings, *, breaker: CircuitBreaker | None = None) -> Resilience:
    return Resilience(
        breaker=breaker or build_breaker(settings),
        policy=RetryPolicy(
            max_retries=settings.retry_max_retries,
            base_seconds=settings.retry_base_seconds,
            cap_seconds=settings.retry_cap_seconds,
        ),
        budget=RetryBudget(
            ratio=settings.retry_budget_ratio,
            window_seconds=settings.retry_budget_window_seconds,
            min_retries=settings.retry_budget_min_retries,
        ),
    )


log = logging.getLogger(__name__)


class ClosingSession(Session):
    """A Session whose close() does not fail because the database dropped the connection.

    Why: close() rolls the transaction back. When the server ends the connection
    between the caller's last statement and the close (pg_terminate_backend, a
    pooler restart: "SSL connection has been closed unexpectedly"),
    SQLAlchemy invalidates the connection and re-raises, so work that had
    succeeded (a read, a committed write) surfaced as an error, a 500 in the API.
    A dead connection has nothing left to roll back: the error is logged and the
    close finished on the invalidated connection. Any other error still raises.
    """

    def close(self) -> None:
        try:
            super().close()
        except sqlalchemy.exc.DBAPIError as exc:
            if not (exc.connection_invalidated or classify(exc).is_disconnect):
                raise
            log.info("connection lost while closing a session (nothing to roll back): %s", type(exc.orig).__name__)
            super().close()  # the connection is invalidated now: this releases it without a round trip


def make_session_factory(engine: Engine, resilience: Resilience) -> sessionmaker[Session]:
    """Sessions that `execute_with_retry(db, fn)` can guard without further arguments."""
    return sessionmaker(bind=engine, class_=ClosingSession, expire_on_commit=False, info={RESILIENCE_KEY: resilience})


@dataclass
class Database:
    """The engine, its resilience and a session factory; `close()` releases them."""

    settings: Settings
    engine: Engine
    resilience: Resilience
    sessions: sessionmaker[Session]

    @classmethod
    def from_settings(cls, settings: Settings, *, resilience: Resilience | None = None) -> Database:
        engine = build_engine(settings)
        res = resilience or build_resilience(settings)
        return cls(settings=settings, engine=engine, resilience=res, sessions=make_session_factory(engine, res))

    @classmethod
    def from_url(cls, url: str, *, resilience: Resilience | None = None, **values: Any) -> Database:
        """A Database from a URL and explicit settings (*values*: pool_size=..., db_io_timeout_seconds=...),
        reading nothing from the environment; *resilience*: a breaker and retry policy of the caller's."""
        return cls.from_settings(settings_from_values(database_url=url, **values), resilience=resilience)

    @property
    def breaker(self) -> CircuitBreaker:
        return self.resilience.breaker

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()
