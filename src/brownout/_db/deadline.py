"""The current call's deadline, visible to the code that does the I/O.

`execute_with_retry(..., deadline=...)` sets it; the engine's psycopg2 wait
callback reads it to cut a query or a connect short. A context variable
(rather than an argument) because the I/O happens deep inside SQLAlchemy,
which has no way to pass it along. Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("brownout_db_deadline", default=None)


def current_deadline() -> float | None:
    """The absolute deadline of the call in progress in this thread or task, if any."""
    return _deadline.get()


def remaining(clock: Callable[[], float] = time.monotonic) -> float | None:
    """Seconds left before the current deadline, or None when there is none."""
    at = _deadline.get()
    if at is None:
        return None
    return at - clock()


@contextmanager
def deadline_scope(at: float | None) -> Iterator[None]:
    """Make *at* the deadline inside the block; an enclosing, earlier deadline wins."""
    outer = _deadline.get()
    if at is None or (outer is not None and outer <= at):
        yield
        return
    token = _deadline.set(at)
    try:
        yield
    finally:
        _deadline.reset(token)
