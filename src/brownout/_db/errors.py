"""Errors raised by the database layer, and the one place that classifies failures.

Error tree::

    Exception
     └── BrownoutDbError
          ├── CircuitOpenError       the breaker refused the call (no I/O was done)
          ├── DeadlineExceeded       the call's time budget ran out (cause: last error)
          └── CommitOutcomeUnknown   the connection died during COMMIT of a
                                     call not marked idempotent

`classify()` sorts any exception raised through SQLAlchemy/psycopg2 (or a
pooler in front of PostgreSQL) into an `ErrorKind`. Retry and the breaker both
use it, so "what is worth retrying" and "what counts as the database being
sick" can never disagree. Only `Exception` is ever classified: `BaseException`
(KeyboardInterrupt, SystemExit, task cancellation) is never a failure.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from enum import StrEnum

import psycopg2
import pydantic
import sqlalchemy.exc

from brownout._db.waiting import DatabaseDeadlineReached
from brownout._redaction import mask_secrets


class BrownoutDbError(Exception):
    """Raised by the database layer itself rather than by the database."""


class CircuitOpenError(BrownoutDbError):
    """Raised when the circuit breaker refuses a call; `retry_after` is in seconds."""

    def __init__(self, name: str, retry_after: float, state: str) -> None:
        self.name = name
        self.retry_after = max(0.0, retry_after)
        self.state = state
        super().__init__(f"circuit breaker {name!r} is {state}: next trial in {self.retry_after:.1f} s")


class DeadlineExceeded(BrownoutDbError, TimeoutError):
    """Raised when a call's deadline is spent; `__cause__` is the last failure, if any."""

    def __init__(self, deadline: float, attempts: int) -> None:
        self.deadline = deadline
        self.attempts = attempts
        super().__init__(f"database deadline of {deadline:.3f} s spent after {attempts} attempt(s)")


class CommitOutcomeUnknown(BrownoutDbError):
    """Raised when the connection was lost during COMMIT and the call is not idempotent.

    The transaction may or may not have been applied; only the caller (with an
    idempotency key, for instance) can make a retry safe.
    """


class ErrorKind(StrEnum):
    """How a failure should be treated. Values double as metric labels."""

    SSL = "ssl"  # transient disconnect on a TLS link ("SSL connection has been closed unexpectedly")
    DISCONNECT = "disconnect"  # transient: the connection is gone
    TRANSIENT = "transient"  # transient: the connection is fine, try again
    PERMANENT = "permanent"  # a bug, bad data or a constraint: retrying cannot help

    @property
    def is_transient(self) -> bool:
        return self is not ErrorKind.PERMANENT

    @property
    def is_disconnect(self) -> bool:
        return self is ErrorKind.SSL or self is ErrorKind.DISCONNECT


# SQLSTATE -> kind. Class 08 (connection exception) is matched by prefix below.
_SQLSTATES: dict[str, ErrorKind] = {
    "57P01": ErrorKind.DISCONNECT,  # admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02": ErrorKind.DISCONNECT,  # crash_shutdown
    "57P03": ErrorKind.DISCONNECT,  # cannot_connect_now (starting up, recovery)
    "57P05": ErrorKind.DISCONNECT,  # idle_session_timeout
    "25P03": ErrorKind.DISCONNECT,  # idle_in_transaction_session_timeout (server closes)
    "40001": ErrorKind.TRANSIENT,  # serialization_failure
    "40P01": ErrorKind.TRANSIENT,  # deadlock_detected
    "55P03": ErrorKind.TRANSIENT,  # lock_not_available (lock_timeout, NOWAIT)
    "53300": ErrorKind.TRANSIENT,  # too_many_connections
    "57014": ErrorKind.TRANSIENT,  # query_canceled (statement_timeout, deadline cancel)
}

