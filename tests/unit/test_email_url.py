"""EMAIL_URL: the backend it names, what it refuses, and its key masked wherever the URL is quoted."""

from __future__ import annotations

import logging
import os
from email.utils import formatdate

import pytest

from brownout._redaction import mask_secrets
from brownout._settings import ConfigurationError, load_settings
from brownout._worker.email_delivery import CredentialsAlarm, Delivery, Outcome
from brownout._worker.email_providers import ProviderTarget, retry_after_seconds
from brownout._worker.email_smtp import SmtpTarget
from brownout._worker.email_url import parse_email_url

KEY = "re_Fq3xPz81_kLmNoPqRsTuVw"
TOKEN = "5f0e5b2c-7d1a-4a8e-9b3c-2d4e6f8a0b1c"


def test_resend_and_postmark_urls_name_their_provider_key_and_default_https_endpoint() -> None:
    resend = parse_email_url(f"resend://{KEY}")
    assert resend == ProviderTarget("resend", KEY, "https://api.resend.com")
    postmark = parse_email_url(f"postmark://{TOKEN}?message_stream=notifications")
    assert postmark == ProviderTarget("postmark", TOKEN, "https://api.postmarkapp.com", "notifications")
    assert KEY not in repr(resend) and TOKEN not in repr(postmark)


def test_smtp_urls_still_name_an_smtp_server() -> None:
    target = parse_email_url("smtp+starttls://app:hunter2@smtp.example.com")
    assert isinstance(target, SmtpTarget) and (target.host, target.port, target.security) == ("smtp.example.com", 587, "starttls")


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:8025", "http://localhost:8025/", "http://[::1]:8025", "https://mail-proxy.example.com"]
)
def test_the_endpoint_may_be_this_host_over_http_or_anywhere_over_https(base_url: str) -> None:
    target = parse_email_url(f"resend://{KEY}?base_url={base_url}")
    assert isinstance(target, ProviderTarget) and target.base_url == base_url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"resend://{KEY}?base_url=http://mail-proxy.example.com", "in clear"),
        (f"postmark://{TOKEN}?base_url=ftp://127.0.0.1", "https://"),
        ("resend://", "key"),
        (f"resend://{KEY}@127.0.0.1:8025", "alone"),
        (f"resend://{KEY}?message_stream=outbound", "unknown parameter"),
        (f"postmark://{TOKEN}?token={TOKEN}", "unknown parameter"),
        (f"sendgrid://{KEY}", "must be one of resend, postmark"),
        (f"postmark://{TOKEN}/email", "nothing but the query"),
    ],
)
def test_unusable_urls_are_refused_without_showing_the_key(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        parse_email_url(url)
    assert KEY not in str(refused.value) and TOKEN not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"EMAIL_URL=resend://{KEY}", "EMAIL_URL=resend://***"),
        (f"postmark://{TOKEN}?base_url=http://127.0.0.1:8025 refused", "postmark://***?base_url=http://127.0.0.1:8025 refused"),
        (f"'RESEND://{KEY}'", "'RESEND://***'"),
        (f"resend://{KEY}@127.0.0.1:8025", "resend://***@127.0.0.1:8025"),
        ("https://api.resend.com/emails", "https://api.resend.com/emails"),  # a provider's own URL holds no key
    ],
)
def test_a_provider_url_s_key_is_masked_wherever_it_is_quoted(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("BROWNOUT_") or name.upper() in ("DATABASE_URL", "SMTP_URL", "EMAIL_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:pw@localhost/db")
    return monkeypatch


def test_email_url_or_its_older_name_smtp_url_but_not_both(env: pytest.MonkeyPatch) -> None:
    env.setenv("EMAIL_URL", f"resend://{KEY}")
    settings = load_settings()
    assert settings.email_target_url == f"resend://{KEY}" and settings.email_timeout_seconds == 10.0
    assert KEY not in repr(settings)
    env.setenv("SMTP_URL", "smtp://127.0.0.1:25")
    with pytest.raises(ConfigurationError, match="EMAIL_URL and SMTP_URL are both set") as refused:
        load_settings()
    assert KEY not in str(refused.value)
    env.delenv("EMAIL_URL")
    assert load_settings().email_target_url == "smtp://127.0.0.1:25"


@pytest.mark.parametrize(
    ("value", "seconds"), [("7", 7.0), ("0", 0.0), ("-3", 0.0), ("1e9", 3600.0), ("soon", None), (None, None), ("nan", None)]
)
def test_retry_after_in_seconds_is_bounded(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = 1_800_000_000.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == 30.0


def test_refused_credentials_are_said_once_per_process_and_once_when_taken_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="brownout._worker.email")
    alarm = CredentialsAlarm("resend")
    refused = Delivery(Outcome.BAD_CREDENTIALS, "resend answered 401: validation_error: API key is invalid")
    for _ in range(5):
        alarm.observe(refused)
        alarm.observe(Delivery(Outcome.FAILED_TRANSIENT, "resend answered 500"))
    assert [r.levelno for r in caplog.records] == [logging.ERROR] and alarm.refused
    alarm.observe(Delivery(Outcome.SENT))
    alarm.observe(Delivery(Outcome.SENT))
    assert len(caplog.records) == 2 and "takes our credentials again" in caplog.records[1].getMessage() and not alarm.refused
    alarm.observe(refused)
    assert len(caplog.records) == 3  # refused again: said again
