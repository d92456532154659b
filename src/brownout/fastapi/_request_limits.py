"""Refuse an over-long query string (414) or header (431) before any work is done for the request.

uvicorn bounds a request's head as a whole (h11: 64 KB), well past what any route here needs; a
query string or a header this large only makes every layer after it (routing, validation, logs,
Sentry's scrubbing) pay for it. The bounds are per query string and per header, from the settings.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from brownout.fastapi._body_limit import refuse


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_query_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_query_bytes = max_query_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if len(scope.get("query_string", b"")) > self.max_query_bytes:
                await refuse(send, 414, f"query string longer than {self.max_query_bytes} bytes")
                return
            for name, value in scope.get("headers", ()):
                if len(name) + len(value) > self.max_header_bytes:
                    await refuse(send, 431, f"a request header is longer than {self.max_header_bytes} bytes")
                    return
        await self.app(scope, receive, send)
