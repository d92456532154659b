"""Cached reads answered before FastAPI's routing: one Redis round trip, no thread pool, no FastAPI.

During an outage every read is a cache read, so this path's cost is the service's capacity exactly when it
matters, and FastAPI's request machinery alone (its middleware stack, routing, dependency solving) costs
a route answering from Redis about 40 % of a bare Starlette one's throughput (docs/architecture.md). So a
service declares its cached GET routes (`Brownout.cached_route`: how to name an item's keys, how to shape
its body for a caller) and this middleware answers what Redis alone can: the caller identified on the
loop, its rate counted and the entry, generation, epoch and extras read in one script, a fresh entry (or
a stale one while the database would not be asked) answered with the route's headers.

Everything else goes on to the route as if this middleware were not there: no credential or an invalid
one, a user token seen for the first time, a rate spent, Redis away, a miss, an entry past freshness with
the database up, a pending write over the item, another user's item, an id that does not parse. Every
error answer is therefore the route's own; the route stays the reference (OpenAPI, the tests compare
both). A request whose rate this middleware already spent carries its caller to the route
(`request.state.caller`), so it is never counted twice.

Written by hand because it is the hot path no framework offers: a pre-routing ASGI handler with a few
compiled patterns, as the admission gate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from brownout._auth.callers import Caller
from brownout._auth.keys import bearer
from brownout._cache.read_cache import parse_lookup
from brownout._cache.redis_link import RedisUnavailable
from brownout._cache.stale_reads import ReadResult
from brownout.fastapi._auth import Unauthenticated

if TYPE_CHECKING:
    from brownout.fastapi._brownout import Brownout

_PARAMETER = re.compile(r"\{([^{}:]+)\}")


class CachedRoute(Protocol):
    """How a cached GET route's answer is found in Redis and shaped for its caller."""

    def keys(self, params: Mapping[str, str]) -> tuple[tuple[str, str], tuple[str, ...]] | None:
        """The entry's (cache key, generation key) and the extra keys read with it (e.g. a pending mark), from
        the path's parameters as sent; None lets the route answer (an id that does not parse)."""

    def body(self, result: ReadResult, caller: Caller) -> Any | None:
        """The JSON body *caller* gets from *result* (its `extras` hold the extra keys' values); None lets the
        route answer (a pending write over the item, a caller who may not see it)."""


@dataclass(frozen=True)
class _Declared:
    path: str  # the template, as metrics label the route
    pattern: re.Pattern[str]
    route: CachedRoute


class CachedRoutes:
    """Path template -> CachedRoute, matched with one compiled pattern each (named groups for the parameters)."""

    def __init__(self) -> None:
        self._routes: list[_Declared] = []

    def __bool__(self) -> bool:
        return bool(self._routes)

    def declare(self, path: str, route: CachedRoute) -> None:
        if ":" in path:
            raise ValueError(f"cached routes take plain {{name}} parameters, not converters: {path!r}")
        parts, last = [], 0
        for found in _PARAMETER.finditer(path):
            parts += [re.escape(path[last : found.start()]), f"(?P<{found.group(1)}>[^/]+)"]
            last = found.end()
        parts.append(re.escape(path[last:]))
        self._routes = [declared for declared in self._routes if declared.path != path]
        self._routes.append(_Declared(path, re.compile("".join(parts)), route))

    def match(self, path: str) -> tuple[_Declared, dict[str, str]] | None:
        for declared in self._routes:
            found = declared.pattern.fullmatch(path)
            if found is not None:
                return declared, found.groupdict()
        return None


class FastReads:
    """Pure ASGI: a declared cached GET answered from Redis alone, or the request passed on untouched."""

    def __init__(self, app: ASGIApp, *, brownout: Brownout) -> None:
        self.app = app
        self.brownout = brownout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = self.brownout.cached_routes
        if scope["type"] == "http" and scope["method"] == "GET" and routes:
            found = routes.match(scope["path"])
            if found is not None and await self._answered(scope, send, *found):
                return
        await self.app(scope, receive, send)

    async def _answered(self, scope: Scope, send: Send, declared: _Declared, params: dict[str, str]) -> bool:
        brownout = self.brownout
        reads, cache, authenticator = brownout.reads_if_started, brownout.cache, brownout.authenticator
        if reads is None or cache is None:
            return False
        token = bearer(_header(scope, b"authorization"))
        try:
            caller = authenticator.identify_now(token)
        except Unauthenticated:  # no credential, or an invalid one: the route answers it (and counts the failure)
            return False
        if caller is None:  # a user token to verify: in the thread pool, by the route's dependency
            return False
        named = declared.route.keys(params)
        if named is None:
            return False
        (key, gen_key), extra = named
        limit = authenticator.rate_of(caller, "GET")
        if limit is None:
            try:
                lookup = await cache.alookup(key, gen_key, extra)
            except RedisUnavailable:
                return False
        else:
            wait, values = await authenticator.limiter.ahit_and_read(*limit, cache.lookup_keys(key, gen_key, extra))
            if wait is not None:  # refused: the route counts again and answers 429 in its own words
                return False
            if values is None:  # counted by this process alone (Redis away): the route must not count again
                _counted(scope, caller)
                return False
            lookup = parse_lookup(values)
        result = reads.answer(lookup, count=False)  # counted if served: else the route counts it
        body = None if result is None else declared.route.body(result, caller)
        if result is None or body is None:
            _counted(scope, caller)
            return False
        content = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        headers = [(b"content-length", str(len(content)).encode()), (b"content-type", b"application/json")]
        headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in result.headers().items()]
        reads.served(result)
        scope["route"] = declared  # what the metrics label the request with (`.path`, the template)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        return True


def _counted(scope: Scope, caller: Caller) -> None:
    """The route's caller dependency finds the caller identified and counted (starlette's `request.state`)."""
    scope.setdefault("state", {})["caller"] = caller


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
