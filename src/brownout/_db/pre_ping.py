"""Pre-ping at checkout, deciding per failure what to invalidate.

SQLAlchemy's own pre-ping (`pool_pre_ping=True`) invalidates the whole pool
whenever a ping fails: it raises `InvalidatePoolError` whatever `handle_error`
decided (SQLAlchemy 2.1, `pool/base.py`). Two of our cases need less:

- behind a transaction-mode pooler a failed ping proves one link dead, while
  the others to the pooler are fine;
- a ping cut short by the caller's deadline (waiting.py) proves the database
  slow, not the pool dead; throwing away every connection then would add a
  burst of TLS handshakes to a database that is already struggling.

So the engine turns SQLAlchemy's pre-ping off and pings here, in the pool's
`checkout` event, raising `DisconnectionError` (this connection) or
`InvalidatePoolError` (every connection older than now). The pool handles both
by reconnecting, as it does for its own pre-ping.

A connection returned to the pool less than `idle_seconds` ago (default 1 s)
is not pinged: it just answered, and a ping costs a round trip on every
request under load, when connections are busiest and pings least useful. A
connection that died in that second fails its query instead, which
`execute_with_retry` retries on a fresh one. Idle connections, the ones a
pooler or a TLS middlebox silently drops, are always pinged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg2
from sqlalchemy import exc as sa_exc

from brownout._db.errors import classify, describe
from brownout._db.incidents import DisconnectEpochs
from brownout._db.pipelined import PipelinedConnection
from brownout._db.waiting import DatabaseDeadlineReached

_FRESH_KEY = "brownout.fresh"
_RETURNED_AT_KEY = "brownout.returned_at"


class CheckoutPinger:
    """`connect` and `checkout` pool listeners; a brand-new connection is not pinged."""

    def __init__(
        self,
        *,
        behind_pooler: bool,
        epochs: DisconnectEpochs,
        idle_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.behind_pooler = behind_pooler
        self.epochs = epochs
        self.idle_seconds = idle_seconds
        self._clock = clock

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH_KEY] = True

    def on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED_AT_KEY] = self._clock()

    def on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_FRESH_KEY, False):
            return
        returned_at = record.info.get(_RETURNED_AT_KEY)
        if returned_at is not None and self._clock() - returned_at < self.idle_seconds:
            return
        try:
            # On a pipelined connection the ping runs outside any transaction: it opens none that would hold a
            # pooler's server connection until the caller's COMMIT, or cost a ROLLBACK when nothing follows.
            pipelined = isinstance(dbapi_connection, PipelinedConnection)
            cursor = dbapi_connection.bare_cursor() if pipelined else dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except psycopg2.Error as exc:
            cut_by_deadline = isinstance(exc, DatabaseDeadlineReached)
            kind = classify(exc)
            disconnect = not cut_by_deadline and kind.is_disconnect
            if disconnect:
                self.epochs.on_disconnect(None, kind=kind.value)
            error = sa_exc.InvalidatePoolError if disconnect and not self.behind_pooler else sa_exc.DisconnectionError
            raise error(f"pre-ping failed: {describe(exc)}") from exc
