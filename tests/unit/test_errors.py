"""classify(): one table decides what is retried and what counts against the breaker.

Exceptions are built as the driver would raise them; SQLSTATEs come from
`fakes.pg_error` (psycopg2 sets `pgcode` only on errors read from a server).
"""

from __future__ import annotations

import errno

import psycopg2
import pytest
import sqlalchemy.exc

from brownout._db.errors import (
    BrownoutDbError,
    CircuitOpenError,
    CommitOutcomeUnknown,
    DeadlineExceeded,
    ErrorKind,
    classify,
    describe,
)
from tests.support.fakes import pg_error

SSL, DISCONNECT, TRANSIENT, PERMANENT = ErrorKind.SSL, ErrorKind.DISCONNECT, ErrorKind.TRANSIENT, ErrorKind.PERMANENT
OpErr, IfaceErr = psycopg2.OperationalError, psycopg2.InterfaceError

# (id, the driver's exception, expected kind)
DRIVER_TABLE: list[tuple[str, psycopg2.Error, ErrorKind]] = [
    # TLS link lost - client-side, no SQLSTATE.
    ("ssl-closed", OpErr("SSL connection has been closed unexpectedly\n"), SSL),
    ("ssl-syscall", OpErr("SSL SYSCALL error: EOF detected\n"), SSL),
    ("ssl-bad-mac", OpErr("SSL error: decryption failed or bad record mac\n"), SSL),
    ("ssl-in-receive", OpErr("could not receive data from server: SSL SYSCALL error: Connection reset by peer\n"), SSL),
    ("ssl-08006", pg_error("08006", "SSL connection has been closed unexpectedly"), SSL),
    # libpq: the connection is gone or never came.
    (
        "server-closed",
        OpErr(
            "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally\n"
            "\tbefore or while processing the request.\n"
        ),
        DISCONNECT,
    ),
    (
        "refused",
        OpErr(
            'connection to server at "127.0.0.1", port 5432 failed: Connection refused\n'
            "\tIs the server running on that host and accepting TCP/IP connections?\n"
        ),
        DISCONNECT,
    ),
    (
        "connect-timeout",
        OpErr('connection to server at "db.example.com" (10.0.0.7), port 6543 failed: timeout expired\n'),
        DISCONNECT,
    ),
    ("receive", OpErr("could not receive data from server: Connection timed out\n"), DISCONNECT),
    ("send", OpErr("could not send data to server: Broken pipe\n"), DISCONNECT),
    ("reset", OpErr("could not receive data from server: Connection reset by peer\n"), DISCONNECT),
    ("dns", OpErr('could not translate host name "db.internal" to address: Name or service not known\n'), DISCONNECT),
    ("already-closed", IfaceErr("connection already closed"), DISCONNECT),
    ("08006-unknown-text", pg_error("08006", "something new the pooler says"), DISCONNECT),
    # PgBouncer / Supavisor texts, without and with the 08P01 it sends.
    ("pgb-crashed", OpErr("server conn crashed?"), DISCONNECT),
    ("pgb-crashed-08P01", pg_error("08P01", "server conn crashed?"), DISCONNECT),
    ("pgb-cannot-connect", pg_error("08P01", "pgbouncer cannot connect to server"), DISCONNECT),
    ("pgb-query-wait", OpErr("query_wait_timeout"), TRANSIENT),
    ("pgb-query-wait-08P01", pg_error("08P01", "query_wait_timeout"), TRANSIENT),
    ("pgb-max-client", OpErr("no more connections allowed (max_client_conn)"), TRANSIENT),
    ("pgb-max-client-08P01", pg_error("08P01", "no more connections allowed (max_client_conn)"), TRANSIENT),
    # Supavisor (Supabase's pooler, port 6543) refusing at connect: libpq's text, no SQLSTATE.
    (
        "supavisor-max-clients",
        OpErr(
            'connection to server at "aws-0-eu-central-1.pooler.supabase.com" (3.65.1.2), port 6543 failed: '
            "FATAL:  Max client connections reached\n"
        ),
        TRANSIENT,
    ),
    (
        "supavisor-emaxconn",
        OpErr(
            'connection to server at "pooler" (10.0.0.9), port 6543 failed: '
            "FATAL:  (EMAXCONN) max client connections reached, limit: 200\n"
        ),
        TRANSIENT,
    ),
    # Supavisor's own failures: XX000 with a code in parentheses; other XX000 stay permanent.
    ("supavisor-checkout-timeout", pg_error("XX000", "(ECHECKOUTTIMEOUT) checkout timeout"), TRANSIENT),
    ("supavisor-emaxconn-xx000", pg_error("XX000", "(EMAXCONN) max client connections reached, limit: 200"), TRANSIENT),
    ("supavisor-handler-exited", pg_error("XX000", "(EDBHANDLEREXITED) connection to database closed"), DISCONNECT),
    ("xx000-internal", pg_error("XX000", "cache lookup failed for relation 16384"), PERMANENT),
    # Our own wait callback's deadline, raised without SQLAlchemy around it.
    ("brownout-deadline", OpErr("brownout deadline reached waiting on the database after 0.300 s"), TRANSIENT),
    # Server SQLSTATEs.
    ("57P01", pg_error("57P01", "terminating connection due to administrator command"), DISCONNECT),
    ("57P02", pg_error("57P02", "terminating connection because of crash of another server process"), DISCONNECT),
    ("57P03", pg_error("57P03", "the database system is starting up"), DISCONNECT),
    ("57P01-any-text", pg_error("57P01", "x"), DISCONNECT),
    ("40001", pg_error("40001", "could not serialize access due to concurrent update"), TRANSIENT),
    ("40P01", pg_error("40P01", "deadlock detected"), TRANSIENT),
    ("55P03", pg_error("55P03", 'could not obtain lock on row in relation "jobs"'), TRANSIENT),
    ("53300", pg_error("53300", "sorry, too many clients already"), TRANSIENT),
    ("57014", pg_error("57014", "canceling statement due to statement timeout"), TRANSIENT),
    # Server errors quote user data: their text never decides.
    (
        "23505-quoting-refused",
        pg_error(
            "23505",
            'duplicate key value violates unique constraint "k"\nDETAIL:  Key (note)=(connection refused) already exists.',
        ),
        PERMANENT,
    ),
    (
        "22P02-quoting-ssl",
        pg_error("22P02", 'invalid input syntax for type integer: "SSL connection has been closed unexpectedly"'),
        PERMANENT,
    ),
    ("40001-quoting-ssl", pg_error("40001", "could not serialize: SSL connection has been closed unexpectedly"), TRANSIENT),
    ("42P01-quoting-closed", pg_error("42P01", 'relation "server closed the connection unexpectedly" does not exist'), PERMANENT),
    ("client-side-programming", psycopg2.ProgrammingError("can't adapt type 'dict'"), PERMANENT),
    ("client-side-data", psycopg2.DataError("integer out of range"), PERMANENT),
]

