"""The `send_email` actor: send an outbox email through SMTP, at least once, de-duplicated.

What is promised: every email in the outbox is handed to the SMTP server at
least once, and in all but one window exactly once. A job (published by the
outbox relay, src/brownout/_worker/outbox.py, possibly more than once) is handled as:

1. In one transaction: lock the job's outbox row (``FOR UPDATE``, waiting at
   most ``BUSY_LOCK_TIMEOUT``: the relay holds it for milliseconds) and look
   up the send record (``email_sends``, keyed by the Message-ID). Recorded: the
   email went out already; acknowledge (a duplicate job, a redelivery). Row
   still locked: another thread or worker is sending it now; raise
   `SendInProgress`, so the job is retried later and then finds the record.
2. Still holding the lock, send it via SMTP with ``Message-ID:
   <{notification_id}@brownout>``, the same for every attempt.
3. Insert the send record, mark the row published (the relay skips a row a
   job holds), and commit (retried up to ``record_deadline``).

**The one window for a duplicate**: the SMTP server accepted the message
(step 2) and the process dies, or the database stays unreachable past
``record_deadline``, before the send record commits (step 3). The job is then
redelivered, finds no record and sends again, with the same Message-ID, so a
receiver (or mail store) that de-duplicates on Message-ID shows it once. SMTP
has no way to ask the server "did you already take this one", so this window
cannot be closed from here, only kept short.

Failures:

- SMTP unreachable, a timeout, a 4xx answer, refused login (fixable by the
  operator): `EmailNotSent`, raised outside the health gate's reach, so
  Dramatiq's Retries backs off (``min_backoff`` .. ``max_backoff``, up to
  ``max_retries``; then Dramatiq's dead-letter queue).
- A 5xx answer for the message itself (bad recipient, rejected content): it
  would fail forever; kept as a dead letter in PostgreSQL with the reason.
- The database unreachable: `DatabaseUnavailable`, held by the health gate
  like the apply actor's (src/brownout/_worker/health_gate.py): no retry spent.

Passwords are masked in every log line and error (brownout._redaction).
"""

from __future__ import annotations

import enum
import logging
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import dramatiq
from pydantic import ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from brownout._db import Database, execute_with_retry
from brownout._dispatch.outbox import SEND_EMAIL_ACTOR, EmailJob
from brownout._redaction import mask_secrets
from brownout._schema import email_sends, outbox
from brownout._settings import Settings
from brownout._worker.actors import dead_letter_current
from brownout._worker.health_gate import DatabaseUnavailable, unavailable_as_hold

log = logging.getLogger(__name__)

Security = Literal["plain", "starttls", "tls"]
_SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("plain", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}


_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # a relay on the same host: nothing crosses a network


class EmailNotSent(Exception):
    """Raised when the SMTP server could not take the email now; Dramatiq retries it with backoff."""


BUSY_LOCK_TIMEOUT = 0.5  # seconds a job waits for its outbox row before calling it busy
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's error code for lock_timeout


