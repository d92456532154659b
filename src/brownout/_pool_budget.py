"""The fleet's worst-case database connections, checked against what the database (or its pooler) allows.

Every Brownout process (a uvicorn worker process, a Dramatiq process) has one engine,
and its pool can hold up to `pool_size + pool_max_overflow` connections at once. The
health monitor and the worker's health gate use that same engine, so they add none.
The fleet can therefore open, at worst:

    web_replicas x web_processes x (pool_size + pool_max_overflow)
  + worker_replicas x worker_processes x (pool_size + pool_max_overflow)

A process cannot see the others, so the replica and process counts are declared in
the settings (`BROWNOUT_WEB_REPLICAS`, ...). When `BROWNOUT_POOLER_CONNECTION_LIMIT`
is set and the sum exceeds it, `warn_if_over_budget` logs one warning line at
start-up with the numbers and pool sizes that would fit; it never refuses to start
(the pools rarely all fill at once, and the pooler queues or refuses the excess).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from brownout._settings import Settings, _env_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSuggestion:
    """Pool sizes under which the whole fleet fits the limit."""

    pool_size: int
    pool_max_overflow: int

    @property
    def per_process(self) -> int:
        return self.pool_size + self.pool_max_overflow


@dataclass(frozen=True)
class Budget:
    """The fleet's worst-case connection count, and the limit it is checked against (None: not set)."""

    web_replicas: int
    web_processes: int
    worker_replicas: int
    worker_processes: int
    pool_size: int
    pool_max_overflow: int
    limit: int | None

    @property
    def per_process(self) -> int:
        """Most connections one process's pool can hold."""
        return self.pool_size + self.pool_max_overflow

    @property
    def processes(self) -> int:
        """Processes with a pool, across the fleet."""
        return self.web_replicas * self.web_processes + self.worker_replicas * self.worker_processes

    @property
    def web_connections(self) -> int:
        return self.web_replicas * self.web_processes * self.per_process

    @property
    def worker_connections(self) -> int:
        return self.worker_replicas * self.worker_processes * self.per_process

    @property
    def total(self) -> int:
        return self.web_connections + self.worker_connections

    @property
    def over_budget(self) -> bool:
        return self.limit is not None and self.total > self.limit

    def formula(self) -> str:
        """The sum with its numbers: '2 web replicas x 2 processes x (10 + 20) + 1 worker replica x ... = 150'."""
        pool = f"({self.pool_size} + {self.pool_max_overflow})"
        return (
            f"{_plural(self.web_replicas, 'web replica')} x {_plural(self.web_processes, 'process')} x {pool}"
            f" + {_plural(self.worker_replicas, 'worker replica')} x {_plural(self.worker_processes, 'process')} x {pool}"
            f" = {self.total}"
        )

    def suggestion(self) -> PoolSuggestion | None:
        """Pool sizes that fit the limit: pool_size kept if it fits, the overflow trimmed first.

        None when there is no limit, or when not even one connection per process fits
        (then only fewer replicas or processes, or a higher limit, help).
        """
        if self.limit is None:
            return None
        per_process = self.limit // self.processes
        if per_process < 1:
            return None
        pool_size = min(self.pool_size, per_process)
        return PoolSuggestion(pool_size=pool_size, pool_max_overflow=min(self.pool_max_overflow, per_process - pool_size))


def connection_budget(settings: Settings) -> Budget:
    """The fleet's worst-case connections under *settings* (pure: reads nothing else)."""
    return Budget(
        web_replicas=settings.web_replicas,
        web_processes=settings.web_processes,
        worker_replicas=settings.worker_replicas,
        worker_processes=settings.worker_processes,
        pool_size=settings.pool_size,
        pool_max_overflow=settings.pool_max_overflow,
        limit=settings.pooler_connection_limit,
    )


def warn_if_over_budget(settings: Settings, logger: logging.Logger | None = None) -> Budget:
    """Log one warning line when the fleet's pools could exceed BROWNOUT_POOLER_CONNECTION_LIMIT; return the budget."""
    budget = connection_budget(settings)
    limit = budget.limit
    if limit is None or budget.total <= limit:
        return budget
    limit_name = _env_name("pooler_connection_limit")
    message = (
        f"connection budget exceeded: {budget.formula()} connections > {limit_name}={limit}"
        f" (replicas x processes x (BROWNOUT_POOL_SIZE + BROWNOUT_POOL_MAX_OVERFLOW));"
    )
    fit = budget.suggestion()
    if fit is not None:
        message += (
            f" {limit} / {_plural(budget.processes, 'process')} = at most {limit // budget.processes} per process:"
            f" set {_env_name('pool_size')}={fit.pool_size} {_env_name('pool_max_overflow')}={fit.pool_max_overflow}"
            f" (or run fewer replicas or processes)"
        )
    else:
        message += (
            f" {_plural(budget.processes, 'process')} cannot have one connection each:"
            f" run fewer replicas or processes, or raise the limit"
        )
    (logger or log).warning("%s", message)
    return budget


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}es" if noun.endswith("s") else f"{count} {noun}s"
