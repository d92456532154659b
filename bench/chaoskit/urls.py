"""Service URLs: loopback only, re-pointed at a proxy's port, and the harness's own PostgreSQL link."""

from __future__ import annotations

from typing import Any

import pika
import psycopg2
from sqlalchemy.engine import make_url

from bench.chaoskit.config import HARNESS_APP_NAME, LOOPBACK


def loopback_only(url: str, what: str) -> None:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"chaos: {what} must point at 127.0.0.1 (got host {host!r}); this harness sends no traffic elsewhere")


def port_of(url: str, default: int) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or default


def with_port(url: str, port: int) -> str:
    """The URL with 127.0.0.1:*port* as its address (credentials, path and query kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def pg_url(url: str, *, dbname: str | None = None, port: int | None = None, app_name: str | None = None) -> str:
    """A plain libpq URL (driver psycopg2), optionally to another database, port or application_name."""
    parsed = make_url(url).set(drivername="postgresql")
    if dbname is not None:
        parsed = parsed.set(database=dbname)
    if port is not None:
        parsed = parsed.set(host="127.0.0.1", port=port)
    if app_name is not None:
        parsed = parsed.update_query_dict({"application_name": app_name})
    return parsed.render_as_string(hide_password=False)


def admin_connect(url: str, dbname: str) -> Any:
    conn = psycopg2.connect(pg_url(url, dbname=dbname, app_name=HARNESS_APP_NAME), connect_timeout=5)
    conn.autocommit = True
    return conn


def rabbit_parameters(url: str, timeout: float = 5.0) -> list[pika.URLParameters]:
    """One set per node of a ';'-separated list (a run's own cluster), each bounded by *timeout*: the harness's
    BlockingConnection tries them in order, so a node killed by the timeline is passed over."""
    parameters = []
    for node in url.split(";"):
        node_parameters = pika.URLParameters(node.strip())
        node_parameters.socket_timeout = node_parameters.stack_timeout = node_parameters.blocked_connection_timeout = timeout
        parameters.append(node_parameters)
    return parameters
