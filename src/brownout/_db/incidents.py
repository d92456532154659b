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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

EPOCH_KEY = "brownout.disconnect_epoch"

_verdict = threading.local()


class DisconnectEpochs:
    """Per-engine epoch counter; hooked to the pool's `connect` event and to `handle_error`."""

    def __init__(self, *, window_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.window_seconds = window_seconds
        self.value = 0
        self._bumped_at = float("-inf")

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        record.info[EPOCH_KEY] = self.value

    def on_disconnect(self, connection_info: dict[str, Any] | None) -> bool:
        """Record a disconnect; return True when it is a casualty of an earlier one."""
        with self._lock:
            now = self._clock()
            born = None if connection_info is None else connection_info.get(EPOCH_KEY)
            if born is not None and born < self.value and now - self._bumped_at <= self.window_seconds:
                _verdict.casualty = True
                return True
            self.value += 1
            self._bumped_at = now
            return False

    def excuse_slow_connect(self) -> bool:
        """A connect ran out of deadline: a casualty (True) when a disconnect incident is this recent."""
        with self._lock:
            if self._clock() - self._bumped_at <= self.window_seconds:
                _verdict.casualty = True
                return True
            return False


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
