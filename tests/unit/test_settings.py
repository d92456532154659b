"""load_settings(): the defaults, environment overrides, and refusals that name the variable."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from brownout._settings import ConfigurationError, Settings, load_settings

URL = "postgresql://app:hunter2@db.example.com:6543/postgres?sslmode=require"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment with DATABASE_URL only: nothing from the real one leaks in (names are case-insensitive)."""
    for name in list(os.environ):
        if name.upper().startswith("BROWNOUT_") or name.upper() == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", URL)
    return monkeypatch


def refusal(**overrides: object) -> str:
    with pytest.raises(ConfigurationError) as info:
        load_settings(**overrides)
    return str(info.value)


def test_defaults(env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.breaker_failure_threshold, s.breaker_open_seconds, s.breaker_success_threshold) == (5, 60.0, 2)
    assert (s.retry_max_retries, s.retry_base_seconds, s.retry_cap_seconds) == (4, 0.5, 3.0)
    assert (s.pool_size, s.pool_max_overflow, s.pool_recycle_seconds, s.pool_pre_ping) == (10, 20, 90.0, True)
    assert s.health_interval_seconds == 30.0
    assert s.request_db_deadline_seconds == 0.3
    assert 0 <= s.breaker_open_jitter <= 1
    assert s.database_pooler == "none"


def test_settings_are_frozen(env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.pool_size = 3
    assert s.pool_size == 10


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("BROWNOUT_BREAKER_FAILURE_THRESHOLD", "3", "breaker_failure_threshold", 3),
        ("BROWNOUT_BREAKER_OPEN_SECONDS", "12.5", "breaker_open_seconds", 12.5),
        ("BROWNOUT_BREAKER_OPEN_JITTER", "0", "breaker_open_jitter", 0.0),
        ("BROWNOUT_BREAKER_SUCCESS_THRESHOLD", "1", "breaker_success_threshold", 1),
        ("BROWNOUT_RETRY_MAX_RETRIES", "0", "retry_max_retries", 0),
        ("BROWNOUT_RETRY_BASE_SECONDS", "0.1", "retry_base_seconds", 0.1),
        ("BROWNOUT_RETRY_CAP_SECONDS", "10", "retry_cap_seconds", 10.0),
        ("BROWNOUT_POOL_SIZE", "3", "pool_size", 3),
        ("BROWNOUT_POOL_MAX_OVERFLOW", "0", "pool_max_overflow", 0),
        ("BROWNOUT_POOL_RECYCLE_SECONDS", "300", "pool_recycle_seconds", 300.0),
        ("BROWNOUT_POOL_PRE_PING", "false", "pool_pre_ping", False),
        ("BROWNOUT_HEALTH_INTERVAL_SECONDS", "5", "health_interval_seconds", 5.0),
        ("BROWNOUT_REQUEST_DB_DEADLINE_SECONDS", "1.5", "request_db_deadline_seconds", 1.5),
        ("BROWNOUT_DATABASE_POOLER", "transaction", "database_pooler", "transaction"),
        ("brownout_pool_size", "7", "pool_size", 7),  # names are case-insensitive
    ],
)
def test_environment_overrides(env: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object) -> None:
    env.setenv(variable, value)
    assert getattr(load_settings(), field) == expected


def test_keyword_overrides_win_over_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("BROWNOUT_POOL_SIZE", "3")
    assert load_settings(pool_size=4).pool_size == 4


@pytest.mark.parametrize(
    "url",
    [
        "postgres://app:pw@db:5432/app",
        "postgresql://app:pw@db:5432/app",
        "postgresql+psycopg2://app:pw@db:5432/app",
        "  postgresql://app:pw@db:5432/app\n",
    ],
)
def test_database_url_is_normalised_to_psycopg2(env: pytest.MonkeyPatch, url: str) -> None:
    env.setenv("DATABASE_URL", url)
    # "db" is not this machine, and the URL names no sslmode: require (tests/unit/test_database_sslmode.py).
    assert load_settings().database_url == "postgresql+psycopg2://app:pw@db:5432/app?sslmode=require"


def test_database_url_query_is_kept(env: pytest.MonkeyPatch) -> None:
    assert load_settings().database_url == URL.replace("postgresql://", "postgresql+psycopg2://")


def test_missing_database_url_is_named(env: pytest.MonkeyPatch) -> None:
    env.delenv("DATABASE_URL")
    assert "DATABASE_URL" in refusal()


