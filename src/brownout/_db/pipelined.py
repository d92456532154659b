"""psycopg2 connections whose BEGIN and COMMIT ride on a statement's round trip.

psycopg2 sends BEGIN as a query of its own before a transaction's first
statement, and COMMIT as another: a one-statement write costs three round
trips, a direct write (effect, record, commit) four, and behind a
transaction-mode pooler the `SET LOCAL statement_timeout` one more. Across a
network to a hosted database each is a full RTT the request waits for.
psycopg 3 has a pipeline mode; psycopg2, which the wait callback (waiting.py),
the error classification and SQLAlchemy's dialect here are built on, has not.
PostgreSQL's simple query protocol (the only one psycopg2 speaks) runs
several `;`-separated statements in one message and answers with the last
one's result, stopping at the first error. So this connection keeps libpq in
autocommit and opens the transaction itself:

- a statement sent while the server is idle goes as `BEGIN; <prefix>;
  <statement>` (one round trip; the prefix is the pooler's `SET LOCAL`);
- `commit()` and `rollback()` send COMMIT or ROLLBACK only when the server says
  a transaction is open (`PQtransactionStatus`, no round trip to ask), so a
  transaction whose last statement carried its own COMMIT (`commit_with`)
  commits in that statement's round trip.

Everything else DB-API promises is kept: outside logical autocommit no
statement ever runs outside a transaction, an error leaves the transaction
aborted until `rollback()`, and the server's own transaction status decides
what commit and rollback send. What the lazy BEGIN cannot serve (a named
cursor, a cursor class of the caller's, isolation level, read-only or
deferrable settings, large objects, two-phase commit) turns the connection
back into a plain psycopg2 connection for the rest of its life, at the cost of
its round trips, never of correctness.
"""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from brownout._db.retry import note_commit_sent

_BASE = ext.connection
_BASE_AUTOCOMMIT = _BASE.__dict__["autocommit"]
_BASE_STATUS = _BASE.__dict__["status"]
_IDLE = ext.TRANSACTION_STATUS_IDLE
_OPEN = (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)


class PipelinedCursor(ext.cursor):  # type: ignore[misc]  # psycopg2 has no type information
    """A cursor whose first statement of a transaction carries the BEGIN."""

    connection: PipelinedConnection

    def execute(self, query: Any, vars: Any = None) -> None:  # noqa: A002 - DB-API's name
        conn = self.connection
        if not conn.pipelined:
            conn.begin_plain()
        elif not conn.logical_autocommit and conn.get_transaction_status() == _IDLE:
            query = conn.begin_then(query, self)
        super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        self.connection.begin_alone()
        super().executemany(query, vars_list)

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        self.connection.begin_alone()
        return super().callproc(procname, parameters)

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> None:
        self.connection.begin_alone()
        super().copy_expert(sql, file, size)

    def copy_from(self, *args: Any, **kwargs: Any) -> None:
        self.connection.begin_alone()
        super().copy_from(*args, **kwargs)

    def copy_to(self, *args: Any, **kwargs: Any) -> None:
        self.connection.begin_alone()
        super().copy_to(*args, **kwargs)


