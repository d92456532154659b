"""Acceptance stamps: a hybrid logical clock, so order needs no shared state.

Per-entity order (an acknowledged write takes effect in order per entity) is
last-writer-wins on the stamp a write receives when it is accepted, compared
inside the database at apply time. Nothing in Redis or in process memory has
to survive for order to hold: the stamp travels with the write (in the queue
message or the direct call) and the entity's row keeps the stamp of the write
that last set it. A write that was accepted and then rejected (a 503) leaves
no gap to wait for.

A stamp is one signed 64-bit integer, so PostgreSQL compares it natively:

    microseconds since 2020-01-01 UTC (51 bits, until 2091) | counter (4 bits) | node (8 bits)

Within a process stamps strictly increase even if the wall clock steps back
(the counter carries on, as in Kulkarni et al.'s HLC; past 16 stamps in one
microsecond it borrows the next). Across processes they follow the wall
clocks: two writes accepted further apart than the fleet's clock skew (NTP
keeps it to milliseconds; zero between processes of one machine) are ordered
as they were accepted; writes closer than that were concurrent, and every
applier agrees on one order for them. The node is drawn at random per clock,
so two processes stamp alike only if they drew the same node (1 in 256) and
stamp in the same microsecond with the same count.

A clock never issues a stamp at or below one its process has seen:
`observe()` folds in stamps read from shared state (the dispatcher seeds it at
start-up with the highest stamp recently applied, and observes what each
direct apply returns), so neither a restart on a host whose wall clock
stepped back nor a replica whose clock runs behind stamps a write below one
already applied. The limits that remain: a stamp still only in the queue is
not seen, and processes whose clocks differ by more than the time between
two writes to one entity, with nothing read in between, order those two by
their clocks.

Stamps of the earlier layout (a 12-bit counter, no node) have the same
microseconds in the same place: queued writes of an older release keep their
order against new ones.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

LOGICAL_BITS = 12  # below the microseconds: the counter (high 4 bits) and the node (low 8 bits)
NODE_BITS = 8
_NODE_MASK = (1 << NODE_BITS) - 1
_STEP = 1 << NODE_BITS  # one count
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
    """Thread-safe source of strictly increasing acceptance stamps, unique to this clock's node."""

    def __init__(self, *, wall: Callable[[], float] = time.time, node: int | None = None) -> None:
        if node is not None and not 0 <= node <= _NODE_MASK:
            raise ValueError(f"node must be in 0..{_NODE_MASK}, got {node}")
        self._wall = wall
        self.node = secrets.randbelow(_NODE_MASK + 1) if node is None else node
        self._lock = threading.Lock()
        self._last = 0  # the last stamp issued, without its node bits

    def now(self) -> int:
        physical = compose(int(self._wall() * 1_000_000), 0)
        with self._lock:
            # Either the wall clock moved on, or count on from the last stamp
            # (past 16 in one microsecond this borrows the next microsecond).
            self._last = max(physical, self._last + _STEP)
            return self._last | self.node

    def observe(self, stamp: int) -> None:
        """Never stamp at or below *stamp* from now on (it was read from shared state)."""
        with self._lock:
            self._last = max(self._last, stamp & ~_NODE_MASK)
