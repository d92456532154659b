"""Wait for a condition in real time, bounded: for threads and servers, never for a breaker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01) -> bool:
    """Poll *condition* until it holds or *timeout* seconds pass; return its last value."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        pause.wait(interval)
    return condition()