_IDS = [row[0] for row in DRIVER_TABLE]


@pytest.mark.parametrize(("exc", "kind"), [row[1:] for row in DRIVER_TABLE], ids=_IDS)
def test_driver_errors(exc: psycopg2.Error, kind: ErrorKind) -> None:
    assert classify(exc) is kind


@pytest.mark.parametrize(("exc", "kind"), [row[1:] for row in DRIVER_TABLE], ids=_IDS)
def test_sqlalchemy_wrapper_classifies_like_its_orig(exc: psycopg2.Error, kind: ErrorKind) -> None:
    # The statement and parameters are quoted in the wrapper's text: they must never decide.
    statement = "SELECT 'connection refused', 'SSL connection has been closed unexpectedly'"
    params = {"note": "server closed the connection unexpectedly"}
    wrapped = sqlalchemy.exc.OperationalError(statement, params, exc)
    assert "connection refused" in str(wrapped)
    assert classify(wrapped) is kind
    # As SQLAlchemy itself builds it (picks IntegrityError, DataError, ... by the orig's class).
    instance = sqlalchemy.exc.DBAPIError.instance(statement, params, exc, psycopg2.Error)
    assert isinstance(instance, sqlalchemy.exc.DBAPIError) and instance.orig is exc
    assert classify(instance) is kind


def test_wrapper_text_alone_never_decides() -> None:
    wrapped = sqlalchemy.exc.OperationalError("SELECT 'connection refused'", None, ValueError("bad value"))
    assert classify(wrapped) is PERMANENT


