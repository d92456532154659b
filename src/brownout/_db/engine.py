"""The engine: the default pool, bounded I/O, and SSL-aware pool invalidation.

What SQLAlchemy already does, and is relied on as is:
- the psycopg2 dialect's `is_disconnect` recognises libpq's disconnect texts
  ("connection has been closed unexpectedly", "SSL SYSCALL error: ...",
  "terminating connection", ...); on such an error SQLAlchemy invalidates the
  connection and, by default, the whole pool (every connection older than the
  error is replaced at its next checkout);
- `pool_recycle` replaces old connections at checkout.

What this module adds, in the `handle_error` event:
- recognition of what the dialect misses, through `errors.classify` (refused
  and reset links, 57P01/57P02/57P03 admin shutdowns, pooler messages);
- a per-error decision on the scope of invalidation:
  * direct to PostgreSQL (`BROWNOUT_DATABASE_POOLER=none`): a disconnect
    invalidates the whole pool: a failover or a dropped TLS middlebox kills
    every connection at once, and none of them may be reused;
  * behind a transaction-mode pooler (`transaction`): a dead *server*
    connection is reported by the pooler closing that one client link (seen
    with PgBouncer 1.18: the client gets "SSL connection has been closed
    unexpectedly", exactly like a dead pooler), while the client's other links
    to the pooler are healthy. The two cannot be told apart from the error, so
    only the failed connection is invalidated, and pre-ping (which there proves
    the link to the pooler, the thing that can be stale) weeds out the rest
    at checkout if the pooler itself restarted;
  * pre-ping is ours (pre_ping.py), because SQLAlchemy's always invalidates
    the whole pool on a failed ping;
  * a deadline reached by our own wait callback invalidates only that
    connection (psycopg2 closed it): a slow query is not a dead database;
- disconnect epochs (incidents.py): the connections one incident kills count
  once on the breaker, not once each, and make one Sentry event when Sentry
  is on (src/brownout/_observability/incident_events.py);
- pipelined connections (pipelined.py): BEGIN, and behind a pooler the
  `SET LOCAL statement_timeout`, ride on a transaction's first statement, and
  `commit_with` sends a last statement and COMMIT in one round trip.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.pool import QueuePool

from brownout._db import pipelined, waiting
from brownout._db.deadline import remaining
from brownout._db.errors import ErrorKind, classify, describe
from brownout._db.incidents import DisconnectEpochs
from brownout._db.pre_ping import CheckoutPinger
from brownout._observability import incident_events
from brownout._settings import Settings

log = logging.getLogger(__name__)

# libpq parameters set unless DATABASE_URL already names them. Keepalives find a
# peer that vanished (no ACKs); they cannot find one that ACKs and never answers,
# which is what the wait callback is for.
_LIBPQ_DEFAULTS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,  # ms of unacknowledged data before the kernel gives up
}


class DeadlineQueuePool(QueuePool):
    """A QueuePool whose checkout wait never outlasts the caller's deadline.

    SQLAlchemy's checkout wait is one number for the whole engine (30 s by
    default); on the request path the wait must end with the request's
    deadline, so the timeout is read per checkout.
    """

    on_wait: Callable[[float], None] | None = None
    """Told each checkout's wait in seconds (metrics): the process's own queueing for a connection."""

    def _do_get(self) -> Any:
        if self.on_wait is None:
            return super()._do_get()
        started = time.perf_counter()
        try:
            return super()._do_get()
        finally:
            self.on_wait(time.perf_counter() - started)

    @property
    def _timeout(self) -> float:
        left = remaining()
        if left is None:
            return self._configured_timeout
        return max(0.0, min(self._configured_timeout, left))

    @_timeout.setter
    def _timeout(self, value: float) -> None:
        self._configured_timeout = value

    def recreate(self) -> QueuePool:
        pool = super().recreate()
        pool._timeout = self._configured_timeout
        if isinstance(pool, DeadlineQueuePool):
            pool.on_wait = self.on_wait
        return pool


def _connect_args(settings: Settings) -> dict[str, Any]:
    query = make_url(settings.database_url).query
    args = {key: value for key, value in _LIBPQ_DEFAULTS.items() if key not in query}
    if "connect_timeout" not in query:
        # libpq's floor is 2 s; the wait callback enforces the real bound.
        args["connect_timeout"] = max(2, round(settings.db_connect_timeout_seconds))
    if "application_name" not in query:
        args["application_name"] = settings.db_application_name
    begin_settings = ""
    if settings.db_statement_timeout_seconds:
        ms = int(settings.db_statement_timeout_seconds * 1000)
        if settings.database_pooler == "none":
            args["options"] = f"-c statement_timeout={ms}"
        else:
            # Poolers refuse start-up options; SET LOCAL lasts one transaction, which is all a
            # transaction-mode pooler guarantees to be ours. It rides on the BEGIN (pipelined.py).
            begin_settings = f"SET LOCAL statement_timeout = {ms}"
    args["connection_factory"] = pipelined.connection_class(begin_settings)
    return args


def build_engine(settings: Settings) -> Engine:
    """Build the process's engine; nothing connects until first use."""
    waiting.install(
        waiting.WaitBounds(
            connect_seconds=settings.db_connect_timeout_seconds,
            io_seconds=settings.db_io_timeout_seconds,
            min_wait_seconds=settings.db_min_wait_seconds,
        )
    )
    engine = create_engine(
        settings.database_url,
        poolclass=DeadlineQueuePool,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_max_overflow,
        pool_recycle=settings.pool_recycle_seconds,
        pool_pre_ping=False,  # ours below: see pre_ping.py
        pool_timeout=settings.pool_timeout_seconds,
        connect_args=_connect_args(settings),
        hide_parameters=True,  # parameters can hold personal data; logs must not
    )
    behind_pooler = settings.database_pooler == "transaction"
    epochs = DisconnectEpochs(on_burst=incident_events.disconnect_burst, watch=incident_events.active)
    event.listen(engine, "connect", epochs.on_connect)
    if settings.pool_pre_ping:
        pinger = CheckoutPinger(behind_pooler=behind_pooler, epochs=epochs, idle_seconds=settings.pool_pre_ping_idle_seconds)
        event.listen(engine, "connect", pinger.on_connect)
        event.listen(engine, "checkin", pinger.on_checkin)
        event.listen(engine, "checkout", pinger.on_checkout)
    event.listen(engine, "handle_error", _make_error_handler(behind_pooler=behind_pooler, epochs=epochs))
    pipelined.install(engine)
    _dispose_after_fork(engine)
    return engine


