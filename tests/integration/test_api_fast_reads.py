"""Cached reads answered before FastAPI's routing (brownout.fastapi's fast reads) answer exactly as the
route does, hand everything else to the route, and count each caller's read once, whichever answers.
Real PostgreSQL, Redis and RabbitMQ; the app's own CachedRoute, watched (it delegates) to tell which
path answered."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from brownout import ReadResult
from brownout._settings import Settings
from brownout.fastapi import CachedRoute, Caller
from brownout.fastapi._fast_reads import CachedRoutes
from tests.support.api_server import RunningApi, serve_in_thread
from tests.support.jwt_issuer import SECRET, mint_hs256, supabase_claims

PATH = "/notifications/{notification_id}"


class Watched:
    """The app's CachedRoute, delegated to; counts the bodies it gave (each one an answer of the fast path)."""

    def __init__(self, route: CachedRoute) -> None:
        self.route = route
        self.answered = 0

    def keys(self, params: Mapping[str, str]) -> tuple[tuple[str, str], tuple[str, ...]] | None:
        return self.route.keys(params)

    def body(self, result: ReadResult, caller: Caller) -> Any | None:
        body = self.route.body(result, caller)
        self.answered += body is not None
        return body


def serve(
    api_settings: Callable[..., Settings], *, wrap: Callable[[FastAPI], Any] | None = None, **overrides: Any
) -> Iterator[tuple[RunningApi, Watched]]:
    with serve_in_thread(api_settings(jwt_secret=SECRET, **overrides), wrap=wrap) as api:
        declared = api.brownout.cached_routes.match(f"/notifications/{uuid.uuid4()}")
        assert declared is not None, "the app declares its item read cached"
        watched = Watched(declared[0].route)
        api.brownout.cached_route(PATH, watched)
        yield api, watched


@pytest.fixture
def fast(api_settings: Callable[..., Settings]) -> Iterator[tuple[RunningApi, Watched]]:
    yield from serve(api_settings)


def user_token(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(supabase_claims(time.time(), sub=user_id))}"}


def create(api: RunningApi, user_id: str = "7") -> str:
    created = api.client.post(
        "/notifications", json={"user_id": user_id, "email": "ada@example.com", "subject": "s", "body": "b"}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def comparable(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    """Status, body and the headers that say what was served (Age and ttl move with the clock)."""
    headers = {name: value for name, value in response.headers.items() if name not in ("date", "age")}
    if "cache-status" in headers:
        headers["cache-status"] = headers["cache-status"].split("; ttl=")[0]
    return response.status_code, response.json(), headers


def test_the_fast_path_answers_what_the_route_answers(fast: tuple[RunningApi, Watched]) -> None:
    api, watched = fast
    user = str(uuid.uuid4())
    ident = create(api, user)
    token = user_token(user)
    first = api.client.get(f"/notifications/{ident}", headers=token)
    assert first.status_code == 200 and watched.answered == 0  # a token seen for the first time: the route verifies it
    as_service = api.client.get(f"/notifications/{ident}")
    as_user = api.client.get(f"/notifications/{ident}", headers=token)
    assert watched.answered == 2
    routes = api.brownout.cached_routes
    api.brownout.cached_routes = CachedRoutes()  # the route alone
    try:
        assert comparable(api.client.get(f"/notifications/{ident}")) == comparable(as_service)
        assert comparable(api.client.get(f"/notifications/{ident}", headers=token)) == comparable(as_user)
    finally:
        api.brownout.cached_routes = routes
    assert as_service.status_code == 200 and as_service.headers["cache-status"].startswith("Brownout; hit; ttl=")
    assert as_service.json()["user_id"] == user and "read_stamp" not in as_service.json()


def test_what_the_fast_path_declines_the_route_answers(fast: tuple[RunningApi, Watched]) -> None:
    api, watched = fast
    ident = create(api, "7")
    assert api.client.get(f"/notifications/{ident}").status_code == 200 and watched.answered == 1

    anonymous = httpx.get(f"{api.url}/notifications/{ident}", timeout=5)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    others = user_token("8")
    assert api.client.get(f"/notifications/{ident}", headers=others).status_code == 404  # verified by the route
    again = api.client.get(f"/notifications/{ident}", headers=others)  # now identified at once: the fast path declines
    assert again.status_code == 404  # another user's: as if it did not exist
    spelled = api.client.get(f"/notifications/{ident.upper()}")
    assert spelled.status_code == 200 and spelled.json()["id"] == ident  # the route's own validation
    assert api.client.get("/notifications/not-a-uuid").status_code == 422
    assert watched.answered == 1

    api.brownout.database.breaker.force_open()
    assert api.client.post(f"/notifications/{ident}/read").status_code == 202
    hits = hits_counted(api)
    marked = api.client.get(f"/notifications/{ident}")  # a pending mark over the entry: the route overlays it
    assert marked.status_code == 200 and (marked.json()["read"], marked.json()["status"]) == (True, "pending")
    assert watched.answered == 1
    assert hits_counted(api) == hits + 1  # one read, one count: the fast path counts only what it serves


class TenantGuard:
    """A service's own middleware: no `X-Tenant` header, 403."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not any(name == b"x-tenant" for name, _ in scope["headers"]):
            await PlainTextResponse("no tenant", status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


@pytest.mark.parametrize("added", ["before init_app", "after init_app"])
def test_a_service_s_own_middleware_sees_every_cached_read(api_settings: Callable[..., Settings], added: str) -> None:
    """Fast reads answer just before routing, inside every middleware of the service's, wherever it was added
    (before init_app, such a middleware sat inside Brownout's and a cached read went around it)."""

    def guarded(app: FastAPI) -> FastAPI:
        if added == "after init_app":
            app.add_middleware(TenantGuard)
        else:  # innermost of the middleware list: where add_middleware put it before init_app added Brownout's
            app.user_middleware.append(Middleware(TenantGuard))
        return app

    for api, watched in serve(api_settings, wrap=guarded):
        created = api.client.post(
            "/notifications",
            json={"user_id": "7", "email": "ada@example.com", "subject": "s", "body": "b"},
            headers={"X-Tenant": "t"},
        )
        assert created.status_code == 201, created.text
        ident = created.json()["id"]
        assert api.client.get(f"/notifications/{ident}", headers={"X-Tenant": "t"}).status_code == 200
        assert watched.answered == 1  # a cached read, answered by the fast path behind the guard
        refused = api.client.get(f"/notifications/{ident}")
        assert (refused.status_code, refused.text) == (403, "no tenant")
        assert watched.answered == 1


def hits_counted(api: RunningApi) -> float:
    return api.brownout.metrics.registry.get_sample_value("brownout_cache_reads_total", {"result": "hit"}) or 0.0


def test_a_read_is_counted_once_whichever_path_answers(api_settings: Callable[..., Settings]) -> None:
    for api, watched in serve(api_settings, rate_limit_reads="3/minute"):
        ident = create(api)
        link = api.brownout.link
        assert link is not None
        link.client.delete(link.key("cache", "item", ident))
        # A miss: the fast path counts it, then hands it to the route, which must not count it again.
        assert api.client.get(f"/notifications/{ident}").status_code == 200 and watched.answered == 0
        assert api.client.get(f"/notifications/{ident}").status_code == 200 and watched.answered == 1
        assert api.client.get(f"/notifications/{ident}").status_code == 200 and watched.answered == 2
        refused = api.client.get(f"/notifications/{ident}")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "rate limit" in refused.json()["detail"]
