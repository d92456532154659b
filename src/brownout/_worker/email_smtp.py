"""The SMTP backend: smtp://, smtp+starttls:// and smtps:// URLs, each step within ``smtp_timeout``.

SMTP has no way to ask the server "did you already take this one": the stable ``Message-ID`` lets a receiver
that de-duplicates on it show a resent email once, and the actor's send record does the rest.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Literal
from urllib.parse import unquote, urlsplit

from brownout._dispatch.outbox import EmailJob
from brownout._redaction import mask_secrets
from brownout._worker.email_delivery import SENT, Delivery, Outcome

Security = Literal["plain", "starttls", "tls"]
SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("plain", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # a relay on the same host: nothing crosses a network


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how to send, from ``EMAIL_URL`` or ``SMTP_URL``; repr never shows the password."""

    host: str
    port: int
    security: Security
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> SmtpTarget:
        """Parse smtp://, smtp+starttls:// or smtps:// (user and password optional); raise ValueError."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"EMAIL_URL/SMTP_URL {mask_secrets(url)!r}: scheme must be one of {', '.join(SCHEMES)}")
        if not parts.hostname:
            raise ValueError(f"EMAIL_URL/SMTP_URL {mask_secrets(url)!r}: no host")
        security, default_port = SCHEMES[scheme]
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if security == "plain" and password is not None and parts.hostname not in _LOCAL_HOSTS:
            raise ValueError(
                f"EMAIL_URL/SMTP_URL {mask_secrets(url)!r}: a login over plain smtp:// to a remote host sends the password"
                " in clear; use smtp+starttls:// (587) or smtps:// (465)"
            )
        return cls(parts.hostname, parts.port or default_port, security, username, password)


def build_message(job: EmailJob, *, sender: str) -> EmailMessage:
    """The email as SMTP sends it; raises ValueError for a header the email library refuses (a line break)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = job.to
    message["Subject"] = job.subject
    message["Message-ID"] = job.message_id
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message.set_content(job.body)
    return message


class SmtpBackend:
    """One SMTP conversation per email (connect, TLS, login, send, QUIT), each step within *timeout*."""

    name = "smtp"

    def __init__(self, target: SmtpTarget, *, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.ssl_context = ssl_context

    def send(self, job: EmailJob, sender: str) -> Delivery:
        message = build_message(job, sender=sender)
        target = self.target
        context = self.ssl_context or ssl.create_default_context()
        client: smtplib.SMTP | None = None
        try:
            if target.security == "tls":
                client = smtplib.SMTP_SSL(target.host, target.port, timeout=self.timeout, context=context)
            else:
                client = smtplib.SMTP(target.host, target.port, timeout=self.timeout)
            client.ehlo()
            if target.security == "starttls":
                client.starttls(context=context)
                client.ehlo()
            if target.username is not None:
                client.login(target.username, target.password or "")
            client.send_message(message)
        except smtplib.SMTPAuthenticationError as exc:  # the operator fixes the credentials: the emails wait
            return Delivery(Outcome.BAD_CREDENTIALS, _reason(exc))
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            permanent = bool(codes) and all(code >= 500 for code in codes)
            return Delivery(Outcome.REJECTED if permanent else Outcome.FAILED_TRANSIENT, _reason(exc))
        except smtplib.SMTPResponseException as exc:
            return Delivery(Outcome.REJECTED if exc.smtp_code >= 500 else Outcome.FAILED_TRANSIENT, _reason(exc))
        except (smtplib.SMTPException, OSError) as exc:  # refused, unreachable, timed out, dropped, TLS failed
            return Delivery(Outcome.FAILED_TRANSIENT, _reason(exc))
        finally:
            if client is not None:
                _quit(client)
        return SENT

    def close(self) -> None:
        """Nothing kept open between emails."""


def _quit(client: smtplib.SMTP) -> None:
    """QUIT, bounded by the client's timeout; the message is already taken (or not), so failures only close."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _reason(exc: BaseException) -> str:
    return mask_secrets(f"{type(exc).__name__}: {exc}")
