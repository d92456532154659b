"""Everything one process needs to talk to PostgreSQL, built once at the entry point."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db.circuit_breaker import BreakerListener, CircuitBreaker
from app.db.engine import build_engine
from app.db.retry import RESILIENCE_KEY, Resilience, RetryPolicy
from app.db.retry_budget import RetryBudget
from app.settings import Settings


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


def make_session_factory(engine: Engine, resilience: Resilience) -> sessionmaker[Session]:
    """Sessions that `execute_with_retry(db, fn)` can guard without further arguments."""
    return sessionmaker(bind=engine, expire_on_commit=False, info={RESILIENCE_KEY: resilience})


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

    @property
    def breaker(self) -> CircuitBreaker:
        return self.resilience.breaker

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()
