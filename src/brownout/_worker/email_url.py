"""``EMAIL_URL`` (or its older name ``SMTP_URL``) to the backend that sends the outbox's emails."""

from __future__ import annotations

from urllib.parse import urlsplit

from brownout._worker.email_delivery import EmailBackend
from brownout._worker.email_providers import BASE_URLS, ProviderTarget, provider_backend
from brownout._worker.email_smtp import SCHEMES, SmtpBackend, SmtpTarget

EmailTarget = SmtpTarget | ProviderTarget


def parse_email_url(url: str) -> EmailTarget:
    """resend://KEY, postmark://SERVER_TOKEN, smtp://, smtp+starttls:// or smtps://; raise ValueError (secrets masked)."""
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme in SCHEMES:
        return SmtpTarget.from_url(url.strip())
    if scheme in BASE_URLS:
        return ProviderTarget.from_url(url.strip())
    known = ", ".join([*BASE_URLS, *SCHEMES])
    # Not the URL: with a scheme unknown, nothing says where in it a key would be to mask.
    raise ValueError(f"EMAIL_URL: scheme {scheme!r} must be one of {known}")


def email_backend(url: str, *, smtp_timeout: float, http_timeout: float) -> EmailBackend:
    """The backend for *url*: SMTP steps within *smtp_timeout*, provider calls within *http_timeout*."""
    target = parse_email_url(url)
    if isinstance(target, SmtpTarget):
        return SmtpBackend(target, timeout=smtp_timeout)
    return provider_backend(target, timeout=http_timeout)
