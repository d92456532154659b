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

- a statement sent while the server is idle goes as `BEGIN [modes];
  [settings;] <statement>` (one round trip; the settings are the pooler's
  `SET LOCAL statement_timeout`);
- `commit()` and `rollback()` send COMMIT or ROLLBACK only when the server says
  a transaction is open (`PQtransactionStatus`, no round trip to ask), so a
  transaction whose last statement carried its own COMMIT (`commit_with`)
  commits in that statement's round trip.

Everything else DB-API promises is kept: outside autocommit no statement
ever runs outside a transaction, an error leaves the transaction aborted until
`rollback()`, and the server's own transaction status decides what commit and
rollback send. Transaction modes (isolation level, read-only, deferrable) are
kept here and sent with the BEGIN, as psycopg2 would; a server-side cursor
opens its transaction with a round trip of its own and is declared WITH HOLD
(psycopg2 refuses any other kind while libpq is in autocommit), and closed
before its transaction's COMMIT or ROLLBACK unless the caller asked WITH HOLD
(psycopg2's own would end with the transaction); large objects
and two-phase commit are refused with NotSupportedError.
"""

from __future__ import annotations

import weakref
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
from psycopg2 import sql
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from brownout._db.retry import note_commit_sent

_BASE_AUTOCOMMIT = ext.connection.__dict__["autocommit"]
_BASE_STATUS = ext.connection.__dict__["status"]  # STATUS_SETUP while connecting: waiting.py reads it
_IDLE = ext.TRANSACTION_STATUS_IDLE
_OPEN = (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)
_LEVELS = {
    ext.ISOLATION_LEVEL_READ_UNCOMMITTED: "READ UNCOMMITTED",
    ext.ISOLATION_LEVEL_READ_COMMITTED: "READ COMMITTED",
    ext.ISOLATION_LEVEL_REPEATABLE_READ: "REPEATABLE READ",
    ext.ISOLATION_LEVEL_SERIALIZABLE: "SERIALIZABLE",
}


CLIENT_CHECK = "SET LOCAL client_connection_check_interval = 100"
"""Sent with every BEGIN where the server takes it (`_server_checks_clients`). When a deadline closes the
connection mid-query (waiting.py: no PQcancel), PostgreSQL otherwise goes on with the statement until it
next writes to the socket, and with the rest of its message: a record sent with its COMMIT could commit
after the request was answered "not applied", and a slow query cut by the deadline loads a struggling
database for nobody. With the check the backend polls its socket every 100 ms while it works and stops,
rolling back, once the client is gone."""


_CLIENT_CHECK_TAKEN: dict[tuple[str, int], bool] = {}
"""Per server (host, port) this process connected to: whether it takes CLIENT_CHECK."""
_INVALID_PARAMETER_VALUE = "22023"  # the platform cannot poll for a closed peer
_UNDEFINED_OBJECT = "42704"  # a server that calls itself 14 but does not know the setting (a fork, a proxy)


class PipelinedCursor(ext.cursor):  # type: ignore[misc]  # psycopg2 has no type information
    """A cursor whose first statement of a transaction carries the BEGIN."""

    connection: PipelinedConnection

    def execute(self, query: Any, vars: Any = None) -> None:  # noqa: A002 - DB-API's name
        conn = self.connection
        if self.name is not None:  # psycopg2 wraps the query in its DECLARE: nothing can ride in front of it
            conn.begin_alone()
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
        self._begin_copy()
        super().copy_expert(sql, file, size)

    def copy_from(self, *args: Any, **kwargs: Any) -> None:
        self._begin_copy()
        super().copy_from(*args, **kwargs)

    def copy_to(self, *args: Any, **kwargs: Any) -> None:
        self._begin_copy()
        super().copy_to(*args, **kwargs)

    def _begin_copy(self) -> None:
        # psycopg2 refuses COPY under a wait callback (waiting.py, always on in the engine) before it sends
        # anything: a BEGIN sent first would leave a transaction open that the caller never began.
        if ext.get_wait_callback() is None:
            self.connection.begin_alone()


class _NamedCursor(PipelinedCursor):
    """A server-side cursor the caller did not ask WITH HOLD: refused in autocommit, as psycopg2's own is, and
    once closed with its transaction (close_named_cursors) it says so as psycopg2's own would, with a
    ProgrammingError, not with "cursor already closed", an InterfaceError SQLAlchemy takes for a lost
    connection (and invalidates it, and the pool with it)."""

    ended_with_transaction = False

    def execute(self, query: Any, vars: Any = None) -> None:  # noqa: A002 - DB-API's name
        if self.connection.logical_autocommit:  # declared WITH HOLD outside a transaction: materialised whole
            raise psycopg2.ProgrammingError("can't use a named cursor outside of transactions")
        super().execute(query, vars)

    def _refuse_if_ended(self) -> None:
        if self.ended_with_transaction:
            raise psycopg2.ProgrammingError("named cursor isn't valid anymore")

    def fetchone(self) -> Any:
        self._refuse_if_ended()
        return super().fetchone()

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_if_ended()
        return super().fetchmany(*args, **kwargs)

    def fetchall(self) -> Any:
        self._refuse_if_ended()
        return super().fetchall()

    def scroll(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_if_ended()
        return super().scroll(*args, **kwargs)

    def __next__(self) -> Any:
        self._refuse_if_ended()
        return super().__next__()


class PipelinedConnection(ext.connection):  # type: ignore[misc]  # psycopg2 has no type information
    """See the module docstring; pass as psycopg2's `connection_factory`."""

    cursor_factory: type | None  # psycopg2's: the class conn.cursor() makes when given none

    begin_settings = ""
    """Statements every transaction opens with, after its BEGIN (a pooler's `SET LOCAL statement_timeout`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logical_autocommit = False
        self._level: str | None = None  # None: the server's default
        self._readonly = False
        self._deferrable = False
        self._named_cursors: weakref.WeakSet[ext.cursor] = weakref.WeakSet()
        _BASE_AUTOCOMMIT.__set__(self, True)
        self.cursor_factory = PipelinedCursor
        self._client_check = self._server_checks_clients()
        self._begin = self._compose_begin()

    def _server_checks_clients(self) -> bool:
        """Whether this server takes CLIENT_CHECK: PostgreSQL 14 and later, on a platform whose kernel reports a
        closed peer (14 on Linux only; 15 also macOS and the BSDs; never Windows), where any other refuses every
        transaction that sets it. Asked once per server and process (a round trip on the first connection)."""
        if self.server_version < 140000:  # noqa: PLR2004 - PostgreSQL 14, where the setting appeared
            return False
        server = (self.info.host, self.info.port)
        known = _CLIENT_CHECK_TAKEN.get(server)
        if known is None:
            try:
                self._send("SELECT set_config('client_connection_check_interval', '100', true)")
                known = True
            except psycopg2.Error as exc:
                if exc.pgcode not in (_INVALID_PARAMETER_VALUE, _UNDEFINED_OBJECT):
                    raise
                known = False
            _CLIENT_CHECK_TAKEN[server] = known
        return known

    # -- the transaction, as DB-API sees it ---------------------------------

    def _compose_begin(self) -> str:
        modes = [f"ISOLATION LEVEL {self._level}"] if self._level else []
        modes += ["READ ONLY"] if self._readonly else []
        modes += ["DEFERRABLE"] if self._deferrable else []
        begin = " ".join(["BEGIN", ", ".join(modes)]) if modes else "BEGIN"
        return ";".join(part for part in (begin, self.begin_settings, CLIENT_CHECK if self._client_check else "") if part)

    def begin_then(self, query: Any, cursor: ext.cursor) -> Any:
        """*query* preceded by the BEGIN (same type: str or bytes)."""
        if isinstance(query, sql.Composable):
            query = query.as_string(cursor)
        if isinstance(query, bytes):
            return self._begin.encode() + b";" + query
        return f"{self._begin};{query}"

    def begin_alone(self) -> None:
        """Open the transaction with a round trip of its own (for calls a prefix cannot ride on)."""
        if not self.logical_autocommit and self.get_transaction_status() == _IDLE:
            self._send(self._begin)

    def in_transaction(self) -> bool:
        return self.get_transaction_status() in _OPEN

    @property
    def status(self) -> int:
        """STATUS_IN_TRANSACTION while the server has a transaction open (psycopg2 itself never opened one):
        psycopg2.extras' type lookups (register_json, register_composite, hstore ...) roll back after
        themselves unless it says so."""
        return int(ext.STATUS_IN_TRANSACTION if self.in_transaction() else _BASE_STATUS.__get__(self))

    def commit(self) -> None:
        status = self.get_transaction_status()
        if status == ext.TRANSACTION_STATUS_INERROR:
            # PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK and no error, and psycopg2 reports
            # success: a write whose failure someone swallowed would be lost in silence. Say so instead.
            self.rollback()
            raise psycopg2.errors.InFailedSqlTransaction(
                "COMMIT of a transaction a failed statement aborted: rolled back, nothing committed"
            )
        if status != _IDLE:  # unknown (a lost link) sends too, and fails as it should
            self.close_named_cursors()
            self._send("COMMIT")

    def rollback(self) -> None:
        if self.get_transaction_status() != _IDLE:
            self.close_named_cursors()
            self._send("ROLLBACK")

    def close_named_cursors(self, but: Any = None) -> None:
        """Close the server-side cursors still open (except *but*) before their transaction ends, as psycopg2's
        own (WITHOUT HOLD) end with it; those the caller asked WITH HOLD are left alone.

        Left open, a cursor declared WITH HOLD here would, at a COMMIT, have the rest of its rows materialised
        on the server and stay there, on a connection back in the pool, until closed; at a ROLLBACK the server
        drops it, but psycopg2 would still send `CLOSE <name>` when the cursor is closed later, inside whatever
        transaction the connection is in by then: "cursor does not exist" aborts it, and its COMMIT, answered
        ROLLBACK without an error, loses its writes. Closed now, psycopg2 sends the CLOSE inside this
        transaction (nothing while it is aborted) and never again. Costs a round trip per cursor left open."""
        if not self._named_cursors:  # the usual case: nothing streamed, or read to its end
            return
        for cursor in list(self._named_cursors):
            if cursor is but:
                continue
            self._named_cursors.discard(cursor)
            if not cursor.closed:
                cursor.ended_with_transaction = True
                try:
                    cursor.close()
                except psycopg2.Error:  # the rollback that follows ends the transaction this aborted
                    pass

    def bare_cursor(self) -> Any:
        """A cursor whose statements carry no BEGIN: outside a transaction they run on their own (autocommit)."""
        return ext.cursor(self)

    def _send(self, statement: str) -> None:
        with ext.cursor(self) as cursor:
            cursor.execute(statement)

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and self.cursor_factory is PipelinedCursor:  # SQLAlchemy's, per statement
            return super().cursor()
        for key, value in zip(("name", "cursor_factory", "scrollable", "withhold"), args, strict=False):
            kwargs.setdefault(key, value)
        named = kwargs.get("name") is not None
        asked_to_hold = bool(kwargs.get("withhold"))
        # The connection's own cursor_factory too (psycopg2 falls back on it): a cursor without ours would send
        # its statements without the BEGIN, each committing on its own.
        factory = kwargs.get("cursor_factory") or self.cursor_factory or ext.cursor
        if not issubclass(factory, PipelinedCursor):
            factory = _pipelined_cursor_class(factory)
        if named:
            # A server-side cursor: psycopg2 refuses one WITHOUT HOLD while libpq is in autocommit. Declared WITH
            # HOLD inside the transaction (begin_alone) it reads the same rows; unless the caller asked WITH HOLD,
            # commit() and rollback() close it first, so it ends with its transaction as psycopg2's own would.
            kwargs["withhold"] = True
            if not asked_to_hold:
                factory = _pipelined_cursor_class(factory, named=True)
        kwargs["cursor_factory"] = factory
        made = super().cursor(**kwargs)
        if named and not asked_to_hold:
            self._named_cursors.add(made)
        return made

    # -- transaction modes: logical, carried by the BEGIN -------------------

    def _refuse_inside_a_transaction(self) -> None:
        if self.in_transaction():
            raise psycopg2.ProgrammingError("set_session cannot be used inside a transaction")

    @property
    def autocommit(self) -> bool:
        return self.logical_autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if bool(value) != self.logical_autocommit:
            self._refuse_inside_a_transaction()
        self.logical_autocommit = bool(value)

    def set_isolation_level(self, level: Any) -> None:
        """As psycopg2's: a transaction in progress is rolled back; 0 (ISOLATION_LEVEL_AUTOCOMMIT) is autocommit."""
        if level not in (None, ext.ISOLATION_LEVEL_AUTOCOMMIT, *_LEVELS):
            raise ValueError(f"isolation level {level!r} unknown")
        self.rollback()
        self.logical_autocommit = level == ext.ISOLATION_LEVEL_AUTOCOMMIT
        self._level = _LEVELS.get(level)
        self._begin = self._compose_begin()

    def set_session(
        self, isolation_level: Any = None, readonly: Any = None, deferrable: Any = None, autocommit: Any = None
    ) -> None:
        self._refuse_inside_a_transaction()
        if isolation_level is not None:
            self.isolation_level = isolation_level
        if readonly is not None:
            self.readonly = readonly
        if deferrable is not None:
            self.deferrable = deferrable
        if autocommit is not None:
            self.autocommit = autocommit

    @property
    def isolation_level(self) -> Any:
        return next((number for number, name in _LEVELS.items() if name == self._level), None)

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._refuse_inside_a_transaction()
        if isinstance(value, str):
            named = value.upper().replace("_", " ")
            value = None if named == "DEFAULT" else next((n for n, name in _LEVELS.items() if name == named), value)
        if value not in (None, *_LEVELS):
            raise ValueError(f"isolation level {value!r} unknown")
        self._level = _LEVELS.get(value)
        self._begin = self._compose_begin()

    @property
    def readonly(self) -> bool | None:
        return True if self._readonly else None

    @readonly.setter
    def readonly(self, value: Any) -> None:
        self._refuse_inside_a_transaction()
        self._readonly = bool(value) and value != "default"
        self._begin = self._compose_begin()

    @property
    def deferrable(self) -> bool | None:
        return True if self._deferrable else None

    @deferrable.setter
    def deferrable(self, value: Any) -> None:
        self._refuse_inside_a_transaction()
        self._deferrable = bool(value) and value != "default"
        self._begin = self._compose_begin()

    # -- what needs libpq out of autocommit ----------------------------------

    def lobject(self, *args: Any, **kwargs: Any) -> Any:
        raise psycopg2.NotSupportedError("large objects need a plain psycopg2 connection, not Brownout's engine")

    def reset(self) -> None:
        """As psycopg2's: the transaction in progress rolled back (psycopg2's own sees none, and its DISCARD ALL
        failed inside it), the session and its modes back to the defaults; libpq stays in autocommit (psycopg2's
        reset turns it off, and psycopg2 then sent a BEGIN of its own in front of ours)."""
        self.close_named_cursors()  # DISCARD ALL drops those held past a COMMIT too
        self.rollback()
        super().reset()
        _BASE_AUTOCOMMIT.__set__(self, True)
        self.logical_autocommit = False
        self._level = None
        self._readonly = self._deferrable = False
        self._begin = self._compose_begin()

    def tpc_begin(self, xid: Any) -> None:
        raise psycopg2.NotSupportedError("two-phase commit needs a plain psycopg2 connection, not Brownout's engine")


_CURSOR_CLASSES: dict[tuple[type, bool], type] = {(ext.cursor, False): PipelinedCursor, (PipelinedCursor, True): _NamedCursor}


def _pipelined_cursor_class(factory: type, *, named: bool = False) -> type:
    """*factory* (a cursor class of the caller's or of psycopg2.extras) with the BEGIN riding on its execute
    (and, *named*, with _NamedCursor's checks)."""
    made = _CURSOR_CLASSES.get((factory, named))
    if made is None:
        base = _NamedCursor if named else PipelinedCursor
        made = _CURSOR_CLASSES.setdefault((factory, named), type(f"Pipelined{factory.__name__}", (base, factory), {}))
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
    if not isinstance(dbapi, PipelinedConnection) or dbapi.logical_autocommit:
        return statement, parameters
    dbapi.close_named_cursors(but=cursor)  # a streamed read left open ends with its transaction
    note_commit_sent()  # a lost link now leaves the outcome unknown (retry.py)
    return statement + "\n;COMMIT", parameters  # a new line: a trailing -- comment cannot swallow it


def install(engine: Engine) -> None:
    """Let `commit_with` fold its COMMIT into the statement on *engine*'s pipelined connections."""
    event.listen(engine, "before_cursor_execute", _commit_in_statement, retval=True)


def connection_class(begin_settings: str = "") -> type[PipelinedConnection]:
    """A PipelinedConnection class whose transactions open with `BEGIN;` and *begin_settings*."""
    if not begin_settings:
        return PipelinedConnection
    return type("PipelinedConnection", (PipelinedConnection,), {"begin_settings": begin_settings})
