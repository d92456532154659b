"""The read bench's peer: a cached read with nothing but Starlette and one Redis GET.

`uvicorn --factory bench.readkit.peer:create_app`, served by bench/read_path.py with the same uvicorn flags as
Brownout's web process. One route, `GET /notifications/{id}`: the bytes stored in Redis ($REDIS_URL) under
`$READ_PEER_KEY_PREFIX{id}`, answered as application/json, 404 when the key is missing. One `redis.asyncio`
client, built at start-up; nothing else: no authentication, limits, metrics or checks, nothing tuned.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

NOT_FOUND = b'{"detail":"Not Found"}'


def create_app() -> Starlette:
    prefix = os.environ.get("READ_PEER_KEY_PREFIX", "")

    async def notification(request: Request) -> Response:
        body = await request.app.state.redis.get(prefix + request.path_params["id"])
        if body is None:
            return Response(NOT_FOUND, status_code=404, media_type="application/json")
        return Response(body, media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.redis = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        try:
            yield
        finally:
            await app.state.redis.aclose()

    return Starlette(routes=[Route("/notifications/{id}", notification)], lifespan=lifespan)
