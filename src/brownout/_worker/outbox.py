"""The outbox relay: publish committed outbox rows as `send_email` jobs, then mark them.

One pass, every ``interval`` seconds, in three short steps, none holding a row lock across network I/O::

    claim:   UPDATE outbox SET claimed_until = now() + lease
             WHERE id IN (SELECT id ... WHERE published_at IS NULL AND claim free or expired
                          ORDER BY created_at LIMIT batch FOR UPDATE SKIP LOCKED)   -- COMMIT
    publish: each claimed row, in order (durable queue, persistent, confirm awaited; message id = outbox id)
    mark:    UPDATE outbox SET published_at = now() WHERE id IN (the confirmed ones)  -- COMMIT

Why claims and not ``FOR UPDATE`` held over the pass: the email job locks its row too (src/brownout/_worker/email.py),
and a job consumed while the relay still published the rest of its pass found its row locked, raised
`SendInProgress` and waited for a retry, seconds later. SKIP LOCKED in the claim keeps two relays from
claiming one row; the claim keeps the next pass of any relay off it until the lease ends.

Publish-then-mark: a crash (or a lost COMMIT) between the confirm and the mark leaves the row unpublished;
once its claim expires the next pass publishes it again; the duplicate job is recognisable by its message
id and made harmless by the send record (src/brownout/_worker/email.py). The other order would lose the email on that
crash. A refused publish ends the pass and releases the claims of the rows not yet published. A job
published and never sent within ``resend_after`` is published again (`_UNSENT`).

Never crashes its thread: a database that is down or slow (the breaker open,
the deadline spent) or a RabbitMQ that refuses skips the pass; rows wait in
the outbox. Every call has a deadline (``db_deadline``, ``publish_timeout``).
`OutboxRelayMiddleware` runs it for the life of a Dramatiq worker.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware
from sqlalchemy import Text, bindparam, cast, exists, extract, func, or_, select

from brownout._db import Database, describe, execute_with_retry
from brownout._dispatch.outbox import EMAIL, email_message
from brownout._dispatch.publisher import Publisher, PublishRejected
from brownout._schema import dead_letters, outbox
from brownout._settings import Settings

log = logging.getLogger(__name__)

_CLAIMABLE = (
    select(outbox.c.id)
    .where(
        outbox.c.published_at.is_(None),
        outbox.c.kind == EMAIL,
        or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < func.now()),
    )
    .order_by(outbox.c.created_at)
    .limit(bindparam("batch"))
    .with_for_update(skip_locked=True)
    .scalar_subquery()
)
_CLAIM = (
    outbox.update()
    .where(outbox.c.id.in_(_CLAIMABLE))
    .values(claimed_until=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, bindparam("lease")))
    .returning(outbox.c.id, outbox.c.payload, outbox.c.created_at)
)
# A job published and never sent (lost with a channel, or dropped by RabbitMQ after its retries) is published
# again once `resend_after` has passed, for rows created within RESEND_HORIZON_DAYS, unless it was dead-lettered
# (a permanent SMTP refusal). The send record makes a resend of a job that was only slow harmless.
RESEND_HORIZON_DAYS = 7
_UNSENT = (
    select(outbox.c.id)
    .where(
        outbox.c.kind == EMAIL,
        outbox.c.published_at.is_not(None),
        outbox.c.sent_at.is_(None),
        outbox.c.published_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, bindparam("resend_after")),
        outbox.c.created_at > func.now() - func.make_interval(0, 0, 0, RESEND_HORIZON_DAYS),
        ~exists().where(dead_letters.c.message_id == cast(outbox.c.id, Text)),
    )
    .order_by(outbox.c.published_at)
    .limit(bindparam("batch"))
    .with_for_update(skip_locked=True)
    .scalar_subquery()
)
_REOPEN = outbox.update().where(outbox.c.id.in_(_UNSENT)).values(published_at=None, claimed_until=None).returning(outbox.c.id)

# The age of the oldest email still to send: neither sent nor dead-lettered, of the rows the relay still publishes.
# Two halves, each within one of the outbox's partial indexes (unpublished; published and unsent), so the read
# never scans the sent rows, which are nearly all of the table.
_STILL_TO_SEND = (
    outbox.c.kind == EMAIL,
    outbox.c.sent_at.is_(None),
    outbox.c.created_at > func.now() - func.make_interval(0, 0, 0, RESEND_HORIZON_DAYS),
    ~exists().where(dead_letters.c.message_id == cast(outbox.c.id, Text)),
)
_OLDEST_UNPUBLISHED = select(func.min(outbox.c.created_at)).where(outbox.c.published_at.is_(None), *_STILL_TO_SEND)
_OLDEST_PUBLISHED_UNSENT = select(func.min(outbox.c.created_at)).where(outbox.c.published_at.is_not(None), *_STILL_TO_SEND)
_OLDEST_UNSENT = select(
    extract("epoch", func.now() - func.least(_OLDEST_UNPUBLISHED.scalar_subquery(), _OLDEST_PUBLISHED_UNSENT.scalar_subquery()))
)
OLDEST_REFRESH_SECONDS = 15.0  # how often the relay thread reads it (a metric: no need for every pass)

# Mark and release skip a row an email job holds while it sends (src/brownout/_worker/email.py): the relay never waits on
# SMTP, and that job marks its row published itself when it records the send.
_FREE_OF_THE_IDS = (
    select(outbox.c.id).where(outbox.c.id.in_(bindparam("ids", expanding=True))).with_for_update(skip_locked=True)
).scalar_subquery()
_MARK = outbox.update().where(outbox.c.id.in_(_FREE_OF_THE_IDS)).values(published_at=func.now(), claimed_until=None)
_RELEASE = outbox.update().where(outbox.c.id.in_(_FREE_OF_THE_IDS), outbox.c.published_at.is_(None)).values(claimed_until=None)


class OutboxRelay:
    """Publishes unpublished outbox rows; `relay_once` is one pass, `start`/`stop` run passes on a thread."""

    def __init__(
        self,
        *,
        database: Database,
        publisher: Publisher,
        queue_name: str,
        interval: float = 1.0,
        batch_size: int = 100,
        db_deadline: float = 5.0,
        publish_timeout: float = 2.0,
        resend_after: float = 3600.0,
        on_oldest_unsent: Callable[[float], None] | None = None,
    ) -> None:
        if interval <= 0 or db_deadline <= 0 or publish_timeout <= 0 or batch_size < 1 or resend_after <= 0:
            raise ValueError("interval, deadlines, resend_after and batch_size must be positive")
        self._resend_after = resend_after
        self._database = database
        self._publisher = publisher
        self._queue_name = queue_name
        self.interval = interval
        self._batch = batch_size
        self._db_deadline = db_deadline
        self._publish_timeout = publish_timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0  # jobs confirmed by RabbitMQ since start
        self._on_oldest_unsent = on_oldest_unsent  # the metrics' hook, fed from the relay thread
        self._oldest_read_at: float | None = None

    @property
    def lease_seconds(self) -> float:
        """How long a claim keeps other passes off a row: longer than a whole pass can take to publish."""
        return self._batch * self._publish_timeout + 2 * self._db_deadline

    def relay_once(self) -> int:
        """One pass: claim up to batch_size rows, publish them, mark them; return how many were marked.

        Raises what the database raises (the caller of a pass decides); a refused
        publish ends the pass early, marking only what was confirmed.
        """
        with self._database.session() as session:

            def reopen() -> int:
                reopened = session.execute(_REOPEN, {"batch": self._batch, "resend_after": self._resend_after}).all()
                session.commit()
                return len(reopened)

            reopened = execute_with_retry(session, reopen, deadline=self._db_deadline, idempotent=True)
            if reopened:
                log.warning("outbox relay: %d email job(s) published %.0f s ago and never sent: publishing again",
                            reopened, self._resend_after)  # fmt: skip

            def claim() -> list[Any]:
                rows = session.execute(_CLAIM, {"batch": self._batch, "lease": self.lease_seconds}).mappings().all()
                session.commit()
                return sorted(rows, key=lambda row: row["created_at"])

            # Idempotent: a claim that committed unseen is only a lease; its rows wait for it to end.
            rows = execute_with_retry(session, claim, deadline=self._db_deadline, idempotent=True)
        confirmed: list[uuid.UUID] = []
        for row in rows:
            try:
                self._publisher.publish(email_message(row, self._queue_name), timeout=self._publish_timeout)
            except PublishRejected as rejected:
                log.warning("outbox relay: publish refused (%s); %d row(s) wait", rejected.reason, len(rows) - len(confirmed))
                break
            confirmed.append(row["id"])
            self.published += 1
        unpublished = [row["id"] for row in rows[len(confirmed) :]]
        with self._database.session() as session:
            for statement, ids in ((_MARK, confirmed), (_RELEASE, unpublished)):
                if not ids:
                    continue

                def write(statement: Any = statement, ids: list[uuid.UUID] = ids) -> None:
                    session.execute(statement, {"ids": ids})
                    session.commit()

                # Idempotent: marking or releasing twice is harmless. A failure to mark re-publishes once the
                # claim expires (deduplicated); a failure to release only makes those rows wait for it.
                execute_with_retry(session, write, deadline=self._db_deadline, idempotent=True)
        return len(confirmed)

    def oldest_unsent_age(self) -> float:
        """Seconds since the oldest email still to send was written (0: none); raises what the database raises."""
        with self._database.session() as session:

            def read() -> float:
                age = session.execute(_OLDEST_UNSENT).scalar_one_or_none()
                session.rollback()
                return max(float(age), 0.0) if age is not None else 0.0

            return execute_with_retry(session, read, deadline=self._db_deadline, idempotent=True)

    def start(self) -> None:
        """Start the relay thread (first pass at once)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the outbox relay is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="brownout-outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the pass in progress; waits at most *timeout* (default: one pass's deadlines)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else 2 * self._db_deadline + self._publish_timeout + 1)
            if self._thread.is_alive():
                log.warning("outbox relay thread still running after stop()")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                while self.relay_once() == self._batch and not self._stopping.is_set():
                    pass  # a full batch: more may be waiting
                self._observe_oldest()
            except Exception as exc:  # the database is down or slow: the rows wait for the next pass
                log.warning("outbox relay: pass skipped: %s", describe(exc))
            self._stopping.wait(self.interval)

    def _observe_oldest(self) -> None:
        now = time.monotonic()
        if self._on_oldest_unsent is None or (
            self._oldest_read_at is not None and now - self._oldest_read_at < OLDEST_REFRESH_SECONDS
        ):
            return
        self._oldest_read_at = now
        self._on_oldest_unsent(self.oldest_unsent_age())


