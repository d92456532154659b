"""The `send_email` actor: send an outbox email through its backend (SMTP, Resend, Postmark), at least once, de-duplicated.

What is promised: every email in the outbox is handed to the backend at
least once, and in all but one window (per backend, below) exactly once. A job (published by the
outbox relay, src/brownout/_worker/outbox.py, possibly more than once) is handled as:

1. In one transaction: lock the job's outbox row (``FOR UPDATE``, waiting at
   most ``BUSY_LOCK_TIMEOUT``: the relay holds it for milliseconds) and look
   up the send record (``email_sends``, keyed by the Message-ID). Recorded: the
   email went out already; acknowledge (a duplicate job, a redelivery). Row
   still locked: another thread or worker is sending it now; raise
   `SendInProgress`, so the job is retried later and then finds the record.
2. Still holding the lock, send it (``EMAIL_URL``, src/brownout/_worker/email_url.py) with ``Message-ID:
   <{notification_id}@brownout>`` (SMTP, Postmark) or ``Idempotency-Key: brownout-email/{notification_id}``
   (Resend), the same for every attempt.
3. Insert the send record, mark the row published (the relay skips a row a
   job holds), and commit (retried up to ``record_deadline``).

**The window for a duplicate**: the backend took the email and its answer never
reached us (a deadline cut a stalled answer, the connection dropped), or the process dies, or the database
stays unreachable past ``record_deadline``, before the send record commits (step 3). The job is then
redelivered, finds no record and sends again:

- SMTP and Postmark: sent again, with the same Message-ID, so a receiver (or mail store) that
  de-duplicates on it shows it once. Neither can be asked "did you already take this one".
- Resend: the retry carries the same Idempotency-Key, and Resend answers it with the first email's id
  without sending again, for 24 h: a duplicate needs the retry to come more than 24 h after the send.

Failures (src/brownout/_worker/email_delivery.py sorts every backend's answers):

- Unreachable, a timeout, a 5xx, a busy answer: `EmailNotSent`, raised outside the health gate's reach,
  so Dramatiq's Retries backs off (``min_backoff`` .. ``max_backoff``, up to ``max_retries``; then
  Dramatiq's dead-letter queue, and the relay publishes the job again after ``resend_after``).
- Rate limited: `EmailRateLimited`, retried after the provider's Retry-After.
- Refused credentials, account or sender: `EmailCredentialsRefused`, retried with backoff like a transient
  failure but neither logged per email nor sent to Sentry: counted, and said once per process.
- The email itself refused for good (bad recipient, rejected content): kept as a dead letter in
  PostgreSQL with the reason, once.
- The database unreachable: `DatabaseUnavailable`, held by the health gate
  like the apply actor's (src/brownout/_worker/health_gate.py): no retry spent.

Passwords and keys are masked in every log line and error (brownout._redaction).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from pydantic import ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from brownout._db import Database, describe, execute_with_retry
from brownout._dispatch.outbox import SEND_EMAIL_ACTOR, EmailJob
from brownout._schema import email_sends, outbox
from brownout._settings import Settings
from brownout._worker.actors import dead_letter_current
from brownout._worker.email_delivery import CredentialsAlarm, Delivery, EmailBackend, Outcome
from brownout._worker.email_smtp import SmtpTarget, build_message
from brownout._worker.email_url import email_backend
from brownout._worker.health_gate import DatabaseUnavailable, unavailable_as_hold

__all__ = ["EmailNotSent", "EmailRuntime", "SendInProgress", "SmtpTarget", "build_message", "declare_email_actor"]

log = logging.getLogger(__name__)


class EmailNotSent(Exception):
    """Raised when the backend could not take the email now; Dramatiq retries it with backoff (and logs it)."""


class EmailRateLimited(dramatiq.Retry):
    """Raised when the provider asks us to slow down: retried after its Retry-After (a Retry: not an error)."""


class EmailCredentialsRefused(dramatiq.Retry):
    """Raised while the backend refuses our key, account or sender: retried with backoff, said once per process."""


BUSY_LOCK_TIMEOUT = 0.5  # seconds a job waits for its outbox row before calling it busy
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's error code for lock_timeout
MIN_RETRY_AFTER_SECONDS = 1.0  # a Retry-After of 0 must not turn a backlog into a busy loop


class SendInProgress(Exception):
    """Raised when another delivery of the same job holds its outbox row (is sending it); retried later."""


@dataclass
class EmailRuntime:
    """What the actor needs; built by the entry point (brownout._worker.main) or a test."""

    database: Database
    backend: EmailBackend
    sender: str
    db_deadline: float = 10.0
    record_deadline: float = 30.0  # the duplicate window's guard: try hard to record a send
    on_outcome: Callable[[str, str], None] | None = None  # (backend, outcome): the metrics' hook
    alarm: CredentialsAlarm = field(init=False)

    def __post_init__(self) -> None:
        self.alarm = CredentialsAlarm(self.backend.name)

    @classmethod
    def from_settings(cls, settings: Settings, database: Database) -> EmailRuntime:
        url = settings.email_target_url
        if not url:
            raise ValueError("the send_email actor needs EMAIL_URL")
        backend = email_backend(url, smtp_timeout=settings.smtp_timeout_seconds, http_timeout=settings.email_timeout_seconds)
        return cls(database=database, backend=backend, sender=settings.email_from)

    def observe(self, delivery: Delivery) -> None:
        self.alarm.observe(delivery)
        if self.on_outcome is not None:
            self.on_outcome(self.backend.name, delivery.outcome.value)


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
        if failure is not None:  # raised here, outside the hold, so a socket error is not the database's
            raise failure

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


def _send(runtime: EmailRuntime, data: dict[str, Any]) -> Exception | None:
    """Send the job's email once; return what to raise to retry it, None when done or dead-lettered."""
    try:
        job = EmailJob.model_validate(data)
    except ValidationError as invalid:
        _dead_letter(runtime, f"invalid send_email job: {describe(invalid)}")
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
            build_message(job, sender=runtime.sender)  # every backend's headers: a line break is never sendable
        except ValueError as unbuildable:  # a header the email library refuses (a line break): never sendable
            session.rollback()
            _dead_letter(runtime, f"email {job.message_id} cannot be built: {unbuildable}")
            return None
        try:
            delivery = runtime.backend.send(job, runtime.sender)
        except BaseException:
            session.rollback()
            raise
        runtime.observe(delivery)
        if delivery.outcome is not Outcome.SENT:
            session.rollback()
            return _failure(runtime, job, delivery)

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
    log.info("email %s sent (%s)", job.message_id, runtime.backend.name)
    return None


def _failure(runtime: EmailRuntime, job: EmailJob, delivery: Delivery) -> Exception | None:
    """What a failed attempt becomes: a dead letter (None), or the exception that retries it."""
    backend = runtime.backend.name
    if delivery.outcome is Outcome.REJECTED:
        _dead_letter(runtime, f"{backend} refused {job.message_id} for good: {delivery.reason}")
        return None
    if delivery.outcome is Outcome.BAD_CREDENTIALS:  # said once per process by the alarm, counted by the hook
        return EmailCredentialsRefused(f"{backend} refuses our credentials: {delivery.reason}")
    if delivery.outcome is Outcome.RATE_LIMITED:
        delay = None if delivery.retry_after is None else int(max(delivery.retry_after, MIN_RETRY_AFTER_SECONDS) * 1000)
        log.info("email %s rate limited by %s, retried in %s ms", job.message_id, backend, delay or "backoff")
        return EmailRateLimited(f"{backend} rate limited: {delivery.reason}", delay=delay)
    log.warning("email %s not sent, will retry: %s", job.message_id, delivery.reason)
    return EmailNotSent(delivery.reason)


def _dead_letter(runtime: EmailRuntime, reason: str) -> None:
    dead_letter_current(runtime.database, reason)
