"""The notification service's own errors, mapped to HTTP beside Brownout's (brownout.fastapi maps the rest).

NotFound              404
KeyReused             422 (Idempotency-Key reused with another body)
BadCursor             400
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.api.queries import BadCursor
from app.api.reads import NotFound
from app.api.writes import KeyReused


def install(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": "not found"}, status_code=404)

    @app.exception_handler(KeyReused)
    async def reused(request: Request, exc: KeyReused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(BadCursor)
    async def bad_cursor(request: Request, exc: BadCursor) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)