class SendInProgress(Exception):
    """Raised when another delivery of the same job holds its outbox row (is sending it); retried later."""


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how to send, from ``SMTP_URL``; repr never shows the password."""

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
        if scheme not in _SCHEMES:
            raise ValueError(f"SMTP_URL {mask_secrets(url)!r}: scheme must be one of {', '.join(_SCHEMES)}")
        if not parts.hostname:
            raise ValueError(f"SMTP_URL {mask_secrets(url)!r}: no host")
        security, default_port = _SCHEMES[scheme]
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if security == "plain" and password is not None and parts.hostname not in _LOCAL_HOSTS:
            raise ValueError(
                f"SMTP_URL {mask_secrets(url)!r}: a login over plain smtp:// to a remote host sends the password in clear;"
                " use smtp+starttls:// (587) or smtps:// (465)"
            )
        return cls(parts.hostname, parts.port or default_port, security, username, password)


@dataclass
class EmailRuntime:
    """What the actor needs; built by the entry point (brownout._worker.main) or a test."""

    database: Database
    smtp: SmtpTarget
    sender: str
    smtp_timeout: float = 10.0
    db_deadline: float = 10.0
    record_deadline: float = 30.0  # the duplicate window's guard: try hard to record a send
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, settings: Settings, database: Database) -> EmailRuntime:
        if not settings.smtp_url:
            raise ValueError("the send_email actor needs SMTP_URL")
        return cls(
            database=database,
            smtp=SmtpTarget.from_url(settings.smtp_url),
            sender=settings.email_from,
            smtp_timeout=settings.smtp_timeout_seconds,
        )


def declare_email_actor(
    broker: dramatiq.Broker,
    runtime: EmailRuntime,
    *,
    queue_name: str,
    max_retries: int = 30,
    min_backoff_ms: int = 5_000,
    max_backoff_ms: int = 3_600_000,
) -> dramatiq.Actor[Any, Any]:
    """Declare `send_email` on *broker*. Defaults: retries from 5 s, doubling, capped at 1 h: about a day in all."""

    def send_email(data: dict[str, Any]) -> None:
        with unavailable_as_hold():  # the database's fault: the health gate holds the job
            failure = _send(runtime, data)
        if failure is not None:  # raised here, outside the hold, so an SMTP socket error is not the database's
            raise EmailNotSent(failure)

    decorate = dramatiq.actor(
        broker=broker,
        actor_name=SEND_EMAIL_ACTOR,
        queue_name=queue_name,
        throws=(DatabaseUnavailable,),  # held by the gate: no retry spent, no delay queue
        max_retries=max_retries,
        min_backoff=min_backoff_ms,
        max_backoff=max_backoff_ms,
    )
    actor: dramatiq.Actor[Any, Any] = decorate(send_email)
    return actor


class _Claim(enum.Enum):
    MINE = "mine"
    SENT = "sent"
    BUSY = "busy"
    MISSING = "missing"


def _claim(session: Session, job: EmailJob) -> _Claim:
    """Lock the job's outbox row and check the send record; leaves the transaction open when MINE.

    The lock is waited for briefly (BUSY_LOCK_TIMEOUT): the relay marking or claiming rows holds it for
    milliseconds; another delivery sending this email holds it for the SMTP conversation (BUSY)."""
    exists = session.execute(select(outbox.c.id).where(outbox.c.id == job.outbox_id)).scalar_one_or_none()
    if exists is None:
        session.rollback()
        return _Claim.MISSING
    session.execute(text(f"SET LOCAL lock_timeout = '{int(BUSY_LOCK_TIMEOUT * 1000)}ms'"))
    try:
        session.execute(select(outbox.c.id).where(outbox.c.id == job.outbox_id).with_for_update())
    except OperationalError as exc:
        if getattr(exc.orig, "pgcode", None) != LOCK_NOT_AVAILABLE:
            raise
        session.rollback()
        return _Claim.BUSY
    session.execute(text("SET LOCAL lock_timeout = 0"))
    sent = session.execute(select(email_sends.c.sent_at).where(email_sends.c.message_id == job.message_id)).first()
    if sent is not None:
        session.rollback()
        return _Claim.SENT
    return _Claim.MINE


def _send(runtime: EmailRuntime, data: dict[str, Any]) -> str | None:
    """Send the job's email once; return why SMTP failed (to retry), None when done or dead-lettered."""
    try:
        job = EmailJob.model_validate(data)
    except ValidationError as invalid:
        _dead_letter(runtime, f"invalid send_email job: {invalid}")
        return None
    with runtime.database.session() as session:
        claim = execute_with_retry(session, lambda: _claim(session, job), deadline=runtime.db_deadline)
        if claim is _Claim.SENT:
            log.info("email %s already sent: duplicate job", job.message_id)
            return None
        if claim is _Claim.BUSY:
            raise SendInProgress(f"email {job.message_id} is being sent by another delivery")
        if claim is _Claim.MISSING:
            _dead_letter(runtime, f"outbox row {job.outbox_id} does not exist")
            return None
        try:
            message = build_message(job, sender=runtime.sender)
        except ValueError as unbuildable:  # a header the email library refuses (a line break): never sendable
            session.rollback()
            _dead_letter(runtime, f"email {job.message_id} cannot be built: {unbuildable}")
            return None
        try:
            failure = _smtp_send(runtime, message)
        except BaseException:
            session.rollback()
            raise
        if failure is not None:
            session.rollback()
            permanent, reason = failure
            if permanent:
                _dead_letter(runtime, f"SMTP refused {job.message_id} for good: {reason}")
                return None
            log.warning("email %s not sent, will retry: %s", job.message_id, reason)
            return reason

        def record() -> None:
            session.execute(
                insert(email_sends)
                .values(message_id=job.message_id, outbox_id=job.outbox_id, notification_id=job.entity_id, recipient=job.to)
                .on_conflict_do_nothing(index_elements=["message_id"])
            )
            # The relay skips a row this job holds (src/brownout/_worker/outbox.py): sent is published, whatever the relay did.
            session.execute(
                outbox.update()
                .where(outbox.c.id == job.outbox_id)
                .values(published_at=func.coalesce(outbox.c.published_at, func.now()), claimed_until=None, sent_at=func.now())
            )
            session.commit()

        # Sent: from here until this commit is the duplicate window (module docstring).
        execute_with_retry(session, record, deadline=runtime.record_deadline, idempotent=True)
    log.info("email %s sent", job.message_id)
    return None


def build_message(job: EmailJob, *, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = job.to
    message["Subject"] = job.subject
    message["Message-ID"] = job.message_id
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message.set_content(job.body)
    return message


def _smtp_send(runtime: EmailRuntime, message: EmailMessage) -> tuple[bool, str] | None:
    """Hand *message* to the SMTP server; None when accepted, else (permanent?, masked reason)."""
    target = runtime.smtp
    context = runtime.ssl_context or ssl.create_default_context()
    client: smtplib.SMTP | None = None
    try:
        if target.security == "tls":
            client = smtplib.SMTP_SSL(target.host, target.port, timeout=runtime.smtp_timeout, context=context)
        else:
            client = smtplib.SMTP(target.host, target.port, timeout=runtime.smtp_timeout)
        client.ehlo()
        if target.security == "starttls":
            client.starttls(context=context)
            client.ehlo()
        if target.username is not None:
            client.login(target.username, target.password or "")
        client.send_message(message)
    except smtplib.SMTPAuthenticationError as exc:  # the operator fixes the credentials: keep retrying
        return False, _reason(exc)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        return bool(codes) and all(code >= 500 for code in codes), _reason(exc)
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code >= 500, _reason(exc)
    except (smtplib.SMTPException, OSError) as exc:  # refused, unreachable, timed out, dropped, TLS failed
        return False, _reason(exc)
    finally:
        if client is not None:
            _quit(client)
    return None


def _quit(client: smtplib.SMTP) -> None:
    """QUIT, bounded by the client's timeout; the message is already taken (or not), so failures only close."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _reason(exc: BaseException) -> str:
    return mask_secrets(f"{type(exc).__name__}: {exc}")


def _dead_letter(runtime: EmailRuntime, reason: str) -> None:
    dead_letter_current(runtime.database, reason)
