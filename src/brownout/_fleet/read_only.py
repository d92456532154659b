"""Read-only mode: writes refused up front, reads served, the worker's drain held.

A process is read-only while either says so:

- the operator, for the whole fleet: `POST /admin/mode` records `read-only` or `read-write` in the fleet's
  `mode` override record (src/brownout/_fleet/override_record.py), which every web and worker process
  follows within `BROWNOUT_OVERRIDE_POLL_SECONDS`, and a process started later follows at start;
- the process's own setting, `BROWNOUT_READ_ONLY=true`: the operator's `read-write` does not lift it (a
  deployment that says "this process never writes" is not overruled from a route); the setting wins.

Automatic read-only is a state reported, not a decision: while the database is refused (the breaker not
closed) and the queue cannot take a write either (the publisher not ready, or the queue full), no write can
be made durable, and /ready and `brownout_mode` say `read-only` with reason `automatic`, so an operator
sees one state whatever put the service there. Writes still take their usual path then (a 503 from the
dispatcher when neither can take them; a write the database or queue takes again is accepted).

The mode is checked once per write, in `Dispatcher.accept`, before anything is derived, recorded, applied or
queued. A write that passed the check before the switch completes normally (applied, or queued and then held
by the worker until read-write): it was accepted, so it is never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from brownout._settings import Settings

log = logging.getLogger("brownout.degraded")

Mode = Literal["read-write", "read-only"]
Reason = Literal["operator", "setting", "automatic"]
MODES: tuple[Mode, ...] = ("read-write", "read-only")
METRIC_STATES = ("read-write", "read-only", "read-only-automatic")
"""The states of `brownout_mode` (a prometheus_client Enum): the first is the default."""

RETRY_AFTER_SECONDS = 30.0
"""Retry-After of a write refused in read-only mode: an operator's mode has no known end, and a retry every
second from every client would be load for nothing."""


def iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


class ReadOnlyMode(Exception):
    """Raised by `Dispatcher.accept` while the service is read-only: nothing was recorded, applied or queued,
    so the same Idempotency-Key is an ordinary write once the mode ends (HTTP 503 + Retry-After)."""

    def __init__(self, reason: Reason, since: float | None, retry_after: float = RETRY_AFTER_SECONDS) -> None:
        self.reason = reason
        self.since = since
        self.retry_after = retry_after
        super().__init__("read-only mode")


@dataclass(frozen=True)
class ModeState:
    mode: Mode
    reason: Reason | None
    """Why read-only (None while read-write)."""
    since: float | None
    """Wall-clock time this state began: the operator's record, the process's start for the setting, the
    moment this process saw the automatic state."""

    @property
    def metric_state(self) -> str:
        if self.mode == "read-write":
            return "read-write"
        return "read-only-automatic" if self.reason == "automatic" else "read-only"

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "since": iso(self.since)}


class WriteMode:
    """This process's write mode (see the module docstring); thread-safe, and cheap to ask on every write.

    *setting*: BROWNOUT_READ_ONLY. *automatic*: asked by `watch()`, True while no write can be made durable
    (the web's database and queue; the worker has none to ask)."""

    def __init__(
        self,
        *,
        setting: bool = False,
        automatic: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._automatic_probe = automatic
        self._started = clock()
        self._setting = setting
        self._operator: dict[str, Any] | None = None
        self._automatic_since: float | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[ModeState], None]] = []
        self._state = self._decide()
        if self._state.mode == "read-only":
            self._log_entered(self._state)

    @classmethod
    def from_settings(cls, settings: Settings, *, automatic: Callable[[], bool] | None = None) -> WriteMode:
        return cls(setting=settings.read_only, automatic=automatic)

    # -- asked on every write: no lock, no I/O --------------------------------------

    @property
    def refusing(self) -> bool:
        """True while writes are refused (the operator's mode or the setting; never the automatic state)."""
        state = self._state
        return state.mode == "read-only" and state.reason != "automatic"

    def check(self) -> None:
        """Raise ReadOnlyMode while writes are refused."""
        state = self._state
        if state.mode == "read-only" and state.reason != "automatic":
            raise ReadOnlyMode(state.reason or "operator", state.since)

    @property
    def state(self) -> ModeState:
        """The state as last decided (the automatic part as of the last `watch()`)."""
        return self._state

    @property
    def operator_record(self) -> dict[str, Any] | None:
        """The fleet's record this process follows (None: none seen yet)."""
        return self._operator

    # -- changes ------------------------------------------------------------------

    def follow(self, record: dict[str, Any]) -> None:
        """The fleet's `mode` override record (a new one: OverrideRecord tells each once)."""
        if record.get("mode") not in MODES:
            log.error(
                "read-only mode: fleet record #%s names no mode this release knows (%r): ignored", record.get("seq"), record
            )
            return
        with self._lock:
            self._operator = record
            self._settle()

    def watch(self) -> ModeState:
        """Ask the automatic probe again (a poll, /ready, a scrape) and return the state."""
        probe = self._automatic_probe
        blocked = False
        if probe is not None:
            try:
                blocked = bool(probe())
            except Exception:
                log.exception("read-only mode: the automatic check failed")
        with self._lock:
            if blocked and self._automatic_since is None:
                self._automatic_since = self._clock()
            elif not blocked:
                self._automatic_since = None
            self._settle()
        return self._state

    def add_listener(self, listener: Callable[[ModeState], None]) -> None:
        """Tell *listener* the current state now and every new state after (a metric, the worker's gate)."""
        self._listeners.append(listener)
        listener(self._state)

    def _decide(self) -> ModeState:
        operator = self._operator
        if self._setting:
            return ModeState("read-only", "setting", self._started)
        if operator is not None and operator["mode"] == "read-only":
            return ModeState("read-only", "operator", _since(operator))
        if self._automatic_since is not None:
            return ModeState("read-only", "automatic", self._automatic_since)
        return ModeState("read-write", None, _since(operator) if operator is not None else self._started)

    def _settle(self) -> None:
        """Decide again (the lock is held); one log line on entering read-only, one on leaving, listeners told."""
        old, new = self._state, self._decide()
        if (old.mode, old.reason) == (new.mode, new.reason):
            self._state = new  # the same state, maybe with a fresher `since` (read-write recorded again)
            return
        self._state = new
        if old.mode == "read-write":
            self._log_entered(new)
        elif new.mode == "read-write":
            log.warning(
                "read-only mode left (it was %s, %.0f s): writes are accepted again and the worker applies the queue",
                old.reason,
                self._clock() - (old.since or self._clock()),
                extra={"mode": "read-write"},
            )
        else:
            log.info("read-only mode goes on, now %s", _why(new), extra={"mode": "read-only", "reason": new.reason})
        for listener in self._listeners:
            try:
                listener(new)
            except Exception:
                log.exception("read-only mode: a listener failed")

    def _log_entered(self, state: ModeState) -> None:
        effect = (
            "writes are answered 503 until one of them answers, reads served from the cache"
            if state.reason == "automatic"
            else "writes are refused with 503, reads served, the worker holds its queue"
        )
        log.warning(
            "read-only mode entered (%s, since %s): %s",
            _why(state),
            iso(state.since),
            effect,
            extra={"mode": "read-only", "reason": state.reason},
        )


def _since(record: dict[str, Any]) -> float:
    return float(record.get("since") or record["at"])


def _why(state: ModeState) -> str:
    return {
        "operator": "by the operator, for the fleet",
        "setting": "by this process's setting BROWNOUT_READ_ONLY",
        "automatic": "automatic: neither the database nor the queue can take a write",
    }.get(state.reason or "", str(state.reason))
