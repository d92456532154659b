"""Acceptance stamps: a hybrid logical clock, so order needs no shared state.

Per-entity order (design.md, invariant 3) is last-writer-wins on the stamp a
write receives when it is accepted, compared inside the database at apply
time. Nothing in Redis or in process memory has to survive for order to hold:
the stamp travels with the write (in the queue message or the direct call)
and the entity's row keeps the stamp of the write that last set it. A write
that was accepted and then rejected (a 503) leaves no gap to wait for.

A stamp is one signed 64-bit integer, so PostgreSQL compares it natively:

    microseconds since 2020-01-01 UTC (51 bits, until 2091) | logical counter (12 bits)

Within a process stamps strictly increase even if the wall clock steps back
(the logical counter carries on, as in Kulkarni et al.'s HLC). Across
processes they follow the wall clocks: two writes accepted further apart than
the fleet's clock skew (NTP keeps it to milliseconds; zero between processes
of one machine) are ordered as they were accepted; writes closer than that
were concurrent, and every applier agrees on one order for them.
`observe()` folds in stamps read from shared state, so a process never stamps
a write below one it has already seen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

LOGICAL_BITS = 12
_LOGICAL_MAX = (1 << LOGICAL_BITS) - 1
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
_EPOCH_US = int(EPOCH.timestamp()) * 1_000_000


def compose(wall_us: int, logical: int) -> int:
    """A stamp from microseconds since the Unix epoch and a logical counter."""
    return ((wall_us - _EPOCH_US) << LOGICAL_BITS) | logical


def wall_us_of(stamp: int) -> int:
    return (stamp >> LOGICAL_BITS) + _EPOCH_US


def datetime_of(stamp: int) -> datetime:
    return EPOCH + timedelta(microseconds=stamp >> LOGICAL_BITS)


class HybridClock:
    """Thread-safe source of strictly increasing acceptance stamps."""

    def __init__(self, *, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._lock = threading.Lock()
        self._last = 0

    def now(self) -> int:
        physical = compose(int(self._wall() * 1_000_000), 0)
        with self._lock:
            # Either the wall clock moved on, or count on from the last stamp
            # (past 4095 in one microsecond this borrows the next microsecond).
            self._last = max(physical, self._last + 1)
            return self._last

    def observe(self, stamp: int) -> None:
        """Never stamp at or below *stamp* from now on (it was read from shared state)."""
        with self._lock:
            self._last = max(self._last, stamp)
