"""mask_secrets(): passwords never reach logs, errors, health output or metric labels."""

from __future__ import annotations

import time

import dramatiq
import pytest

from brownout._redaction import MASK, mask_personal, mask_secrets, redact


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
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # an unescaped @ in the password
        ("amqp://u:p@ss@h:5672 refused", "amqp://u:***@h:5672 refused"),
        ("postgresql://u:pass word@h/db failed", "postgresql://u:***@h/db failed"),  # an unescaped space
        ("redis://t0ken@cache:6379/0", "redis://***@cache:6379/0"),  # user-only: the user is the secret
        ("rediss://t0ken@cache:6379", "rediss://***@cache:6379"),
        ("https://abc123def@o1.ingest.sentry.io/42", "https://***@o1.ingest.sentry.io/42"),  # a Sentry DSN's key
        ("redis://cache:6379 refused for bob@example.com", "redis://cache:6379 refused for bob@example.com"),
        ("line one postgresql://a:b@h/d\nredis://t@c", "line one postgresql://a:***@h/d\nredis://***@c"),
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
        ("PASSWORD: hunter2", "PASSWORD: ***"),
        ('{"password": "hunter 2", "user": "app"}', '{"password": ***, "user": "app"}'),
        ("smtp_password=hunter2&next=1", "smtp_password=***&next=1"),
    ],
)
def test_keyword_passwords(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked
    assert "hunter" not in mask_secrets(text) and "secret" not in mask_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://app@db:5432/app",  # a login name, not a secret
        "amqp://app@mq:5672/%2F",
        "https://example.com/path?q=1",
        "mailto:bob@example.com",
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


@pytest.mark.parametrize(
    "junk",
    [
        "a://" * 22_000,
        "postgresql://u:" + "p@" * 33_000,
        "x:y@" * 16_000,
        "password=" * 7_000,
        "password='" * 6_500,
        "https://" + "u" * 65_000,
        "redis://a:b " * 5_500,
    ],
)
def test_masking_stays_linear_on_hostile_input(junk: str) -> None:
    """No backtracking blow-up: each shape of 64 KB junk is masked in one pass (timed in bench/masking.py)."""
    text = junk[:65_536]
    doubled = (junk * 2)[:131_072]
    assert len(mask_secrets(text)) <= 3 * len(text)
    assert len(mask_secrets(doubled)) <= 3 * len(doubled)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("SMTP 451 <grace.hopper@navy.example.com> busy", "SMTP 451 <***@navy.example.com> busy"),
        ("to a.b+tag@mail.example.co.uk, cc x@y.io", "to ***@mail.example.co.uk, cc ***@y.io"),
        ("postgresql://app@db.example.com/app", "postgresql://app@db.example.com/app"),  # a login name in a URL
        ("Brownout <noreply@localhost>", "Brownout <noreply@localhost>"),  # no domain a person owns
        (
            'violates check constraint "c"\nDETAIL:  Failing row contains (1, Your results, Dear Grace).',
            'violates check constraint "c"\nDETAIL:  Failing row contains ***',
        ),
        ("DETAIL:  Key (email)=(ada) already exists.\nnext line", "DETAIL:  Key ***\nnext line"),
    ],
)
def test_personal_data(text: str, masked: str) -> None:
    assert mask_personal(text) == masked
    assert mask_personal(masked) == masked


def test_redact_masks_both() -> None:
    assert redact("redis://:pw@cache.internal for ada@example.com") == "redis://:***@cache.internal for ***@example.com"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        # Addresses email-validator takes (internationalised): the whole local part masked, the domain kept.
        ("refused zoë.temp@straße.de", "refused ***@straße.de"),
        ("to élodie@example.com", "to ***@example.com"),
        ("to o'brien@example.com", "to ***@example.com"),
        ("用户@例子.广告 and ü@exämple.de", "***@例子.广告 and ***@exämple.de"),
        ("ada@xn--strae-oqa.xn--p1ai", "***@xn--strae-oqa.xn--p1ai"),
        ("{'to': 'ada@example.com'}", "{'to': '***@example.com'}"),  # a repr's quote is no part of it
        # The same address escaped: an SMTP reply's bytes repr, a JSON string, a URL path (uvicorn's access log).
        (
            "{'zoë.temp@straße.de': (450, b'4.2.0 <zo\\xc3\\xab.temp@stra\\xc3\\x9fe.de> busy')}",
            "{'***@straße.de': (450, b'4.2.0 <***@stra\\xc3\\x9fe.de> busy')}",
        ),
        ('{"to": "zo\\u00eb.temp@stra\\u00dfe.de"}', '{"to": "***@stra\\u00dfe.de"}'),
        (
            '"GET /users/ada%40example.com/notifications HTTP/1.1" 200',
            '"GET /users/***%40example.com/notifications HTTP/1.1" 200',
        ),
        ("GET /users/zo%C3%AB.temp%40stra%C3%9Fe.de/n", "GET /users/***%40stra%C3%9Fe.de/n"),
        ("GET /users/ada@example.com/notifications", "GET /users/***@example.com/notifications"),
        ("/search?email=ada@example.com&limit=5", "/search?email=***@example.com&limit=5"),
        ("amqp://app@mq.example.com:5672/%2F", "amqp://app@mq.example.com:5672/%2F"),  # still a login name
    ],
)
def test_addresses_as_email_validator_takes_them_and_escaped(text: str, masked: str) -> None:
    assert mask_personal(text) == masked
    assert mask_personal(masked) == masked


def test_a_dramatiq_message_formatted_into_text_keeps_no_argument() -> None:
    payload = {"customer_id": 3, "email": "cy@x.io", "name": "Cynthia Oddname"}
    write = dramatiq.Message(
        queue_name="q", actor_name="apply_command", args=({"payload": payload},), kwargs={"k": "Cy"}, options={}
    )
    for text in (f"apply_command_batch([{write!r}, {write!r}])", f"cannot ack <MessageProxy {write!r}>", repr(write)[:70]):
        masked = redact(text)
        assert "Cynthia" not in masked and "customer_id" not in masked and "'k'" not in masked, masked
        assert "args=***" in masked
    assert redact(repr(write)).endswith(
        f"args=***, options={{}}, message_id='{write.message_id}', message_timestamp={write.message_timestamp})"
    )


@pytest.mark.parametrize(
    "junk",
    [
        "a@",
        "a" * 70 + "@",
        "%40",
        "%C3%AB" * 20 + "%40",
        "\\u00eb" * 70 + "@",
        "o'" * 40 + "@",
        "x@" + ("a" * 63 + ".") * 12,
        "Message(args=",
        "ë" * 60 + "@" + "ß" * 60 + ".",
    ],
)
def test_address_masking_stays_linear_on_hostile_input(junk: str) -> None:
    text = (junk * (65_536 // len(junk) + 1))[:65_536]
    doubled = (junk * (131_072 // len(junk) + 1))[:131_072]
    started = time.perf_counter()
    mask_personal(text)
    once = time.perf_counter() - started
    started = time.perf_counter()
    mask_personal(doubled)
    twice = time.perf_counter() - started
    assert once < 0.25 and twice < 0.5, (once, twice)  # about 5 ms at 64 KiB; a backtracking blow-up takes seconds
