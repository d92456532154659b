"""mask_secrets(): passwords never reach logs, errors, health output or metric labels."""

from __future__ import annotations

import pytest

from brownout._redaction import MASK, mask_secrets


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://app:hunter2@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgres://app:hunter2@db/app", "postgres://app:***@db/app"),
        (
            "postgresql+psycopg2://app:hunter2@db:6543/postgres?sslmode=require",
            "postgresql+psycopg2://app:***@db:6543/postgres?sslmode=require",
        ),
        ("postgresql://app:pa%40ss:w0rd@db/app", "postgresql://app:***@db/app"),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://guest:hunter2@mq:5672/%2F", "amqp://guest:***@mq:5672/%2F"),
        (
            "engine for postgresql://a:one@h1/d failed, then postgresql://b:two@h2/d",
            "engine for postgresql://a:***@h1/d failed, then postgresql://b:***@h2/d",
        ),
        ('connection to "postgresql://app:hunter2@db/app" failed', 'connection to "postgresql://app:***@db/app" failed'),
    ],
)
def test_url_passwords(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("host=db password=hunter2 dbname=app", "host=db password=*** dbname=app"),
        ("host=db password='hunter 2' dbname=app", "host=db password=*** dbname=app"),
        (r"password='it\'s secret' sslmode=require", "password=*** sslmode=require"),
        ("PASSWORD = hunter2", "PASSWORD = ***"),
        ("host=db password=hunter2", "host=db password=***"),
        ("postgresql://db/app?password=hunter2", "postgresql://db/app?password=***"),
    ],
)
def test_keyword_passwords(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked
    assert "hunter" not in mask_secrets(text) and "secret" not in mask_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://app@db:5432/app",
        "postgresql://db:5432/app",
        "postgresql:///app?host=/var/run/postgresql",
        "host=db user=app dbname=app",
        "server closed the connection unexpectedly",
        "passwords=1 expired",  # not the keyword
        "",
    ],
)
def test_password_less_text_is_left_alone(text: str) -> None:
    assert mask_secrets(text) == text


def test_non_strings_pass_through() -> None:
    assert mask_secrets(None) is None  # type: ignore[arg-type]
    assert mask_secrets(42) == 42  # type: ignore[arg-type, comparison-overlap]


def test_masking_is_idempotent() -> None:
    once = mask_secrets("postgresql://app:hunter2@db/app password=hunter2")
    assert mask_secrets(once) == once
    assert once.count(MASK) == 2
