"""Request count and time per route template, as pure ASGI (no per-request objects of ours).

The route template (`/orders/{order_id}`), never the path: ids would make
a label per item. Unmatched paths count as `unmatched`.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brownout._observability.metrics import Metrics

# RFC 9110's methods and PATCH: the only method labels; anything else a client sends counts as `other`.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


class HttpMetrics:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._bound: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            method = method if method in HTTP_METHODS else "other"  # a caller's invented method is no new series
            count, timing = self._series(method, route, status)
            count.inc()
            timing.observe(time.perf_counter() - started)

    def _series(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        """The request's counter and histogram, bound once per (method, route template, status): a bounded set
        (methods, the app's templates, statuses), where `labels()` is a locked lookup on every request."""
        key = (method, route, status)
        series = self._bound.get(key)
        if series is None:
            series = self._bound[key] = (
                self.metrics.http_requests.labels(method, route, str(status)),
                self.metrics.http_duration.labels(method, route),
            )
        return series
