"""The errors Brownout's own pieces raise, mapped to HTTP in one place; no stack trace ever leaves.

DatabaseUnavailable    503 + Retry-After (a read the database cannot answer now, with nothing cached;
                       "overloaded" when admission control let it in on condition of using the cache alone)
CircuitOpenError       503 + Retry-After (a database call of the service's own the breaker refused)
DeadlineExceeded       503 + Retry-After: 1 (its deadline spent)
CommitOutcomeUnknown   503 + Retry-After: 1 (the link died during COMMIT: retry with the same idempotency key)
a transient database error that escaped the retries (a lost link, a deadlock, a full pool): 503 + Retry-After: 1
Shed                   503 + Retry-After (a non-critical route while the breaker is not CLOSED)
ReadOnlyMode           503 + Retry-After, {"detail": "read-only mode", "reason", "since", "retry_after"}
                       (a write while the service is read-only: nothing kept, the same key is a new write later)
InvalidCommand         422 with field and reason
KeyConflict            422 (an Idempotency-Key reused with another body; recorded, not applied)
UnknownCommand         422
DependencyMissing      404 (a write of an entity that neither exists nor is being created; not queued)
NotPermitted           404 (a write of an entity not the caller's: the same answer, its existence not revealed)
Refused                422 {"detail": reason} (an apply found the write's data breaks a rule; nothing recorded)
BodyTooLarge           413
RequestValidationError 422 with field and reason
anything else          500 {"detail": "internal error"} (logged with its trace, server side)

A service adds handlers for its own errors beside these (FastAPI's `exception_handler`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import psycopg2
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from brownout._cache.stale_reads import SHED_REASON, DatabaseUnavailable
from brownout._db.errors import CircuitOpenError, CommitOutcomeUnknown, DeadlineExceeded, classify, describe
from brownout._dispatch.apply import KeyConflict
from brownout._dispatch.commands import DependencyMissing, NotPermitted, Refused, UnknownCommand
from brownout._dispatch.dispatcher import InvalidCommand
from brownout._fleet.read_only import ReadOnlyMode, iso
from brownout.fastapi._body_limit import BodyTooLarge

log = logging.getLogger(__name__)


class Shed(Exception):
    """Raised by a non-critical route while the breaker is not CLOSED: the database serves critical work first."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__("non-critical route shed while the database recovers")


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def field_errors(errors: list[Any]) -> list[dict[str, str]]:
    out = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        out.append({"field": ".".join(loc) or "body", "reason": str(error.get("msg", "invalid"))})
    return out


# Errors answered with their own text as the detail. NotPermitted says what DependencyMissing says (404):
# another user's notification must not be told apart from one that does not exist.
_PLAIN_STATUS: dict[type[Exception], int] = {KeyConflict: 422, UnknownCommand: 422, DependencyMissing: 404, NotPermitted: 404}


def install(app: FastAPI) -> None:
    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        if exc.reason == SHED_REASON:  # a read admitted past the limit on condition of using the cache alone
            body: dict[str, Any] = {"detail": "overloaded", "retry_after": math.ceil(exc.retry_after)}
        else:
            body = {"detail": f"database unavailable and nothing cached: {exc.reason}"}
        return JSONResponse(body, status_code=503, headers=retry_after_header(exc.retry_after))

    @app.exception_handler(CircuitOpenError)
    async def breaker_open(request: Request, exc: CircuitOpenError) -> JSONResponse:
        return _database_unavailable("circuit breaker open", exc.retry_after)

    @app.exception_handler(DeadlineExceeded)
    async def deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        return _database_unavailable("deadline exceeded", 1)

    @app.exception_handler(CommitOutcomeUnknown)
    async def outcome_unknown(request: Request, exc: CommitOutcomeUnknown) -> JSONResponse:
        detail = "outcome unknown: the write may have been applied; retry with the same Idempotency-Key"
        return JSONResponse({"detail": detail}, status_code=503, headers=retry_after_header(1))

    @app.exception_handler(Shed)
    async def shed(request: Request, exc: Shed) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=retry_after_header(exc.retry_after))

    @app.exception_handler(ReadOnlyMode)
    async def read_only(request: Request, exc: ReadOnlyMode) -> JSONResponse:
        headers = retry_after_header(exc.retry_after)
        body = {"detail": str(exc), "reason": exc.reason, "since": iso(exc.since), "retry_after": int(headers["Retry-After"])}
        return JSONResponse(body, status_code=503, headers=headers)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=422)

    @app.exception_handler(InvalidCommand)
    async def invalid(request: Request, exc: InvalidCommand) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": field_errors(exc.errors)}, status_code=422)

    async def plain(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_PLAIN_STATUS[type(exc)])

    for error in _PLAIN_STATUS:
        app.add_exception_handler(error, plain)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413, headers={"Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "invalid request", "errors": field_errors(list(exc.errors()))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps body-reading errors in a 400
            return await too_large(request, exc.__cause__)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        if not classify(exc).is_transient:  # bad SQL, a constraint: a bug of the caller's
            return await internal(request, exc)
        # The service's own call, past its retries or without them, on a sick database: a retry may succeed.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, describe(exc))
        return _database_unavailable("retry later", 1)

    for driver_error in (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError, psycopg2.Error):
        app.add_exception_handler(driver_error, database_error)


def _database_unavailable(reason: str, retry_after: float) -> JSONResponse:
    return JSONResponse({"detail": f"database unavailable: {reason}"}, status_code=503, headers=retry_after_header(retry_after))
