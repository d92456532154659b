"""Sentry, only when SENTRY_DSN is set: FastAPI, SQLAlchemy and Dramatiq integrations, and one event per
incident (disconnect burst, breaker opening, dead letter: incident_events.py), grouped and rate-limited.

Every event is tagged with the database breaker's state (an error while the
breaker is open reads differently). What never leaves for Sentry:

- request bodies and Dramatiq message payloads (addresses, subjects, bodies):
  `max_request_body_size="never"` keeps the Starlette and Dramatiq integrations
  from attaching them (they do even with `send_default_pii=False`), and
  `before_send` drops them again as a second line;
- local variables of stack frames (a payload is a local somewhere);
- cookies, auth headers and any field named like a password, token or secret;
- passwords and tokens in URLs or `password=` text anywhere in the event or a
  breadcrumb, and the local part of email addresses (`***@example.com`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.dramatiq import DramatiqIntegration
from sentry_sdk.integrations.fastapi import FastApiIntegration
from sentry_sdk.integrations.logging import ignore_logger
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration
from sentry_sdk.integrations.starlette import StarletteIntegration

from brownout._db import CircuitBreaker
from brownout._observability import incident_events
from brownout._observability.log_masking import install_log_masking
from brownout._redaction import redact
from brownout._settings import Settings

SECRET_HEADERS = {"authorization", "cookie", "x-api-key", "proxy-authorization"}


BreakerSource = CircuitBreaker | Callable[[], CircuitBreaker | None] | None


def init_sentry(settings: Settings, *, breaker: BreakerSource = None, transport: Any = None, component: str = "web") -> bool:
    """Initialise Sentry if SENTRY_DSN is set; return whether it was.

    *breaker*: the process's breaker, or a function returning it (once built). *transport*: tests only."""
    if settings.sentry_dsn is None:
        incident_events.disable()
        return False
    install_log_masking()  # log records become events and breadcrumbs: masked where they are made
    options: dict[str, Any] = {}
    if transport is not None:
        options["transport"] = transport
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.sentry_environment,
        send_default_pii=False,
        max_request_body_size="never",
        include_local_variables=False,
        integrations=[StarletteIntegration(), FastApiIntegration(), SqlalchemyIntegration(), DramatiqIntegration()],
        before_send=scrubber(breaker),  # type: ignore[arg-type]
        before_breadcrumb=lambda crumb, hint: _scrub(crumb),
        **options,
    )
    sentry_sdk.set_tag("component", component)
    ignore_logger(incident_events.DEAD_LETTER_LOGGER)  # a dead letter's event is its incident event, reason summarised
    incident_events.enable(interval_seconds=settings.sentry_incident_interval_seconds, component=component)
    return True


def scrubber(breaker: BreakerSource) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        current = breaker() if callable(breaker) and not isinstance(breaker, CircuitBreaker) else breaker
        if current is not None:
            event.setdefault("tags", {})["breaker"] = current.state.value
        request = event.get("request")
        if isinstance(request, dict):
            for personal in ("data", "cookies"):
                request.pop(personal, None)
            if isinstance(request.get("headers"), dict):
                request["headers"] = {
                    name: ("[Filtered]" if name.lower() in SECRET_HEADERS else value)
                    for name, value in request["headers"].items()
                }
        dramatiq_context = event.get("contexts", {}).get("dramatiq")
        if isinstance(dramatiq_context, dict):
            dramatiq_context.pop("data", None)  # the whole message: an email job holds address, subject and body
        _drop_frame_variables(event)
        scrubbed: dict[str, Any] = _scrub(event)
        return scrubbed

    return before_send


def _scrub(value: Any) -> Any:
    """Mask passwords in every string of the event (URLs in messages, exception values, variables)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: ("[Filtered]" if _secret_key(key) else _scrub(item)) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def _drop_frame_variables(event: dict[str, Any]) -> None:
    for exception in (event.get("exception") or {}).get("values") or []:
        for frame in (exception.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    for thread in (event.get("threads") or {}).get("values") or []:
        for frame in (thread.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and any(word in key.lower() for word in ("password", "token", "secret", "dsn"))