@pytest.mark.parametrize(
    ("orig", "kind"),
    [
        (OpErr("some message nobody listed"), DISCONNECT),
        (pg_error("23505", "duplicate key"), DISCONNECT),  # SQLAlchemy's verdict still counts
        (OpErr("SSL connection has been closed unexpectedly\n"), SSL),  # the more precise kind is kept
        (pg_error("40001", "could not serialize"), DISCONNECT),
    ],
)
def test_connection_invalidated_is_a_disconnect(orig: psycopg2.Error, kind: ErrorKind) -> None:
    exc = sqlalchemy.exc.DBAPIError("SELECT 1", None, orig, connection_invalidated=True)
    assert classify(exc) is kind
    not_invalidated = sqlalchemy.exc.DBAPIError("SELECT 1", None, orig, connection_invalidated=False)
    assert classify(not_invalidated) is classify(orig)


def test_connection_invalidated_with_a_foreign_orig() -> None:
    exc = sqlalchemy.exc.DBAPIError("SELECT 1", None, RuntimeError("?"), connection_invalidated=True)
    assert classify(exc) is DISCONNECT


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (sqlalchemy.exc.TimeoutError("QueuePool limit of size 10 overflow 20 reached, connection timed out"), TRANSIENT),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), DISCONNECT),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), DISCONNECT),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), DISCONNECT),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), DISCONNECT),
        (OSError(errno.EHOSTUNREACH, "No route to host"), DISCONNECT),
        (OSError(errno.ENOENT, "No such file"), PERMANENT),
        (TimeoutError("timed out"), TRANSIENT),
        (DeadlineExceeded(0.3, 2), TRANSIENT),
        (CircuitOpenError("db", 10.0, "open"), PERMANENT),
        (CommitOutcomeUnknown("lost during COMMIT"), PERMANENT),
        (ValueError("connection refused"), PERMANENT),  # only driver text is read
        (RuntimeError("boom"), PERMANENT),
        (KeyError("x"), PERMANENT),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_non_driver_errors(exc: Exception, kind: ErrorKind) -> None:
    assert classify(exc) is kind


def test_cause_chain_is_followed() -> None:
    try:
        try:
            raise OpErr("SSL connection has been closed unexpectedly\n")
        except psycopg2.Error as inner:
            raise RuntimeError("repository failed") from inner
    except RuntimeError as outer:
        assert classify(outer) is SSL


def test_cyclic_chain_terminates() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert classify(a) is PERMANENT


def test_error_kind_properties() -> None:
    assert [k.value for k in ErrorKind] == ["ssl", "disconnect", "transient", "permanent"]
    assert {k for k in ErrorKind if k.is_transient} == {SSL, DISCONNECT, TRANSIENT}
    assert {k for k in ErrorKind if k.is_disconnect} == {SSL, DISCONNECT}


def test_error_tree() -> None:
    for cls in (CircuitOpenError, DeadlineExceeded, CommitOutcomeUnknown):
        assert issubclass(cls, BrownoutDbError)
    assert issubclass(DeadlineExceeded, TimeoutError)
    err = CircuitOpenError("db", -3.0, "open")
    assert err.retry_after == 0.0  # never negative
    assert "'db'" in str(err) and "open" in str(err)


def test_describe_masks_the_password_and_drops_the_sql() -> None:
    orig = OpErr("could not connect: host=db port=6543 password=hunter2 user=app\nDETAIL: more")
    exc = sqlalchemy.exc.OperationalError(
        "SELECT secret_column FROM accounts WHERE token = %(token)s", {"token": "tok-123"}, orig
    )
    text = describe(exc)
    assert text == "OperationalError: could not connect: host=db port=6543 password=*** user=app"
    for leaked in ("hunter2", "SELECT", "secret_column", "tok-123", "DETAIL"):
        assert leaked not in text


def test_describe_masks_a_url_password() -> None:
    text = describe(OpErr('invalid dsn "postgresql://app:hunter2@db:6543/postgres"'))
    assert "hunter2" not in text
    assert "postgresql://app:***@db:6543/postgres" in text


def test_describe_without_a_message() -> None:
    assert describe(ValueError()) == "ValueError"
    assert describe(ConnectionResetError("reset\nsecond line")) == "ConnectionResetError: reset"
