"""Refuse an over-long query string (414) or header (431) before any work is done for the request.

The head as a whole is bounded before it reaches the app, by the web's HTTP protocol
(BROWNOUT_MAX_HEAD_BYTES, 64 KiB by default: `_head_limit.py`; uvicorn's httptools parser has no
bound of its own), well past what any route here needs; a query string or a header that large
only makes every layer after it (routing, validation, logs, Sentry's scrubbing) pay for it. The
bounds here are per query string and per header, from the settings. An app served otherwise
(uvicorn started by hand, another server) has only its server's bound on the head.
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
