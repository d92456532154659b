"""The admission gate (src/brownout/_admission.py) as pure ASGI, and the event-loop probe that moves its limit.

The gate runs before routing, the body, the caller's identity, the thread pool and Starlette's own
middleware (Brownout.init_app puts it around the built stack), so a refusal is one small 503 written on
the event loop. It cannot ask FastAPI which route a request will reach (routing
is FastAPI's, and its internals change between releases), so routes that are not critical are
declared by method and path template (`Brownout.criticality`) and matched here: a dict for plain paths,
a few compiled patterns for templated ones; anything undeclared is critical.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Receive, Scope, Send

from brownout._admission import (
    AdmissionControl,
    Criticality,
    Verdict,
    restore,
    shed_database_work,
)
from brownout._observability.metrics import Metrics

RETRY_AFTER_SECONDS = 1
_REFUSAL_BODY = json.dumps({"detail": "overloaded", "retry_after": RETRY_AFTER_SECONDS}).encode()
_REFUSAL_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_REFUSAL_BODY)).encode()),
    (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
]
_PARAMETER = re.compile(r"\{([^{}:]+)(?::path)?\}")
Level = tuple[Criticality, bool]  # (criticality, served from the cache)
CRITICAL: Level = (Criticality.CRITICAL, False)


class CriticalityTable:
    """Method and path template -> (criticality, cached); undeclared routes are critical."""

    def __init__(self) -> None:
        self._exact: dict[tuple[str, str], Level] = {}
        self._patterns: dict[str, list[tuple[re.Pattern[str], Level]]] = {}

    def declare(self, method: str, path: str, level: Criticality | str, *, cached: bool = False) -> None:
        """*path*: the route's template as declared (`/users/{user_id}/orders`); `{name:path}` spans slashes."""
        entry = (Criticality(level), cached)
        methods = [method.upper()] + (["HEAD"] if method.upper() == "GET" else [])
        for name in methods:
            if "{" not in path:
                self._exact[(name, path)] = entry
            else:
                self._patterns.setdefault(name, []).append((_compile(path), entry))

    def classify(self, method: str, path: str) -> Level:
        entry = self._exact.get((method, path))
        if entry is not None:
            return entry
        for pattern, entry in self._patterns.get(method, ()):
            if pattern.fullmatch(path):
                return entry
        return CRITICAL


def _compile(template: str) -> re.Pattern[str]:
    parts, last = [], 0
    for found in _PARAMETER.finditer(template):
        parts.append(re.escape(template[last : found.start()]))
        parts.append(".+" if found.group(0).endswith(":path}") else "[^/]+")
        last = found.end()
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts))


class AdmissionGate:
    """Admit, admit with the database shed, or refuse at once (pure ASGI middleware)."""

    def __init__(self, app: ASGIApp, *, control: AdmissionControl, table: CriticalityTable, metrics: Metrics) -> None:
        self.app = app
        self.control = control
        self.table = table
        # Bound once: a refusal is the cheapest answer the process gives, and labels() is a locked lookup.
        self._shed = {
            (level, outcome): metrics.admission_shed.labels(level.value, outcome)
            for level in Criticality
            if level is not Criticality.EXEMPT
            for outcome in ("refused", "cache_only")
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        level, cached = self.table.classify(scope["method"], scope["path"])
        if level is Criticality.EXEMPT:
            await self.app(scope, receive, send)
            return
        verdict = self.control.admit(level, cached=cached)
        if verdict is Verdict.REFUSE:
            self._shed[level, "refused"].inc()
            await send({"type": "http.response.start", "status": 503, "headers": _REFUSAL_HEADERS})
            await send({"type": "http.response.body", "body": _REFUSAL_BODY})
            return
        token = None
        if verdict is Verdict.CACHE_ONLY:
            self._shed[level, "cache_only"].inc()
            token = shed_database_work()
        admitted_at = self.control.clock()
        try:
            await self.app(scope, receive, send)
        finally:
            self.control.done(admitted_at)
            if token is not None:
                restore(token)


class ThreadLag:
    """How late a plain thread wakes from a sleep: what a route's thread waits for the GIL between two steps.

    The event loop alone understates it: with uvloop the loop runs mostly outside the interpreter and gets
    the GIL back quickly, while 32 route threads queue for it behind each other (a request's every Redis
    or database reply is read only once its thread holds the GIL again). The worst lag since the loop last
    asked is kept; plain attribute writes from one thread, read from another."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="brownout-admission-thread-probe", daemon=True)

    def start(self) -> ThreadLag:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            if self._stop.wait(self.tick):
                return
            self.worst = max(self.worst, time.monotonic() - started - self.tick)


@contextlib.asynccontextmanager
async def lag_probe(control: AdmissionControl) -> AsyncIterator[None]:
    """Measure the event loop's and a thread's lag every tick and feed the larger to the limit, while the app runs."""
    tick = control.settings.tick
    threads = ThreadLag(tick).start()

    async def probe() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(tick)
            control.observe_lag(max(time.monotonic() - started - tick, threads.take()))

    task = asyncio.create_task(probe(), name="brownout-admission-lag-probe")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        threads.stop()