# Lower-case fragments of libpq, psycopg2 and pooler messages. Only consulted for
# errors without a SQLSTATE (raised by the client library) or with a connection
# SQLSTATE (class 08, which poolers use for everything): a server error's text
# can quote user data and must never decide.
#
# Under psycopg2's wait callback a pooler's FATAL text arrives together with
# libpq's "SSL connection has been closed unexpectedly". When the pooler says
# the database is merely busy (a full pool, a wait timeout), that is the label;
# when it says a server connection died, the client's TLS link died with it,
# and it is the SSL error.
_BUSY_MESSAGES: tuple[tuple[str, ErrorKind], ...] = (
    ("query_wait_timeout", ErrorKind.TRANSIENT),
    ("no more connections allowed", ErrorKind.TRANSIENT),
    ("max client connections reached", ErrorKind.TRANSIENT),
    ("sorry, too many clients already", ErrorKind.TRANSIENT),
    ("brownout deadline reached", ErrorKind.TRANSIENT),  # our own wait callback (waiting.py)
)
_SSL_MESSAGES = (
    "ssl connection has been closed unexpectedly",
    "ssl syscall error",
    "ssl error:",
    "decryption failed or bad record mac",
)
_LINK_MESSAGES: tuple[tuple[str, ErrorKind], ...] = (
    ("server closed the connection unexpectedly", ErrorKind.DISCONNECT),
    ("terminating connection", ErrorKind.DISCONNECT),
    ("connection refused", ErrorKind.DISCONNECT),
    ("connection reset", ErrorKind.DISCONNECT),
    ("connection timed out", ErrorKind.DISCONNECT),
    ("timeout expired", ErrorKind.DISCONNECT),  # libpq connect_timeout
    ("could not connect to server", ErrorKind.DISCONNECT),
    ("could not receive data from server", ErrorKind.DISCONNECT),
    ("could not send data to server", ErrorKind.DISCONNECT),
    ("no connection to the server", ErrorKind.DISCONNECT),
    ("connection already closed", ErrorKind.DISCONNECT),
    ("connection not open", ErrorKind.DISCONNECT),
    ("the database system is shutting down", ErrorKind.DISCONNECT),
    ("the database system is starting up", ErrorKind.DISCONNECT),
    ("the database system is in recovery mode", ErrorKind.DISCONNECT),
    ("could not translate host name", ErrorKind.DISCONNECT),
    # PgBouncer / Supavisor: the pooler answers, its link to PostgreSQL does not.
    ("server conn crashed", ErrorKind.DISCONNECT),
    ("pgbouncer cannot connect to server", ErrorKind.DISCONNECT),
    ("server login has been failing", ErrorKind.DISCONNECT),
)

_DISCONNECT_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, the DBAPI error SQLAlchemy wrapped, and their causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and id(orig) not in seen:
            current = orig
        else:
            current = current.__cause__ or current.__context__


# Supavisor (Supabase's pooler) reports its own failures as XX000 with a code in
# parentheses; only these exact tokens are read from an XX000 text.
_SUPAVISOR_CODES = {
    "(echeckouttimeout)": ErrorKind.TRANSIENT,
    "(emaxconn)": ErrorKind.TRANSIENT,
    "(edbhandlerexited)": ErrorKind.DISCONNECT,
}


def _classify_dbapi(exc: psycopg2.Error) -> ErrorKind:
    code = exc.pgcode
    if code == "XX000":
        text = str(exc).lower()
        for token, kind in _SUPAVISOR_CODES.items():
            if token in text:
                return kind
    connection_code = code is None or code.startswith("08") or _SQLSTATES.get(code) is ErrorKind.DISCONNECT
    message = str(exc).lower() if connection_code else ""
    for fragment, kind in _BUSY_MESSAGES:
        if fragment in message:
            return kind
    if any(fragment in message for fragment in _SSL_MESSAGES):
        return ErrorKind.SSL
    if code in _SQLSTATES:
        return _SQLSTATES[code]
    for fragment, kind in _LINK_MESSAGES:
        if fragment in message:
            return kind
    if code is not None and code.startswith("08"):
        return ErrorKind.DISCONNECT
    return ErrorKind.PERMANENT


