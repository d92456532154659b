"""Sentry events for incidents: one per incident, never one per failed call.

Sentry's logging integration makes an event of each ERROR record, so a long
outage was either nothing (disconnects and breaker transitions log at WARNING)
or an event per failed call. The incidents an operator wants to hear of are
reported here instead, each as one event:

- a **disconnect burst** (src/brownout/_db/incidents.py): once it is over, with
  the connections it cost and its kind (`ssl`: "SSL connection has been closed
  unexpectedly", or `disconnect`);
- the **breaker opening** on this process's own failures: scope `process`, or
  `fleet` when this process's failure was the one that opened the breaker
  shared through Redis (the processes that hear of it send nothing);
- a **write dead-lettered** (the worker): its reason in Brownout's words and the
  command's name and id, never its payload.

Each has a fixed fingerprint (`["brownout", <incident>, <kind>]`), so one kind
of incident is one Sentry issue, and a limit per process: at most one event per
fingerprint per `BROWNOUT_SENTRY_INCIDENT_INTERVAL_SECONDS`, the events held
back counted and carried by the next one sent (`suppressed`).

Callers are the database layer and the worker, on a request's or a message's
thread, so everything here is cheap and nothing raises. Until `init_sentry`
enables it (SENTRY_DSN set), each report returns after one check of a module
variable (not even sentry_sdk is imported here); once enabled, `before_send` (sentry.py) scrubs
the event like any other and sentry_sdk's transport sends it from its own
thread. Events are captured in a scope of their own: an incident is the
process's, not the request's or the message's that met it, whose breadcrumbs
and request data have nothing to say about it and may hold personal data.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brownout._db.incidents import DisconnectBurst

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 600.0
DEAD_LETTER_LOGGER = "brownout.dead_letters"
"""The logger of the line a dead letter writes, which quotes its whole reason: a log line only (sentry.py
tells Sentry's logging integration to ignore it), its Sentry event is `write_dead_lettered`'s."""

_MAX_FINGERPRINTS = 512  # dead letters are fingerprinted by command name: bounded by the registry, but not by us
_MAX_TAG = 200  # Sentry's limit on a tag's value
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class FingerprintLimiter:
    """At most one event per fingerprint per *interval_seconds*; those held back are counted for the next one."""

    def __init__(
        self, interval_seconds: float = DEFAULT_INTERVAL_SECONDS, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._sent_at: dict[tuple[str, ...], float] = {}
        self._held: dict[tuple[str, ...], int] = {}

    def admit(self, fingerprint: tuple[str, ...]) -> int | None:
        """None when an event of *fingerprint* went out less than the interval ago (this one is counted);
        else how many were held back since that one, and this one may go."""
        with self._lock:
            now = self._clock()
            last = self._sent_at.get(fingerprint)
            if last is not None and now - last < self.interval_seconds:
                self._held[fingerprint] = self._held.get(fingerprint, 0) + 1
                return None
            if last is None and len(self._sent_at) >= _MAX_FINGERPRINTS:
                oldest = min(self._sent_at, key=self._sent_at.__getitem__)
                del self._sent_at[oldest]
                self._held.pop(oldest, None)
            self._sent_at[fingerprint] = now
            return self._held.pop(fingerprint, 0)


class IncidentEvents:
    """Builds each incident's event and sends it through sentry_sdk, within the limit."""

    def __init__(self, limiter: FingerprintLimiter, *, component: str) -> None:
        self.limiter = limiter
        self.component = component

    def send(self, incident: str, kind: str, message: str, *, level: str, tags: dict[str, str], extra: dict[str, Any]) -> bool:
        """Capture one event fingerprinted ("brownout", *incident*, *kind*); False when the limit held it back."""
        fingerprint = ("brownout", incident, kind)
        suppressed = self.limiter.admit(fingerprint)
        if suppressed is None:
            return False
        import sentry_sdk
        from sentry_sdk.scope import Scope, ScopeType, use_isolation_scope, use_scope

        event: dict[str, Any] = {
            "message": message,
            "level": level,
            "logger": "brownout.incidents",
            "fingerprint": list(fingerprint),
            "tags": {"component": self.component, "incident": incident} | {k: v[:_MAX_TAG] for k, v in tags.items()},
            "extra": extra | {"suppressed": suppressed, "limit_seconds": self.limiter.interval_seconds},
        }
        with use_isolation_scope(Scope(ty=ScopeType.ISOLATION)), use_scope(Scope(ty=ScopeType.CURRENT)):
            sentry_sdk.capture_event(event)  # type: ignore[arg-type]  # a plain dict for sentry_sdk's Event TypedDict
        return True


_events: IncidentEvents | None = None


def enable(
    *, interval_seconds: float = DEFAULT_INTERVAL_SECONDS, component: str, clock: Callable[[], float] = time.monotonic
) -> None:
    """Report incidents to the Sentry sentry_sdk was initialised with (`init_sentry`); *clock*: tests only."""
    global _events  # noqa: PLW0603 - one reporter per process, as there is one Sentry client
    _events = IncidentEvents(FingerprintLimiter(interval_seconds, clock=clock), component=component)


def disable() -> None:
    global _events  # noqa: PLW0603 - see enable()
    _events = None


def active() -> bool:
    """True when an incident would be reported: enabled, and sentry_sdk has a client that sends."""
    if _events is None:
        return False
    import sentry_sdk

    client = sentry_sdk.get_client()
    return client.is_active() and client.transport is not None


def disconnect_burst(burst: DisconnectBurst) -> bool:
    """A disconnect burst is over: one event with the connections it cost (none when it cost none)."""
    if burst.connections == 0:
        return False  # a failed connect alone: the database unreachable, which the breaker's event tells
    title = "SSL connections to the database closed unexpectedly" if burst.kind == "ssl" else "Database connections dropped"
    return _report(
        "disconnect-burst",
        burst.kind,
        title,
        level="warning",
        tags={"error_kind": burst.kind},
        extra={"connections": burst.connections, "slow_connects_excused": burst.slow_connects},
    )


def breaker_opened(*, breaker: str, kind: str, scope: str, failure_threshold: int, open_seconds: float) -> bool:
    """This process's failure of *kind* opened the breaker: its own (*scope* "process") or the fleet's ("fleet")."""
    return _report(
        "breaker-open",
        kind,
        f"Database circuit breaker opened on {kind} failures",
        level="error",
        tags={"error_kind": kind, "scope": scope, "breaker": breaker},
        extra={"failure_threshold": failure_threshold, "open_seconds": open_seconds},
    )


def write_dead_lettered(*, command: str | None, command_id: str, actor: str, reason: str, dead_letter_id: int) -> bool:
    """A write was kept as a dead letter. *reason*: Brownout's own words only (`reason_summary`), never the
    driver's, validator's or SMTP server's, which quote the payload; *command*: its name, checked to look like one
    (a message that does not validate can hold anything there)."""
    kind = command if command is not None and _NAME.fullmatch(command) else actor
    return _report(
        "dead-letter",
        kind,
        f"Write dead-lettered: {kind}",
        level="error",
        tags={"command": kind, "actor": actor, "reason": reason},
        extra={"command_id": command_id, "dead_letter_id": dead_letter_id, "reason": reason},
    )


def _report(incident: str, kind: str, message: str, *, level: str, tags: dict[str, str], extra: dict[str, Any]) -> bool:
    try:
        events = _events
        if events is None or not active():
            return False
        return events.send(incident, kind, message, level=level, tags=tags, extra=extra)
    except Exception:  # never into the caller's path: a report is worth less than the call that made it
        log.warning("Sentry event for a %s incident not sent", incident, exc_info=True)
        return False
