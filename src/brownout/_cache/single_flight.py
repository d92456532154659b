"""One loader per key per process: concurrent misses for one key share one database read.

The fleet-wide half is a short Redis lock (`ReadCache.try_lock`); this is the
in-process half, which costs no round trip. Followers wait at most their own
deadline, then load by themselves rather than wait on a stuck leader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Future[T]] = {}
        self.shared = 0  # calls answered by another caller's load (for tests and metrics)

    def run(self, key: str, load: Callable[[], T], *, wait: float) -> T:
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if not leader:
            try:
                result = flight.result(timeout=wait)
            except FutureTimeout:
                return load()
            with self._lock:
                self.shared += 1
            return result
        try:
            value = load()
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(value)
            return value
        finally:
            with self._lock:
                self._flights.pop(key, None)
