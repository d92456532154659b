"""Acceptance stamps: a hybrid logical clock, so order needs no shared state.

Per-entity order (design.md, invariant 3) is last-writer-wins on the stamp a
write receives when it is accepted, compared inside the database at apply
time. Nothing in Redis or in process memory has to survive for order to hold:
the stamp travels with the write (in the queue message or the direct call)
and the entity's row keeps the stamp of the write that last set it.

A stamp is one signed 64-bit integer, so PostgreSQL compares it natively:

    wall-clock milliseconds (41 bits) | logical counter (12 bits) | node (10 bits)

Within a process stamps strictly increase even if the wall clock steps back
(the logical counter carries on, as in Kulkarni et al.'s HLC). Across
processes they follow the wall clocks: two writes accepted further apart
than the fleet's clock skew (NTP keeps it to milliseconds) are ordered as
they were accepted; writes closer than that were concurrent and get one
agreed order. `observe()` folds in stamps read from the database, so a
process never stamps a write below one it has already seen applied. The node
bits break ties between processes that stamp in the same millisecond.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

NODE_BITS = 10
LOGICAL_BITS = 12
_LOGICAL_MAX = (1 << LOGICAL_BITS) - 1


def compose(wall_ms: int, logical: int, node: int) -> int:
    return (wall_ms << (LOGICAL_BITS + NODE_BITS)) | (logical << NODE_BITS) | node


def wall_ms_of(stamp: int) -> int:
    return stamp >> (LOGICAL_BITS + NODE_BITS)


class HybridClock:
    """Thread-safe source of strictly increasing acceptance stamps."""

    def __init__(self, *, wall: Callable[[], float] = time.time, node: int | None = None) -> None:
        self._wall = wall
        self.node = random.randrange(1 << NODE_BITS) if node is None else node
        if not 0 <= self.node < 1 << NODE_BITS:
            raise ValueError(f"node must be within [0, {1 << NODE_BITS})")
        self._lock = threading.Lock()
        self._last_ms = 0
        self._logical = 0

    def now(self) -> int:
        wall_ms = int(self._wall() * 1000)
        with self._lock:
            if wall_ms > self._last_ms:
                self._last_ms, self._logical = wall_ms, 0
            elif self._logical < _LOGICAL_MAX:
                self._logical += 1
            else:  # 4096 stamps in one millisecond: borrow the next one
                self._last_ms, self._logical = self._last_ms + 1, 0
            return compose(self._last_ms, self._logical, self.node)

    def observe(self, stamp: int) -> None:
        """Never stamp below *stamp* from now on (it was read from shared state)."""
        seen_ms = wall_ms_of(stamp)
        seen_logical = (stamp >> NODE_BITS) & _LOGICAL_MAX
        with self._lock:
            if (seen_ms, seen_logical) > (self._last_ms, self._logical):
                self._last_ms, self._logical = seen_ms, seen_logical
