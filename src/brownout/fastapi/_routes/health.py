"""Liveness and readiness.

`/health` only says the process answers: it is Railway's health-check path,
so a database outage never blocks a deploy or restarts a healthy web
process. `/ready` says whether a write can be made durable now (applied
directly, or queued with a confirm) and always says why.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from brownout._db import BreakerState
from brownout.fastapi._deps import BrownoutDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Writes cannot be made durable now; the body says why"}})
def ready(brownout: BrownoutDep) -> JSONResponse:
    breaker = brownout.database.breaker
    last = brownout.monitor.last_result
    database: dict[str, Any] = {"checked": last is not None}
    if last is not None:
        database |= {key: last[key] for key in ("healthy", "latency_ms", "error", "error_kind")}
    direct = breaker.state is BreakerState.CLOSED and bool(last and last["healthy"])
    publisher = brownout.dispatcher.publisher_state
    queued = publisher == "ready"
    reasons = []
    if not direct:
        if breaker.state is not BreakerState.CLOSED:
            reasons.append(f"circuit breaker {breaker.state.value}: writes are queued")
        elif last is None:
            reasons.append("no database health check yet")
        else:
            reasons.append(f"database health check failed: {last['error']}")
    if not queued:
        reasons.append("queue not configured (RABBITMQ_URL)" if publisher is None else f"RabbitMQ publisher {publisher}")
    redis = brownout.link.ping() if brownout.link is not None else {"ok": False, "error": "REDIS_URL not set"}
    if not redis["ok"]:
        reasons.append(f"Redis unavailable ({redis.get('error')}): no cache, reads go to the database")
    body = {
        "ready": direct or queued,
        "writes": "direct" if direct else ("queued" if queued else "unavailable"),
        "reasons": reasons,
        "database": database,
        "breaker": breaker.snapshot(),
        "redis": redis,
        "rabbitmq": {
            "publisher": publisher,
            "publisher_restarts": brownout.dispatcher.publisher_restarts,
            "queue": brownout.queue_depth.read() if brownout.queue_depth else None,
        },
        "time": time.time(),
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
