"""Build the process's breaker from settings: local, or shared through Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from brownout._cache.redis_link import RedisLink, build_redis_link
from brownout._db import BreakerState, CircuitBreaker, Database, HealthMonitor
from brownout._db.database import build_breaker, build_resilience
from brownout._fleet.shared_breaker import SharedBreaker
from brownout._settings import ConfigurationError, Settings


def build_fleet_breaker(settings: Settings, *, link: RedisLink | None = None) -> CircuitBreaker:
    """BROWNOUT_BREAKER_BACKEND=redis: a started SharedBreaker (stop() it at exit); else the local one."""
    if settings.breaker_backend == "local":
        return build_breaker(settings)
    if not settings.redis_url:
        raise ConfigurationError("BROWNOUT_BREAKER_BACKEND=redis needs REDIS_URL")
    link = link or build_redis_link(settings)
    assert link is not None  # noqa: S101 - narrows the type for mypy: REDIS_URL is set (checked above), so a link is built
    subscriber = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_seconds,
        socket_timeout=max(1.0, 2 * settings.breaker_probe_interval_seconds),
        client_name="brownout-breaker",
    )
    return SharedBreaker(
        link=link,
        subscriber=subscriber,
        window_seconds=settings.breaker_window_seconds,
        probe_gated=settings.breaker_probe_gated,
        refresh_seconds=settings.breaker_probe_interval_seconds,
        failure_threshold=settings.breaker_failure_threshold,
        open_seconds=settings.breaker_open_seconds,
        success_threshold=settings.breaker_success_threshold,
        open_jitter=settings.breaker_open_jitter,
    ).start()


def build_database(settings: Settings, *, link: RedisLink | None = None) -> Database:
    """The process's Database with its (maybe shared) breaker."""
    breaker = build_fleet_breaker(settings, link=link)
    return Database.from_settings(settings, resilience=build_resilience(settings, breaker=breaker))


def build_monitor(
    settings: Settings, database: Database, *, on_result: list[Callable[[dict[str, Any]], None]] | None = None
) -> HealthMonitor:
    """The health monitor; with a shared, probe-gated breaker its checks also end outages."""
    breaker = database.breaker
    hooks = list(on_result or [])
    if isinstance(breaker, SharedBreaker):
        hooks.append(breaker.on_health)

    def tell(result: dict[str, Any]) -> None:
        for hook in hooks:
            hook(result)

    gated = isinstance(breaker, SharedBreaker) and breaker.probe_gated
    return HealthMonitor(
        database.session,
        interval=settings.health_interval_seconds,
        timeout=settings.health_timeout_seconds,
        on_result=tell,
        # Fast probes only where they end an outage: a local breaker recovers on its timer.
        probe_interval=settings.breaker_probe_interval_seconds if gated else None,
        degraded=(lambda: breaker.state is not BreakerState.CLOSED) if gated else None,
        claim_probe=breaker.claim_probe if isinstance(breaker, SharedBreaker) else None,
    )


def stop_breaker(breaker: CircuitBreaker) -> None:
    if isinstance(breaker, SharedBreaker):
        breaker.stop()
