"""One incident, one failure: disconnect casualties do not each count on the breaker.

When a pooler restarts or a failover drops every connection, each of a
process's busy connections fails at once. Counted one by one, eight threads
caught by one blip would be eight consecutive failures and open the breaker
for a minute although the database answers the very next connect. What the
breaker must measure is whether the *database* fails, not how many stale
connections one event killed.

So each connection remembers the disconnect epoch it was born in, and each
disconnect bumps the epoch. A disconnect on a connection born before the
latest disconnect, and within a short window of it, is a casualty of an
incident already counted: it is still retried (on a fresh connection), but not
counted. The window keeps old links that fail later (a pooler's healthy links
meeting a real outage one by one) counting as they should. A fresh connection that
fails, or a connect that fails, always counts, so a real outage still opens
the breaker after the threshold.

One exception to the last rule, for the same reason: a connect cut by the
caller's deadline within the window of a disconnect is the incident's
reconnect storm (every thread of the process opening a TLS connection at once,
each fork and handshake competing for CPU), not a second failure of the
database. Seen in the chaos run: SSL kills every few seconds opened the breaker
of a healthy database through 0.3 s request deadlines. A connect *refused* or
*reset* in the window still counts, and after the window slow connects count
again, so a database that dies and goes silent opens the breaker at most one
window later.

The verdict travels from SQLAlchemy's `handle_error` event (engine.py) to
`execute_with_retry` (retry.py) in a thread-local: both run in the thread of
the failing call, one right after the other.

The same grouping makes one report per incident: while someone listens
(`watch`, Sentry's incident events), each bump opens a `DisconnectBurst` that
counts its casualties, and the burst is handed to `on_burst` once it is over:
when its window closes (a timer) or at the next bump, whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EPOCH_KEY = "brownout.disconnect_epoch"

_verdict = threading.local()


@dataclass
class DisconnectBurst:
    """One incident: the disconnect that bumped the epoch and the casualties counted with it."""

    kind: str
    """The ErrorKind value of the disconnect that began it: "ssl" or "disconnect"."""
    started: float
    began_with_a_connection: bool
    """False when it began with a failed connect, which lost no connection."""
    casualties: int = 0
    slow_connects: int = 0
    """Connects cut by their deadline in its window, excused as its reconnect storm."""

    @property
    def connections(self) -> int:
        """The connections that failed with it: the first (unless a connect) and its casualties."""
        return int(self.began_with_a_connection) + self.casualties


Schedule = Callable[[float, Callable[[], None]], None]


def _in_a_timer_thread(delay: float, run: Callable[[], None]) -> None:
    timer = threading.Timer(delay, run)
    timer.name = "brownout-disconnect-burst"
    timer.daemon = True
    timer.start()


class DisconnectEpochs:
    """Per-engine epoch counter; hooked to the pool's `connect` event and to `handle_error`.

    *on_burst* is told each burst once it is over, while *watch* says someone listens (when it does
    not, no burst is kept and no timer started); *schedule* runs a function after a delay (tests)."""

    def __init__(
        self,
        *,
        window_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_burst: Callable[[DisconnectBurst], object] | None = None,
        watch: Callable[[], bool] = lambda: True,
        schedule: Schedule = _in_a_timer_thread,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.window_seconds = window_seconds
        self.value = 0
        self._bumped_at = float("-inf")
        self._on_burst = on_burst
        self._watch = watch
        self._schedule = schedule
        self._burst: DisconnectBurst | None = None

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        record.info[EPOCH_KEY] = self.value

    def on_disconnect(
        self, connection_info: dict[str, Any] | None, *, kind: str = "disconnect", connecting: bool = False
    ) -> bool:
        """Record a disconnect of *kind* ("ssl" or "disconnect"; *connecting*: a connect that failed); return True
        when it is a casualty of an earlier one."""
        with self._lock:
            now = self._clock()
            born = None if connection_info is None else connection_info.get(EPOCH_KEY)
            if born is not None and born < self.value and now - self._bumped_at <= self.window_seconds:
                _verdict.casualty = True
                if self._burst is not None:
                    self._burst.casualties += 1
                return True
            self.value += 1
            self._bumped_at = now
            watched = self._on_burst is not None and self._watching()
            ended, self._burst = self._burst, (DisconnectBurst(kind, now, not connecting) if watched else None)
            begun = self._burst
        if ended is not None:
            self._tell(ended)
        if begun is not None:
            self._close_later(begun, self.window_seconds)
        return False

    def excuse_slow_connect(self) -> bool:
        """A connect ran out of deadline: a casualty (True) when a disconnect incident is this recent."""
        with self._lock:
            if self._clock() - self._bumped_at <= self.window_seconds:
                _verdict.casualty = True
                if self._burst is not None:
                    self._burst.slow_connects += 1
                return True
            return False

    def _close(self, burst: DisconnectBurst) -> None:
        """The timer of *burst*: over once its window is, unless the next bump already ended it."""
        with self._lock:
            if self._burst is not burst:
                return
            left = burst.started + self.window_seconds - self._clock()
            if left < 0:
                self._burst = None
        if left >= 0:
            self._close_later(burst, left)  # the timer ran early on this clock: a casualty may still come
        else:
            self._tell(burst)

    def _close_later(self, burst: DisconnectBurst, delay: float) -> None:
        try:
            self._schedule(delay + 0.01, lambda: self._close(burst))
        except Exception:  # noqa: S110 - no thread to be had: the burst is told at the next bump instead
            pass

    def _watching(self) -> bool:
        try:
            return self._watch()
        except Exception:
            return False

    def _tell(self, burst: DisconnectBurst) -> None:
        try:
            if self._on_burst is not None:
                self._on_burst(burst)
        except Exception:  # noqa: S110 - a report must never fail the call that met the disconnect
            pass


def clear() -> None:
    """Forget any verdict left by a failure the caller never saw."""
    if getattr(_verdict, "casualty", False):
        _verdict.casualty = False


def take_casualty() -> bool:
    """True (once) when the failure just raised in this thread was a casualty."""
    casualty = getattr(_verdict, "casualty", False)
    if casualty:
        _verdict.casualty = False
    return casualty
