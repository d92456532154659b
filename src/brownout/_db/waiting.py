"""Bound every wait on PostgreSQL with psycopg2's wait callback.

Why: libpq's own guards are not enough. `connect_timeout` has a 2 s floor and
is ignored in the asynchronous mode psycopg2 uses under a wait callback; TCP
keepalives and `tcp_user_timeout` never fire against a peer that acknowledges
packets but never answers (a hung pooler, a half-dead load balancer); and
`statement_timeout` is enforced by the server, which is the thing that is not
answering. With a wait callback, psycopg2 hands every wait (connect, query,
commit, pre-ping) to Python, so one `poll()` with a timeout bounds it. (A
`poll` object, not `selectors`: an epoll descriptor opened and closed per
wait cost more CPU than the query itself on short statements.)

The bound is the current call's deadline (`brownout._db.deadline`) when one is set
(the HTTP request path), otherwise the process-wide background bounds. Whatever
is left of the deadline, the database always gets `min_wait_seconds` from when
it is asked: under CPU overload a request can spend its deadline before its query
is sent (the thread pool, the GIL), and cutting the query then blamed a healthy
database (a failure counted toward the breaker, a connection thrown away and
rebuilt over TLS, which costs more of the CPU that was missing). A cut therefore
always means the database itself took at least that long.

When the bound is reached the callback raises `DatabaseDeadlineReached`;
psycopg2 then closes the connection (its `closed` becomes 2), so nothing can
reuse a connection with a query still in flight. The query is not cancelled
with `PQcancel`: against a silent peer the cancel itself would block with no
timeout. A server that is merely slow would notice the closed socket only when
it next writes; every transaction therefore opens with
`client_connection_check_interval` (pipelined.py, PostgreSQL 14 and later), so
the backend stops and rolls back within 100 ms, and `statement_timeout` (when
configured) bounds it anyway.

The callback is process-wide (a psycopg2 limitation): `install()` sets it and
the bounds for every engine in the process.
"""

from __future__ import annotations

import math
import select
import time
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions as ext

from brownout._db.deadline import current_deadline


class DatabaseDeadlineReached(psycopg2.OperationalError):  # type: ignore[misc]
    """Raised when a wait on PostgreSQL outlives its deadline; the connection is closed."""

    connecting = False  # True: the deadline ran out while the connection was being set up


@dataclass(frozen=True, slots=True)
class WaitBounds:
    """Longest waits when the caller set no deadline (background work)."""

    connect_seconds: float = 5.0
    io_seconds: float = 30.0
    min_wait_seconds: float = 0.1  # the database's own slice, however late the call asked it


_bounds = WaitBounds()


def install(bounds: WaitBounds) -> None:
    """Make every psycopg2 wait in this process bounded (idempotent)."""
    global _bounds
    _bounds = bounds
    if ext.get_wait_callback() is not wait_with_deadline:
        ext.set_wait_callback(wait_with_deadline)


def uninstall() -> None:
    """Restore psycopg2's blocking behaviour (tests and benchmarks only)."""
    ext.set_wait_callback(None)


def wait_with_deadline(conn: ext.connection) -> None:
    """psycopg2 wait callback: poll until done or until the deadline, then give up."""
    now = time.monotonic()
    connecting = conn.status == ext.STATUS_SETUP
    limit = now + (_bounds.connect_seconds if connecting else _bounds.io_seconds)
    deadline = current_deadline()
    if deadline is not None:
        limit = min(limit, max(deadline, now + _bounds.min_wait_seconds))
    poller = select.poll()  # plain memory: no descriptor to open and close per wait
    registered: tuple[int, int] | None = None  # (fd, events); libpq may change sockets while connecting
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        if state == ext.POLL_READ:
            events = select.POLLIN
        elif state == ext.POLL_WRITE:
            events = select.POLLOUT
        else:  # pragma: no cover - psycopg2 documents no other state
            raise psycopg2.OperationalError(f"unexpected poll state {state}")
        left = limit - time.monotonic()
        if left <= 0:
            raise _reached(connecting, limit - now)
        fd = conn.fileno()
        if registered is None or registered[0] != fd:
            if registered is not None:
                poller.unregister(registered[0])
            poller.register(fd, events)
        elif registered[1] != events:
            poller.modify(fd, events)
        registered = (fd, events)
        if not poller.poll(math.ceil(left * 1000)):  # milliseconds, rounded up: never a busy loop
            raise _reached(connecting, limit - now)


def _reached(connecting: bool, budget: float) -> DatabaseDeadlineReached:
    what = "connecting to" if connecting else "waiting on"
    error = DatabaseDeadlineReached(f"brownout deadline reached {what} the database after {max(0.0, budget):.3f} s")
    error.connecting = connecting
    return error
