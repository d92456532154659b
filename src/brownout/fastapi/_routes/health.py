"""Liveness and readiness.

`/health` only says the process answers: it is Railway's health-check path,
so a database outage never blocks a deploy or restarts a healthy web
process. `/ready` says whether a write can be made durable now (applied
directly, or queued with a confirm): 200 or 503 to anyone, and why to the
operator (the `admin` or `metrics` scope): each part's state in a word, then its masked
detail. Error texts name hosts, ports, users and, on Supabase, the project:
an anonymous caller learns none of it, and the logs keep the full story.

Read-only mode by decision (the operator's, or BROWNOUT_READ_ONLY) is a state
the process serves in: 200, with `"writes": "read-only"` and the reason. The
automatic one (no write can be made durable) is said in the same words and
stays a 503, as it was: it is a failure, not a decision.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from brownout._db import BreakerState
from brownout._fleet.read_only import iso
from brownout.fastapi._auth import optional_caller
from brownout.fastapi._deps import BrownoutDep

router = APIRouter(tags=["health"])

# How old a database check `/ready` may answer from. The monitor checks every BROWNOUT_HEALTH_INTERVAL_SECONDS
# (30 s): an outage of the database and RabbitMQ together would otherwise read "ready" that long. A check on
# demand costs one `SELECT 1` within the health timeout, at most once per this interval, never two at once.
READY_MAX_AGE_SECONDS = 5.0


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    responses={503: {"description": "Writes cannot be made durable now; the body says why to the operator"}},
)
def ready(request: Request, brownout: BrownoutDep, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    breaker = brownout.database.breaker
    last = brownout.monitor.recent(READY_MAX_AGE_SECONDS)
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
    mode = brownout.write_mode.watch()
    automatic = mode.reason == "automatic"
    if mode.mode == "read-only":
        reasons.insert(0, f"read-only mode ({mode.reason}) since {iso(mode.since)}: writes are answered 503")
        if automatic and queued:
            reasons.append(f"queue full ({brownout.settings.queue_max_length} messages): RabbitMQ refuses publishes")
    decided = mode.mode == "read-only" and not automatic  # the operator's or the setting's: a state to serve in
    status = 200 if decided or ((direct or queued) and not automatic) else 503
    caller = optional_caller(request, authorization)
    if caller is None or not caller.may("admin", "metrics"):
        return JSONResponse({"ready": status == 200}, status_code=status)
    body = {
        "ready": status == 200,
        "writes": "read-only" if mode.mode == "read-only" else "direct" if direct else "queued" if queued else "unavailable",
        "mode": mode.as_json() | {"fleet": _fleet_mode(brownout.write_mode.operator_record)},
        "parts": {
            "database": "unchecked" if last is None else "healthy" if last["healthy"] else str(last["error_kind"]),
            "breaker": breaker.state.value,
            "redis": _redis_state(brownout.link is not None, redis),
            "rabbitmq": publisher or "not configured",
        },
        "reasons": reasons + (["authentication is disabled (BROWNOUT_AUTH=disabled)"] if brownout.authenticator.disabled else []),
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
    return JSONResponse(body, status_code=status)


def _fleet_mode(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The operator's record this process follows (None: none recorded, or Redis not reached yet)."""
    if record is None:
        return None
    return {"mode": record["mode"], "since": iso(record.get("since") or record["at"]), "seq": record["seq"]}


def _redis_state(configured: bool, ping: dict[str, Any]) -> str:
    if not configured:
        return "not configured"
    if ping["ok"]:
        return "ok"
    return "skipped" if ping.get("skipping") else "unreachable"
