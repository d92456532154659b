"""Brownout's database layer: breaker, retry, bounded engine, health checks.

Knows nothing of HTTP, queues or caches; those layers use it.
"""

from brownout._db.circuit_breaker import BreakerListener, BreakerState, CircuitBreaker
from brownout._db.database import Database, build_breaker, build_resilience, make_session_factory
from brownout._db.errors import (
    BrownoutDbError,
    CircuitOpenError,
    CommitOutcomeUnknown,
    DeadlineExceeded,
    ErrorKind,
    classify,
    describe,
)
from brownout._db.health_check import HealthMonitor, check_db_health, periodic_health_check
from brownout._db.retry import CallObserver, Resilience, RetryPolicy, execute_with_retry

__all__ = [
    "BreakerListener",
    "BreakerState",
    "BrownoutDbError",
    "CallObserver",
    "CircuitBreaker",
    "CircuitOpenError",
    "CommitOutcomeUnknown",
    "Database",
    "DeadlineExceeded",
    "ErrorKind",
    "HealthMonitor",
    "Resilience",
    "RetryPolicy",
    "build_breaker",
    "build_resilience",
    "check_db_health",
    "classify",
    "describe",
    "execute_with_retry",
    "make_session_factory",
    "periodic_health_check",
]