def _classify_one(exc: BaseException) -> ErrorKind | None:
    if isinstance(exc, psycopg2.Error):
        return _classify_dbapi(exc)
    if isinstance(exc, BrownoutDbError):
        return ErrorKind.TRANSIENT if isinstance(exc, DeadlineExceeded) else ErrorKind.PERMANENT
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # pool checkout timeout
        return ErrorKind.TRANSIENT
    if isinstance(exc, ConnectionError) or (isinstance(exc, OSError) and exc.errno in _DISCONNECT_ERRNOS):
        return ErrorKind.DISCONNECT
    if isinstance(exc, TimeoutError):
        return ErrorKind.TRANSIENT
    return None


def is_slow_connect(exc: BaseException) -> bool:
    """True when *exc* is (or wraps) a connect that our wait callback cut at the caller's deadline."""
    return any(isinstance(link, DatabaseDeadlineReached) and link.connecting for link in _chain(exc))


def classify(exc: Exception) -> ErrorKind:
    """Return how *exc* should be treated: SSL, DISCONNECT, TRANSIENT or PERMANENT."""
    invalidated = False
    for link in _chain(exc):
        if isinstance(link, sqlalchemy.exc.DBAPIError):
            # Decided by the DBAPI error it wraps (next in the chain): the
            # wrapper's text quotes SQL and parameters. SQLAlchemy's own
            # disconnect verdict still counts.
            invalidated = invalidated or link.connection_invalidated
            continue
        kind = _classify_one(link)
        if kind is not None:
            if invalidated and not kind.is_disconnect:
                return ErrorKind.DISCONNECT
            return kind
    return ErrorKind.DISCONNECT if invalidated else ErrorKind.PERMANENT


def describe(exc: BaseException) -> str:
    """One line for logs and health output: the driver's message, password masked.

    SQLAlchemy's own text adds the SQL and its parameters, which stay out; so does the input pydantic quotes
    for each field it refuses (a queued write's payload, an email's subject and body).
    """
    inner = getattr(exc, "orig", None) or exc
    if isinstance(inner, pydantic.ValidationError):
        problems = inner.errors(include_url=False, include_context=False, include_input=False)
        fields = "; ".join(f"{'.'.join(map(str, problem['loc'])) or 'value'}: {problem['msg']}" for problem in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        return mask_secrets(f"ValidationError ({inner.title}): {fields}{more}")
    line = str(inner).strip().partition("\n")[0]
    return mask_secrets(f"{type(inner).__name__}: {line}" if line else type(inner).__name__)


# The server's own word that it rolled the transaction back: raised inside the work (a lock wait, a
# serialization check, the COMMIT's pre-commit check), never after a commit record was written. A
# cancel or a termination can land after one, and a closed link says nothing, so those stay unknown.
_ROLLED_BACK_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected


def commit_rolled_back(exc: BaseException) -> bool:
    """True when *exc* is PostgreSQL's answer to a COMMIT, alone or sent after a last statement (`commit_with`),
    saying it rolled the transaction back. Only the error's own code counts, never one it was raised while
    handling (a deadlock caught in a savepoint, then a COMMIT whose link died), and only an error raised by the
    COMMIT itself (SQLAlchemy gives a COMMIT's failure no statement): a statement's failure after an earlier
    transaction of the same call committed says nothing of that one."""
    if not isinstance(exc, sqlalchemy.exc.DBAPIError) or not isinstance(exc.orig, psycopg2.Error):
        return False
    statement = exc.statement
    on_commit = statement is None or statement.rstrip().upper().endswith(";COMMIT")
    return on_commit and exc.orig.pgcode in _ROLLED_BACK_SQLSTATES


def constraint_of(exc: BaseException) -> str | None:
    """The name of the constraint PostgreSQL says *exc* (or what it wraps) violated, if any."""
    for link in _chain(exc):
        if isinstance(link, psycopg2.Error) and link.diag.constraint_name:
            return str(link.diag.constraint_name)
    return None