class PipelinedConnection(ext.connection):  # type: ignore[misc]  # psycopg2 has no type information
    """See the module docstring; pass as psycopg2's `connection_factory`."""

    begin_prefix = "BEGIN"
    """What opens a transaction: `BEGIN`, or `BEGIN; SET LOCAL ...` (set once per connection class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipelined = True
        self.logical_autocommit = False
        _BASE_AUTOCOMMIT.__set__(self, True)
        self.cursor_factory = PipelinedCursor

    # -- the transaction, as DB-API sees it ---------------------------------

    def begin_then(self, query: Any, cursor: ext.cursor) -> Any:
        """*query* preceded by the BEGIN (same type: str or bytes)."""
        if isinstance(query, sql.Composable):
            query = query.as_string(cursor)
        if isinstance(query, bytes):
            return self.begin_prefix.encode() + b";" + query
        return f"{self.begin_prefix};{query}"

    def begin_alone(self) -> None:
        """Open the transaction with a round trip of its own (for calls a prefix cannot ride on)."""
        if not self.pipelined:
            self.begin_plain()
        elif not self.logical_autocommit and self.get_transaction_status() == _IDLE:
            self._send(self.begin_prefix)

    def begin_plain(self) -> None:
        """Once plain psycopg2, which opens its transactions with a bare BEGIN: when it is about to open one,
        send what the prefix adds to BEGIN (a pooler's `SET LOCAL statement_timeout`) in it first."""
        settings = self.begin_prefix.partition(";")[2]
        if settings and not _BASE_AUTOCOMMIT.__get__(self) and _BASE_STATUS.__get__(self) == ext.STATUS_READY:
            self._send(settings)  # psycopg2 sends its BEGIN, then this

    def unseen_transaction(self) -> bool:
        """The server has a transaction open that psycopg2's own status knows nothing of (this class opened it)."""
        return not self.closed and _BASE_STATUS.__get__(self) == ext.STATUS_READY and self.get_transaction_status() in _OPEN

    @property
    def status(self) -> int:
        """psycopg2's status, but STATUS_IN_TRANSACTION while the server has a transaction open: psycopg2.extras'
        type lookups (register_json, register_composite, hstore ...) roll back after themselves unless it says so."""
        return ext.STATUS_IN_TRANSACTION if self.unseen_transaction() else int(_BASE_STATUS.__get__(self))

    def commit(self) -> None:
        if not self.pipelined:
            if self.unseen_transaction():
                self.end_unseen("COMMIT")
            else:
                super().commit()
        elif self.get_transaction_status() != _IDLE:  # unknown (a lost link) sends too, and fails as it should
            self._send("COMMIT")

    def rollback(self) -> None:
        if not self.pipelined:
            if self.unseen_transaction():
                self.end_unseen("ROLLBACK")
            else:
                super().rollback()
        elif self.get_transaction_status() != _IDLE:
            self._send("ROLLBACK")

    def end_unseen(self, statement: str) -> None:
        """End a transaction psycopg2 does not know of (it stopped pipelining inside it, before sending any
        BEGIN of its own): its commit() and rollback() would send nothing. Sent as in autocommit, where
        psycopg2 sends no BEGIN before it."""
        autocommit = _BASE_AUTOCOMMIT.__get__(self)
        _BASE_AUTOCOMMIT.__set__(self, True)
        try:
            self._send(statement)
        finally:
            if not self.closed:
                _BASE_AUTOCOMMIT.__set__(self, autocommit)

    def bare_cursor(self) -> Any:
        """A cursor whose statements carry no BEGIN: outside a transaction they run on their own (autocommit).
        Once plain psycopg2, an ordinary cursor."""
        if self.pipelined:
            return ext.cursor(self)
        # Plain psycopg2 again: its statements open a transaction (it would send a bare BEGIN); this one's
        # adds the prefix's settings (begin_plain). Switching autocommit for it would cost a round trip here
        # once the session has an isolation level (psycopg2 resets default_transaction_isolation).
        return self.cursor()

    def _send(self, statement: str) -> None:
        with ext.cursor(self) as cursor:
            cursor.execute(statement)

    @property
    def autocommit(self) -> bool:
        return self.logical_autocommit if self.pipelined else bool(_BASE_AUTOCOMMIT.__get__(self))

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if not self.pipelined:
            _BASE_AUTOCOMMIT.__set__(self, value)
            return
        if bool(value) != self.logical_autocommit and self.get_transaction_status() != _IDLE:
            raise psycopg2.ProgrammingError("set_session cannot be used inside a transaction")
        self.logical_autocommit = bool(value)

    # -- what the lazy BEGIN cannot serve: plain psycopg2 from then on ------

    def stop_pipelining(self) -> None:
        """Become a plain psycopg2 connection. A transaction already open stays open: psycopg2, which
        believes none is, sends a BEGIN that the server answers with a warning, and goes on in it."""
        if self.pipelined:
            self.pipelined = False
            _BASE_AUTOCOMMIT.__set__(self, self.logical_autocommit)
            # The cursors stay PipelinedCursor: as plain psycopg2's they add the prefix's settings (begin_plain).

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if (args and args[0]) or kwargs.get("name") is not None:  # a server-side cursor: psycopg2 makes its DECLARE
            self.stop_pipelining()
            self.begin_plain()
            return super().cursor(*args, **kwargs)
        factory = kwargs.get("cursor_factory")
        if factory is not None and not issubclass(factory, PipelinedCursor):
            kwargs["cursor_factory"] = _pipelined_cursor_class(factory)
        return super().cursor(*args, **kwargs)

    def set_isolation_level(self, level: Any) -> None:
        if self.unseen_transaction():
            self.end_unseen("ROLLBACK")  # psycopg2's own rolls back the transaction in progress, but cannot see this one
        self.stop_pipelining()
        super().set_isolation_level(level)

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        self.stop_pipelining()
        super().set_session(*args, **kwargs)

    def lobject(self, *args: Any, **kwargs: Any) -> Any:
        self.stop_pipelining()
        return super().lobject(*args, **kwargs)

    def tpc_begin(self, xid: Any) -> None:
        self.stop_pipelining()
        super().tpc_begin(xid)

    @property
    def isolation_level(self) -> Any:
        return _BASE.__dict__["isolation_level"].__get__(self)

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self.stop_pipelining()
        _BASE.__dict__["isolation_level"].__set__(self, value)

    @property
    def readonly(self) -> Any:
        return _BASE.__dict__["readonly"].__get__(self)

    @readonly.setter
    def readonly(self, value: Any) -> None:
        if value:
            self.stop_pipelining()
        _BASE.__dict__["readonly"].__set__(self, value)

    @property
    def deferrable(self) -> Any:
        return _BASE.__dict__["deferrable"].__get__(self)

    @deferrable.setter
    def deferrable(self, value: Any) -> None:
        if value:
            self.stop_pipelining()
        _BASE.__dict__["deferrable"].__set__(self, value)


_CURSOR_CLASSES: dict[type, type] = {ext.cursor: PipelinedCursor}


def _pipelined_cursor_class(factory: type) -> type:
    """*factory* (a cursor class of the caller's or of psycopg2.extras) with the BEGIN riding on its execute."""
    made = _CURSOR_CLASSES.get(factory)
    if made is None:
        made = _CURSOR_CLASSES.setdefault(factory, type(f"Pipelined{factory.__name__}", (PipelinedCursor, factory), {}))
    return made


_COMMIT_AFTER = "brownout_commit_after"


def commit_with(session: Session, statement: Any, params: Any) -> None:
    """Execute *statement* and commit, in one round trip on a pipelined connection (two elsewhere).

    The statement's own result is lost (the COMMIT's answer comes last): give one that returns nothing,
    and let a constraint it breaks say what went wrong. A failure of either rolls both back."""
    session.execute(statement, params, execution_options={_COMMIT_AFTER: True})
    session.commit()  # sends nothing when the COMMIT went with the statement


def _commit_in_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    if context is None or executemany or not context.execution_options.get(_COMMIT_AFTER):
        return statement, parameters
    if conn.in_nested_transaction():  # Session.commit() must RELEASE the SAVEPOINT before the COMMIT
        return statement, parameters
    dbapi = cursor.connection
    if not isinstance(dbapi, PipelinedConnection) or not dbapi.pipelined or dbapi.logical_autocommit:
        return statement, parameters
    note_commit_sent()  # a lost link now leaves the outcome unknown (retry.py)
    return statement + "\n;COMMIT", parameters  # a new line: a trailing -- comment cannot swallow it


def install(engine: Engine) -> None:
    """Let `commit_with` fold its COMMIT into the statement on *engine*'s pipelined connections."""
    event.listen(engine, "before_cursor_execute", _commit_in_statement, retval=True)


def connection_class(begin_prefix: str) -> type[PipelinedConnection]:
    """A PipelinedConnection class whose transactions open with *begin_prefix*."""
    if begin_prefix == PipelinedConnection.begin_prefix:
        return PipelinedConnection
    return type("PipelinedConnection", (PipelinedConnection,), {"begin_prefix": begin_prefix})
