"""SMTP_URL: a password never crosses a network in clear."""

from __future__ import annotations

import pytest

from brownout._worker.email import SmtpTarget


@pytest.mark.parametrize("url", ["smtp://app:hunter2@mail.example.com:25", "smtp://app:hunter2@10.0.0.7"])
def test_a_login_over_plain_smtp_to_a_remote_host_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="in clear") as refused:
        SmtpTarget.from_url(url)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "security"),
    [
        ("smtp+starttls://app:hunter2@mail.example.com", "starttls"),
        ("smtps://app:hunter2@mail.example.com", "tls"),
        ("smtp://app:hunter2@127.0.0.1:2525", "plain"),  # a relay on this host
        ("smtp://mail.example.com", "plain"),  # no login: nothing secret to send
    ],
)
def test_encrypted_local_or_anonymous_urls_are_accepted(url: str, security: str) -> None:
    assert SmtpTarget.from_url(url).security == security
