"""Test doubles for pure-logic tests: injected time and chance, and server errors without a server.

Nothing here sleeps, reads the wall clock or opens a socket.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable

import psycopg2
import psycopg2.errors


class FakeClock:
    """A monotonic clock that only moves when told to; pass it where `time.monotonic` goes."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        """A `sleep` that costs no real time: it only moves this clock."""
        self.advance(seconds)


class JumpingWallClock:
    """`time.time` plus an offset a test moves forward: time passes as usual, and jumps when told
    (cache ages that must pass a TTL without sleeping, while "stored later" still means later)."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("this clock only jumps forward")
        with self._lock:
            self._offset += seconds


class ScriptedRandom(random.Random):
    """`random()` returns the scripted fractions in turn (the last one repeats).

    `uniform(a, b)` is `a + (b - a) * random()`, written out here rather than
    inherited so the exact maths does not depend on CPython's implementation.
    1.0 is allowed (a real `random()` stays below it) to hit upper bounds exactly.
    """

    def __init__(self, fractions: float | Iterable[float]) -> None:
        super().__init__(0)
        values = [fractions] if isinstance(fractions, (int, float)) else list(fractions)
        if not values or any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError("fractions must be within [0, 1]")
        self._values = [float(v) for v in values]
        self._next = 0
        self.draws = 0

    def random(self) -> float:
        value = self._values[min(self._next, len(self._values) - 1)]
        self._next += 1
        self.draws += 1
        return value

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()


UPPER = 1.0
LOWER = 0.0


def pg_error(pgcode: str | None, message: str, *, base: type[psycopg2.Error] | None = None) -> psycopg2.Error:
    """A psycopg2 error as the server would raise it, SQLSTATE included, without a server.

    psycopg2 sets `pgcode` only on errors built from a server reply (it is read-only
    on instances), so this makes a subclass of the matching psycopg2 class
    (`psycopg2.errors.lookup(pgcode)`, e.g. SerializationFailure for 40001) whose
    `pgcode` property answers the given code.
    """
    if base is None:
        base = psycopg2.errors.lookup(pgcode) if pgcode else psycopg2.OperationalError
    cls = type(f"{base.__name__}From{pgcode or 'Client'}", (base,), {"pgcode": property(lambda self: pgcode)})
    return cls(message)