@pytest.mark.parametrize("url", ["mysql://app:hunter2@db/app", "db.example.com:5432", "postgresql+asyncpg://app:hunter2@db/app"])
def test_unusable_database_url_is_named_and_not_echoed(env: pytest.MonkeyPatch, url: str) -> None:
    env.setenv("DATABASE_URL", url)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "DATABASE_URL" in message
    assert "hunter2" not in message
    # pydantic's ValidationError (which quotes the input) is not chained for a traceback to print.
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BROWNOUT_POOL_SIZE", "0"),
        ("BROWNOUT_POOL_SIZE", "ten"),
        ("BROWNOUT_POOL_MAX_OVERFLOW", "-1"),
        ("BROWNOUT_BREAKER_FAILURE_THRESHOLD", "0"),
        ("BROWNOUT_BREAKER_OPEN_SECONDS", "0"),
        ("BROWNOUT_BREAKER_OPEN_JITTER", "1.5"),
        ("BROWNOUT_BREAKER_SUCCESS_THRESHOLD", "0"),
        ("BROWNOUT_RETRY_MAX_RETRIES", "-1"),
        ("BROWNOUT_RETRY_MAX_RETRIES", "21"),
        ("BROWNOUT_RETRY_BASE_SECONDS", "-0.5"),
        ("BROWNOUT_POOL_PRE_PING", "perhaps"),
        ("BROWNOUT_REQUEST_DB_DEADLINE_SECONDS", "0"),
        ("BROWNOUT_HEALTH_INTERVAL_SECONDS", "soon"),
        ("BROWNOUT_DATABASE_POOLER", "session"),
    ],
)
def test_bad_values_name_the_variable(env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    env.setenv(variable, value)
    message = refusal()
    assert variable in message
    assert message.count("\n") == 1  # one line per problem, and only this one


def test_every_problem_is_listed(env: pytest.MonkeyPatch) -> None:
    env.setenv("BROWNOUT_POOL_SIZE", "0")
    env.setenv("BROWNOUT_RETRY_MAX_RETRIES", "many")
    message = refusal()
    assert "BROWNOUT_POOL_SIZE" in message and "BROWNOUT_RETRY_MAX_RETRIES" in message


def test_cap_below_base_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("BROWNOUT_RETRY_BASE_SECONDS", "2")
    env.setenv("BROWNOUT_RETRY_CAP_SECONDS", "1")
    message = refusal()
    assert "BROWNOUT_RETRY_CAP_SECONDS" in message and "BROWNOUT_RETRY_BASE_SECONDS" in message


def test_cap_equal_to_base_is_fine(env: pytest.MonkeyPatch) -> None:
    env.setenv("BROWNOUT_RETRY_BASE_SECONDS", "2")
    env.setenv("BROWNOUT_RETRY_CAP_SECONDS", "2")
    assert load_settings().retry_cap_seconds == 2.0


def test_repr_and_str_hide_the_password(env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert "hunter2" in s.database_url  # the real value is still there for the engine
    for text in (repr(s), str(s), f"{s!r}"):
        assert "hunter2" not in text
        assert "app:***@db.example.com" in text


def test_settings_class_reads_the_same_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("BROWNOUT_POOL_SIZE", "3")
    assert Settings().pool_size == 3  # type: ignore[call-arg]


def test_readme_documents_every_setting() -> None:
    """The README's configuration table names every variable the settings read."""
    from pathlib import Path

    from brownout._settings import _env_name

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    missing = []
    for name in Settings.model_fields:
        variable = _env_name(name)
        stem = variable.rsplit("_", 2)[0]  # "BROWNOUT_WORKER_MIN_CONCURRENCY" may be listed as ".._MIN_/_MAX_.."
        if f"`{variable}`" not in table and not (variable.startswith("BROWNOUT_WORKER_") and stem in table):
            missing.append(variable)
    assert missing == []


def test_an_empty_variable_is_unset_not_an_empty_value(env: pytest.MonkeyPatch) -> None:
    """Container platforms' variable pages leave `NAME=`: it was refused ("at least 32 characters")."""
    env.setenv("BROWNOUT_ADMIN_TOKEN", "")
    env.setenv("SENTRY_DSN", " ")
    env.setenv("BROWNOUT_RATE_LIMIT_WRITES", "")  # a limit whose default is set: empty still means no limit
    settings = load_settings()
    assert settings.admin_token is None and settings.sentry_dsn is None
    assert settings.rate_limit_writes is None


def test_a_misspelt_setting_is_named_with_the_one_meant(env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    env.setenv("BROWNOUT_QUEUE_NAM", "orders")  # left alone it silently shares the default queue
    env.setenv("BROWNOUT_SKIP_SERVICES", "1")  # a deploy script's own variable: no setting near it
    with caplog.at_level("WARNING", logger="brownout._settings"):
        settings = load_settings()
    assert settings.queue_name == "brownout-commands"
    assert [record.getMessage() for record in caplog.records] == [
        "BROWNOUT_QUEUE_NAM is not a setting and changes nothing: did you mean BROWNOUT_QUEUE_NAME?"
    ]


@pytest.mark.parametrize(
    ("url", "pooler"),
    [
        ("postgresql://postgres.ref:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres", "transaction"),
        ("postgresql://postgres.ref:pw@AWS-0-EU-WEST-1.POOLER.SUPABASE.COM.:6543/postgres", "transaction"),
        ("postgresql://postgres.ref:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres", "none"),  # session mode
        ("postgresql://postgres:pw@db.ref.supabase.co:5432/postgres", "none"),  # the direct connection
        ("postgresql://app:pw@pgbouncer.internal:6543/app", "none"),  # another pooler: its URL says nothing
    ],
)
def test_supabases_transaction_pooler_is_known_by_its_url(env: pytest.MonkeyPatch, url: str, pooler: str) -> None:
    """Left at 'none' there, every connection sent start-up options the pooler refuses."""
    env.setenv("DATABASE_URL", url)
    assert load_settings().database_pooler == pooler


def test_a_pooler_named_wins_over_the_one_the_url_suggests(env: pytest.MonkeyPatch) -> None:
    env.setenv("DATABASE_URL", "postgresql://postgres.ref:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres")
    env.setenv("BROWNOUT_DATABASE_POOLER", "none")
    assert load_settings().database_pooler == "none"


def test_an_unusable_database_url_is_one_problem_not_two(env: pytest.MonkeyPatch) -> None:
    """The pooler read from the URL added a line of its own ("the default factory uses validated data")."""
    env.setenv("DATABASE_URL", "notaurl")
    assert refusal().count("\n") == 1