def _connection_info(ctx: ExceptionContext) -> dict[str, Any] | None:
    if ctx.connection is None:  # a failed connect: there is no connection yet
        return None
    try:
        return ctx.connection.connection.info
    except Exception:  # already closed or invalidated
        return None


def _make_error_handler(*, behind_pooler: bool, epochs: DisconnectEpochs) -> Any:
    def on_error(ctx: ExceptionContext) -> None:
        original = ctx.original_exception
        if not isinstance(original, Exception):
            return
        if isinstance(original, waiting.DatabaseDeadlineReached):
            ctx.is_disconnect = True
            ctx.invalidate_pool_on_disconnect = False
            if original.connecting:
                epochs.excuse_slow_connect()  # part of a reconnect storm? (incidents.py)
            return
        kind = classify(original)
        if kind.is_disconnect and not ctx.is_disconnect:
            ctx.is_disconnect = True
        if not ctx.is_disconnect:
            return
        burst_kind = ErrorKind.SSL if kind is ErrorKind.SSL else ErrorKind.DISCONNECT  # SQLAlchemy's verdict may be the only one
        casualty = epochs.on_disconnect(_connection_info(ctx), kind=burst_kind.value, connecting=ctx.connection is None)
        if behind_pooler or casualty:
            # Behind a pooler only this link is known dead. A casualty's pool was
            # invalidated after it was made; doing it again would discard the
            # fresh connections other threads just opened.
            ctx.invalidate_pool_on_disconnect = False
        if casualty:
            return  # logged with the incident it belongs to
        log.warning(
            "database disconnect (%s), invalidating %s: %s",
            kind.value,
            "the connection" if behind_pooler else "the pool",
            describe(original),
        )

    return on_error


def _dispose_after_fork(engine: Engine) -> None:
    """Forked children (gunicorn/dramatiq workers) must not share the parent's sockets."""
    ref = weakref.ref(engine)

    def after_fork() -> None:
        child_engine = ref()
        if child_engine is not None:
            child_engine.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork)
