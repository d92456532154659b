"""A DATABASE_URL to a host off this machine that does not say sslmode gets sslmode=require.

libpq's own default is `prefer`: TLS if the server offers it, plain text otherwise, so
anyone on the path who answers "no SSL" reads the password and every row. A URL naming
sslmode (even `disable`) is kept as written, as is libpq's PGSSLMODE; localhost, loopback
addresses and Unix sockets are left alone. The rule lives in `normalise_database_url`,
which every URL goes through (the settings' DATABASE_URL and MIGRATION_DATABASE_URL,
the migrations' env.py), so every engine built from them carries it.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from sqlalchemy.engine import make_url

from brownout._db.database import Database
from brownout._db.engine import build_engine
from brownout._settings import load_settings, normalise_database_url, settings_from_values


@pytest.fixture(autouse=True)
def _no_libpq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGSSLMODE", "PGHOST", "PGHOSTADDR", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)


def sslmodes(url: str) -> list[str]:
    return parse_qs(url.partition("?")[2], keep_blank_values=True).get("sslmode", [])


REMOTE = [
    "postgresql://app:s3cret@db.example.com:5432/app",
    "postgres://postgres.ref:s3cret@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
    "postgresql://app:s3cret@10.0.0.5/app?application_name=web&connect_timeout=3",
    "postgresql://app:s3cret@[2001:db8::1]:5432/app",
    "postgresql://app:s3cret@localhost:5432,db.example.com:5432/app",
    "postgresql://app:s3cret@/app?host=db.example.com",
    "postgresql://app:s3cret@db.example.com/app?",
]


@pytest.mark.parametrize("url", REMOTE)
def test_a_remote_host_without_sslmode_gets_require(url: str) -> None:
    normalised = normalise_database_url(url)
    assert sslmodes(normalised) == ["require"]
    assert normalised.startswith("postgresql+psycopg2://") and ":s3cret@" in normalised
    assert normalise_database_url(normalised) == normalised  # applied twice, still one sslmode


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"])
def test_a_remote_url_that_names_sslmode_is_kept(mode: str) -> None:
    url = f"postgresql://app:s3cret@db.example.com:5432/app?sslmode={mode}"
    assert normalise_database_url(url) == f"postgresql+psycopg2://app:s3cret@db.example.com:5432/app?sslmode={mode}"


def test_a_raw_question_mark_in_the_password_is_not_the_query() -> None:
    """SQLAlchemy reads `pa?ss` as the password; the query begins after the host."""
    normalised = normalise_database_url("postgresql://app:pa?ss@db.example.com:5432/app")
    assert normalised == "postgresql+psycopg2://app:pa?ss@db.example.com:5432/app?sslmode=require"
    url = make_url(normalised)
    assert (url.password, url.database, dict(url.query)) == ("pa?ss", "app", {"sslmode": "require"})
    local = "postgresql+psycopg2://app:pa?ss@127.0.0.1:5432/app"
    assert normalise_database_url(local) == local


def test_pgsslmode_in_the_environment_is_an_explicit_choice_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLMODE", "disable")
    assert sslmodes(normalise_database_url("postgresql://app:s3cret@db.example.com/app")) == []


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://brownout:brownout@localhost:5432/brownout",
        "postgresql://brownout:brownout@LOCALHOST/brownout",
        "postgresql://brownout:brownout@127.0.0.1:5432/brownout",
        "postgresql://brownout:brownout@127.0.0.2:5432/brownout",
        "postgresql://brownout:brownout@[::1]:5432/brownout",
        "postgresql://brownout@/brownout",  # libpq's default Unix socket
        "postgresql:///brownout",
        "postgresql://brownout@/brownout?host=/var/run/postgresql",
        "postgresql://brownout@%2Fvar%2Frun%2Fpostgresql/brownout",
        "postgresql://brownout:brownout@localhost:5432,127.0.0.1:5433/brownout",
    ],
)
def test_a_local_host_or_a_unix_socket_is_unchanged(url: str) -> None:
    assert normalise_database_url(url) == "postgresql+psycopg2://" + url.partition("://")[2]


def test_a_url_without_host_follows_pghost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "db.example.com")
    assert sslmodes(normalise_database_url("postgresql://app@/app")) == ["require"]
    monkeypatch.setenv("PGHOST", "/var/run/postgresql")
    assert sslmodes(normalise_database_url("postgresql://app@/app")) == []


def test_settings_apply_it_to_both_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret@pooler.example.com:6543/postgres")
    monkeypatch.setenv("MIGRATION_DATABASE_URL", "postgresql://app:s3cret@pooler.example.com:5432/postgres")
    settings = load_settings()
    assert sslmodes(settings.database_url) == ["require"]
    assert settings.migration_database_url is not None
    assert sslmodes(settings.migration_database_url) == ["require"]
    assert "s3cret" not in repr(settings)


def test_an_engine_for_a_remote_host_connects_with_sslmode_require() -> None:
    """What psycopg2.connect would be given; nothing connects."""
    engine = build_engine(settings_from_values(database_url="postgresql://app:s3cret@db.example.com:5432/app"))
    try:
        assert engine.url.query.get("sslmode") == "require"
        _, kwargs = engine.dialect.create_connect_args(engine.url)
        assert kwargs["sslmode"] == "require"
        assert kwargs["host"] == "db.example.com"
    finally:
        engine.dispose()


def test_an_engine_for_a_remote_host_keeps_an_explicit_disable() -> None:
    database = Database.from_url("postgresql://app:s3cret@db.example.com:5432/app?sslmode=disable")
    try:
        _, kwargs = database.engine.dialect.create_connect_args(database.engine.url)
        assert kwargs["sslmode"] == "disable"
    finally:
        database.close()


def test_an_engine_for_localhost_is_unchanged() -> None:
    engine = build_engine(settings_from_values(database_url="postgresql://brownout:brownout@127.0.0.1:5432/brownout"))
    try:
        _, kwargs = engine.dialect.create_connect_args(engine.url)
        assert "sslmode" not in kwargs
    finally:
        engine.dispose()
