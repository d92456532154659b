"""What Redis alone can answer is answered on the event loop: with every thread of the pool taken (a
process past its capacity, a database holding every worker thread), cached and stale reads still come
back, with the caller identified and its rate counted, while anything that needs a thread waits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio.to_thread
import httpx
import pytest

from brownout._settings import Settings
from brownout.fastapi._fast_reads import CachedRoutes
from tests.support.api_server import RunningApi, serve_in_thread

ADA = {"user_id": 7, "email": "ada@example.com", "subject": "On the loop", "body": "b"}


class HoldThreads:
    """Pure ASGI around the app: `POST /__hold` borrows every token of the thread pool's limiter (no
    sync route or dependency can start), `POST /__release` gives them back."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.borrowers: list[object] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in ("/__hold", "/__release"):
            await self.app(scope, receive, send)
            return
        limiter = anyio.to_thread.current_default_thread_limiter()
        if scope["path"] == "/__hold":
            while limiter.available_tokens >= 1:
                borrower = object()
                await limiter.acquire_on_behalf_of(borrower)
                self.borrowers.append(borrower)
        else:
            while self.borrowers:
                limiter.release_on_behalf_of(self.borrowers.pop())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(params=["fast path", "route"])
def held(request: pytest.FixtureRequest, api_settings: Callable[..., Settings]) -> Iterator[tuple[RunningApi, HoldThreads]]:
    """Served with the item read's fast path, or by its FastAPI route alone (on the loop too)."""
    holder: list[HoldThreads] = []

    def wrap(app: Any) -> HoldThreads:
        holder.append(HoldThreads(app))
        return holder[0]

    with serve_in_thread(api_settings(), wrap=wrap) as running:
        if request.param == "route":
            running.brownout.cached_routes = CachedRoutes()
        yield running, holder[0]
        running.client.post("/__release")


def _cached(api: RunningApi) -> str:
    """A notification whose entry is in Redis (written, then read once)."""
    created = api.client.post("/notifications", json=ADA)
    assert created.status_code == 201, created.text
    ident = str(created.json()["id"])
    assert api.client.get(f"/notifications/{ident}").status_code == 200
    return ident


def test_a_cache_hit_is_answered_while_every_thread_is_taken(held: tuple[RunningApi, HoldThreads]) -> None:
    api, holder = held
    ident, uncached = _cached(api), _cached(api)
    link = api.brownout.link
    assert link is not None
    link.client.delete(link.key("cache", "item", uncached))
    assert api.client.post("/__hold").status_code == 204 and holder.borrowers

    hit = api.client.get(f"/notifications/{ident}", timeout=5)
    assert hit.status_code == 200, hit.text
    assert hit.json()["id"] == ident and hit.json()["subject"] == ADA["subject"]
    assert hit.headers["cache-status"].startswith("Brownout; hit; ttl=")
    assert "x-brownout" not in hit.headers
    # The hold is real: a read that needs the database needs a thread, and waits for one.
    with pytest.raises(httpx.ReadTimeout):
        api.client.get(f"/notifications/{uncached}", timeout=1)
    anonymous = httpx.get(f"{api.url}/notifications/{ident}", timeout=5)
    assert anonymous.status_code == 401  # identified on the loop too: no credential, no answer


def test_a_stale_read_is_answered_on_the_loop_while_the_breaker_refuses(held: tuple[RunningApi, HoldThreads]) -> None:
    api, _ = held
    ident = _cached(api)
    link = api.brownout.link
    assert link is not None
    link.client.incr(link.key("gen", "item", ident))  # a write elsewhere: the entry is no longer fresh
    api.brownout.database.breaker.force_open()
    assert api.client.post("/__hold").status_code == 204

    stale = api.client.get(f"/notifications/{ident}", timeout=5)
    assert stale.status_code == 200, stale.text
    assert stale.headers["x-brownout"] == "stale"
    assert stale.headers["cache-status"].endswith("detail=database-unavailable")
    assert stale.json()["id"] == ident