class OutboxRelayMiddleware(Middleware):
    """Runs an OutboxRelay (and its own Publisher on the email queue) while the Dramatiq worker runs."""

    def __init__(self, relay_factory: Callable[[], tuple[Publisher, OutboxRelay]]) -> None:
        self._factory = relay_factory
        self.relay: OutboxRelay | None = None
        self._publisher: Publisher | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, database: Database, *, on_oldest_unsent: Callable[[float], None] | None = None
    ) -> OutboxRelayMiddleware:
        if not settings.rabbitmq_url:
            raise ValueError("the outbox relay needs RABBITMQ_URL")
        urls = settings.rabbitmq_urls

        def build() -> tuple[Publisher, OutboxRelay]:
            publisher = Publisher(
                url=urls,
                queue_name=settings.email_queue_name,
                max_length=settings.queue_max_length,
                queue_type=settings.queue_type,
                delivery_limit=settings.queue_delivery_limit,
                confirm_timeout=settings.publish_timeout_seconds,
                heartbeat=settings.rabbitmq_heartbeat_seconds,
            )
            relay = OutboxRelay(
                database=database,
                publisher=publisher,
                queue_name=settings.email_queue_name,
                interval=settings.outbox_relay_interval_seconds,
                publish_timeout=settings.publish_timeout_seconds,
                resend_after=settings.outbox_resend_after_minutes * 60,
                on_oldest_unsent=on_oldest_unsent,
            )
            return publisher, relay

        return cls(build)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Start the publisher (it connects in the background) and the relay thread."""
        publisher, relay = self._factory()
        self._publisher = publisher.start()
        self.relay = relay
        relay.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop the relay after its pass in progress, then close the publisher."""
        if self.relay is not None:
            self.relay.stop()
        if self._publisher is not None:
            self._publisher.close()
