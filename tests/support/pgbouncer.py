"""A real PgBouncer in transaction mode for tests, like Supabase's pooler.

Production talks to PostgreSQL through a pooler on port 6543 in transaction
mode; its failures (a startup ``options`` refused, a server connection killed
under a client, ``query_wait_timeout``) are only credible from the real thing,
so ``PgBouncer`` starts ``/usr/sbin/pgbouncer`` (Debian package ``pgbouncer``)
in the foreground, in a temporary directory, and stops it again.

Choices, and why:

- Authentication: ``auth_type = scram-sha-256`` (configurable) against an
  ``auth_file`` of *plain-text* passwords (``users=``). Clients must send the
  password, as on Supabase; PgBouncer then logs into PostgreSQL with that
  plain-text password, which works whether the server trusts 127.0.0.1 (the
  password is never asked) or asks for scram/md5. ``auth_type = any`` would
  force one server user for every database; a SCRAM secret in the file would
  only work for clients that authenticated with SCRAM themselves.
- Databases: a wildcard ``* = host=... port=...`` so every database name a test
  creates passes through without a restart.
- Client TLS: ``client_tls_sslmode = allow`` with the Debian snakeoil pair
  (copied into the temp directory, owned by the user PgBouncer runs as), so
  clients with ``sslmode=require`` negotiate TLS with the pooler, as on
  Supabase. PostgreSQL cannot see the client's TLS through the pooler: use
  psycopg2's ``conn.info.ssl_in_use``.
- Server TLS: ``server_tls_sslmode = prefer`` (configurable): TLS to
  PostgreSQL when it offers it, plain TCP otherwise, so the helper works before
  and after the server's ``ssl = on``.
- ``ignore_startup_parameters = extra_float_digits`` only: a startup
  ``options`` (``-c statement_timeout=...``) is refused, as by Supabase's
  pooler, with ``unsupported startup parameter: options``.
- PgBouncer refuses to run as root, so as root it runs as the ``postgres`` OS
  user (``Popen(user=...)``, so our pid is PgBouncer's own).

Observed with PgBouncer 1.18.0 (Debian 12) and psycopg2 2.9.13:

- ``application_name`` is one of the parameters PgBouncer tracks: the client's
  value goes to the server at login and, in transaction mode, is re-``SET`` on
  a server connection whenever a client with another value is given it. So
  ``pg_stat_activity.application_name`` names the client *currently or last*
  served by that backend; it cannot pick out "the pooler's backends". Use
  ``server_backend_pids()``: ``SHOW SERVERS`` on the admin console, whose
  ``remote_pid`` is the PostgreSQL backend pid.
- ``pg_terminate_backend`` on a backend in a client's transaction or query:
  PostgreSQL's ``FATAL: terminating connection due to administrator command``
  is *not* passed on; PgBouncer logs ``server conn crashed?`` and closes the
  client link, so the client sees ``SSL connection has been closed
  unexpectedly`` (TLS) or ``server closed the connection unexpectedly``
  (plain). An idle pooled backend that dies is dropped from the pool and the
  next transaction gets a new one, unnoticed by clients.
- ``query_wait_timeout`` and ``server login has been failing, try again later
  (server_login_retry)`` are sent as ``FATAL`` errors just before the close;
  psql shows them, but psycopg2 reports only the close (same two messages).
- Stopping PgBouncer: ``SSL SYSCALL error: EOF detected`` (TLS) or ``server
  closed the connection unexpectedly`` (plain) on open connections.

Raises ``PgBouncerUnavailable`` when the binary or the certificate is missing
(a local run may skip on it; CI installs both and must fail instead) and
``PgBouncerError`` when PgBouncer does not come up in time (with its log tail).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2
import pytest

PGBOUNCER_BINARY = "/usr/sbin/pgbouncer"
SNAKEOIL_CERT = "/etc/ssl/certs/ssl-cert-snakeoil.pem"
SNAKEOIL_KEY = "/etc/ssl/private/ssl-cert-snakeoil.key"
PREFERRED_PORT = 6543
_PORT_ATTEMPTS = 5
_RUN_AS_WHEN_ROOT = "postgres"


class PgBouncerUnavailable(RuntimeError):
    """Raised when PgBouncer cannot be run here at all (binary or certificate missing)."""


class PgBouncerError(RuntimeError):
    """Raised when PgBouncer was started but did not serve ``SELECT 1`` in time."""


class _PortTaken(PgBouncerError):
    """Raised inside ``start()`` when PgBouncer could not bind its TCP port."""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as PgBouncer sets it: a TIME_WAIT left by an earlier
        # run does not make the port busy, a live listener still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(*, prefer: int) -> int:
    """``prefer`` when free (0: no preference); else any free port."""
    if prefer and _port_is_free(prefer):
        return prefer
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_as() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_RUN_AS_WHEN_ROOT)
    except KeyError:
        raise PgBouncerUnavailable(f"PgBouncer will not run as root and there is no {_RUN_AS_WHEN_ROOT!r} user") from None


class PgBouncer:
    """One PgBouncer process in front of ``server_host:server_port``."""

    def __init__(
        self,
        *,
        server_host: str = "127.0.0.1",
        server_port: int = 5432,
        users: Mapping[str, str] | None = None,
        listen_port: int = 0,
        pool_mode: str = "transaction",
        default_pool_size: int = 5,
        auth_type: str = "scram-sha-256",
        server_tls_sslmode: str = "prefer",
        query_wait_timeout: float = 5.0,
        server_connect_timeout: float = 3.0,
        server_login_retry: float = 1.0,
        probe_dbname: str = "postgres",
        start_timeout: float = 15.0,
        tls_cert_file: str = SNAKEOIL_CERT,
        tls_key_file: str = SNAKEOIL_KEY,
    ) -> None:
        self.users = dict(users if users is not None else {"brownout": "brownout"})
        if not self.users:
            raise ValueError("PgBouncer needs at least one user (it probes and administers as the first)")
        self.server_host = server_host
        self.server_port = server_port
        self._requested_port = listen_port
        self._settings = {
            "pool_mode": pool_mode,
            "default_pool_size": str(default_pool_size),
            "auth_type": auth_type,
            "server_tls_sslmode": server_tls_sslmode,
            "query_wait_timeout": f"{query_wait_timeout:g}",
            "server_connect_timeout": f"{server_connect_timeout:g}",
            "server_login_retry": f"{server_login_retry:g}",
        }
        self._probe_dbname = probe_dbname
        self._start_timeout = start_timeout
        self._tls_files = (tls_cert_file, tls_key_file)
        self._port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        """Write the config, start PgBouncer, and return once ``SELECT 1`` passes."""
        if self._process is not None:
            raise RuntimeError("PgBouncer already started")
        if not os.access(PGBOUNCER_BINARY, os.X_OK):
            raise PgBouncerUnavailable(f"{PGBOUNCER_BINARY} missing: apt-get install -y pgbouncer")
        for path in self._tls_files:
            if not os.path.exists(path):
                raise PgBouncerUnavailable(
                    f"{path} missing: apt-get install -y ssl-cert && make-ssl-cert generate-default-snakeoil"
                )
        for attempt in range(_PORT_ATTEMPTS):
            # 6543 first, as in production; when another process takes the
            # picked port before PgBouncer binds it, try another free one.
            self._port = self._requested_port or _pick_port(prefer=PREFERRED_PORT if attempt == 0 else 0)
            self._launch()
            try:
                self._wait_ready()
                return self
            except _PortTaken:
                self.stop()
                if self._requested_port:
                    raise PgBouncerError(f"port {self._port} is taken") from None
            except BaseException:
                self.stop()
                raise
        raise PgBouncerError(f"no free port after {_PORT_ATTEMPTS} attempts")

    def _launch(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="brownout-pgbouncer-"))
        account = _run_as() if os.geteuid() == 0 else None
        self._write_files()
        if account is not None:
            for path in [self._dir, *self._dir.iterdir()]:
                os.chown(path, account.pw_uid, account.pw_gid)
        with open(self._dir / "pgbouncer.log", "ab") as log:
            self._process = subprocess.Popen(
                [PGBOUNCER_BINARY, str(self._dir / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
            )

    def stop(self) -> None:
        """Terminate PgBouncer (SIGTERM, then SIGKILL) and remove its directory; idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port clients connect to (0 before ``start()``)."""
        return self._port

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def directory(self) -> Path | None:
        """The temp directory with ini, userlist, log and socket (None when stopped)."""
        return self._dir

    def dsn(self, dbname: str, user: str, password: str | None = None, sslmode: str = "require") -> str:
        """A libpq URL to ``dbname`` through the pooler (psycopg2 and SQLAlchemy take it)."""
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
        return f"postgresql://{auth}@127.0.0.1:{self._port}/{quote(dbname, safe='')}?sslmode={sslmode}"

    def log_text(self) -> str:
        """PgBouncer's log so far ("" once stopped: the directory is gone)."""
        if self._dir is None:
            return ""
        try:
            return (self._dir / "pgbouncer.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def admin_query(self, command: str) -> list[dict[str, object]]:
        """Run a console command (``SHOW SERVERS``...) on the ``pgbouncer`` admin database."""
        user, password = next(iter(self.users.items()))
        conn = psycopg2.connect(self.dsn("pgbouncer", user, password, sslmode="disable"), connect_timeout=5)
        try:
            conn.autocommit = True  # the console knows no BEGIN
            with conn.cursor() as cur:
                cur.execute(command)
                names = [column.name for column in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def server_backend_pids(self, dbname: str | None = None) -> list[int]:
        """PostgreSQL backend pids of the pooler's server connections (optionally of one database)."""
        pids = (
            int(row["remote_pid"])  # type: ignore[call-overload]
            for row in self.admin_query("SHOW SERVERS")
            if dbname is None or row["database"] == dbname
        )
        return [pid for pid in pids if pid > 0]  # 0 while a server connection still logs in

    def terminate_server_backends(
        self, *, dbname: str | None = None, superuser: str = "postgres", password: str | None = None
    ) -> list[int]:
        """``pg_terminate_backend`` every server connection behind the pooler, directly on
        PostgreSQL (as ``superuser``); returns the pids that were terminated."""
        pids = self.server_backend_pids(dbname)
        if not pids:
            return []
        conn = psycopg2.connect(
            host=self.server_host,
            port=self.server_port,
            dbname="postgres",
            user=superuser,
            password=password,
            connect_timeout=5,
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pid FROM unnest(%s::int[]) pid WHERE pg_terminate_backend(pid)", (pids,))
                return [row[0] for row in cur.fetchall()]
        finally:
            conn.close()

    def _write_files(self) -> None:
        assert self._dir is not None
        cert, key = self._dir / "server.crt", self._dir / "server.key"
        shutil.copyfile(self._tls_files[0], cert)
        shutil.copyfile(self._tls_files[1], key)
        key.chmod(0o600)
        quoted = {u.replace('"', '""'): p.replace('"', '""') for u, p in self.users.items()}
        userlist = "".join(f'"{u}" "{p}"\n' for u, p in quoted.items())
        (self._dir / "userlist.txt").write_text(userlist)
        (self._dir / "userlist.txt").chmod(0o600)
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self._port),
            "unix_socket_dir": str(self._dir),
            "auth_file": str(self._dir / "userlist.txt"),
            "admin_users": ", ".join(self.users),
            "max_client_conn": "200",
            "ignore_startup_parameters": "extra_float_digits",
            "client_tls_sslmode": "allow",
            "client_tls_cert_file": str(cert),
            "client_tls_key_file": str(key),
            **self._settings,
        }
        lines = ["[databases]", f"* = host={self.server_host} port={self.server_port}", "", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        (self._dir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")

    def _wait_ready(self) -> None:
        """Poll until ``SELECT 1`` through the pooler works; PgBouncerError with the log otherwise."""
        assert self._process is not None
        user, password = next(iter(self.users.items()))
        deadline = time.monotonic() + self._start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            # PgBouncer keeps running on its unix socket when the TCP bind
            # fails, and a probe would then reach whoever holds the port.
            log = self.log_text()
            if f"cannot listen on 127.0.0.1:{self._port}" in log:
                raise _PortTaken(self._port)
            if f"listening on 127.0.0.1:{self._port}" not in log:
                time.sleep(0.05)
                continue
            try:
                conn = psycopg2.connect(self.dsn(self._probe_dbname, user, password), connect_timeout=2)
            except psycopg2.OperationalError as error:
                last_error = error
                time.sleep(0.1)
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
                return
            finally:
                conn.close()
        tail = "\n".join(self.log_text().splitlines()[-20:])
        raise PgBouncerError(
            f"PgBouncer on 127.0.0.1:{self._port} not ready (exit code {self._process.poll()},"
            f" last error: {last_error}); log tail:\n{tail}"
        )


def start_pgbouncer_or_skip(**options: Any) -> PgBouncer:
    """Start a pooler; skip when PgBouncer is missing, except under CI (which must not pass by skipping)."""
    try:
        return PgBouncer(**options).start()
    except PgBouncerUnavailable as missing:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(missing))
