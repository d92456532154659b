"""A retry budget (Google SRE book, "Handling Overload"): retries at most a fraction of calls.

Per process, over a sliding window: while the retries of the last
`window_seconds` stay under `ratio` of the calls in it (plus a small floor
for quiet processes), a transient failure may be retried; over budget it is
raised at once. In an outage every call fails; jittered backoff spreads the
retries but still multiplies the load by up to five, and the budget caps that
at 1 + ratio. Time is injected; buckets of one second keep it O(1).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        *,
        ratio: float = 0.1,
        window_seconds: float = 10.0,
        min_retries: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= ratio <= 1 or window_seconds < 1 or min_retries < 0:
            raise ValueError("ratio within [0, 1], window_seconds >= 1, min_retries >= 0")
        self.ratio = ratio
        self.min_retries = min_retries
        self._buckets = int(window_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._calls = [0] * self._buckets
        self._retries = [0] * self._buckets
        self._second = int(clock())
        self.denied = 0

    def record_call(self) -> None:
        """A first attempt (retries are not calls). On every call's path: no lock unless the
        second changed; a lost increment under a race only makes the budget a call smaller."""
        now = int(self._clock())
        if now != self._second:
            with self._lock:
                self._advance()
        self._calls[now % self._buckets] += 1

    def try_spend(self) -> bool:
        """True (and counted) when one more retry fits the budget."""
        with self._lock:
            slot = self._advance()
            if sum(self._retries) + 1 > self.min_retries + self.ratio * sum(self._calls):
                self.denied += 1
                return False
            self._retries[slot] += 1
            return True

    def used(self) -> float:
        """Retries over allowed retries in the window (1.0: the budget is spent)."""
        with self._lock:
            self._advance()
            allowed = self.min_retries + self.ratio * sum(self._calls)
            return sum(self._retries) / allowed if allowed else 1.0

    def _advance(self) -> int:
        now = int(self._clock())
        if now - self._second >= self._buckets:
            self._calls = [0] * self._buckets
            self._retries = [0] * self._buckets
        else:
            for second in range(self._second + 1, now + 1):
                self._calls[second % self._buckets] = 0
                self._retries[second % self._buckets] = 0
        self._second = max(self._second, now)
        return now % self._buckets
