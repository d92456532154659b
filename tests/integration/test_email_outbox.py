"""Notification emails through the outbox: real PostgreSQL, RabbitMQ and Dramatiq worker, and each backend against a
real server: SMTP (aiosmtpd), Resend's and Postmark's APIs (tests/support/fake_email_provider.py), on 127.0.0.1."""

from __future__ import annotations

import email
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from aiosmtpd.controller import Controller
from dramatiq.middleware import Middleware
from prometheus_client import generate_latest
from sqlalchemy import func, select, text

from app.dispatch.notifications import CREATE, build_registry
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._dispatch.dispatcher import Applied, Dispatcher, Queued
from brownout._dispatch.outbox import SEND_EMAIL_ACTOR, email_message, email_row
from brownout._dispatch.publisher import Publisher
from brownout._observability.metrics import Metrics
from brownout._schema import dead_letters, email_sends, outbox
from brownout._worker.actors import APPLY_BATCH_ACTOR, ApplyRuntime, declare_apply_actor
from brownout._worker.email import EmailRuntime, declare_email_actor
from brownout._worker.email_delivery import EmailBackend
from brownout._worker.email_providers import IDEMPOTENCY_PREFIX
from brownout._worker.email_smtp import SmtpBackend, SmtpTarget
from brownout._worker.email_url import email_backend
from brownout._worker.outbox import OutboxRelay, OutboxRelayMiddleware
from tests.conftest import database_url
from tests.support.fake_email_provider import FakeProvider
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, delete_queue_set
from tests.support.sentry_capture import SentEvents
from tests.support.worker_rig import WorkerRig

BACKENDS = ["smtp", "resend", "postmark"]
PROVIDERS = ["resend", "postmark"]
SENDER = "Brownout <noreply@localhost>"
HTTP_DEADLINE = 1.0  # BROWNOUT_EMAIL_TIMEOUT_SECONDS of these tests: a stall costs this much

NOTE = {"user_id": 7, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}


class Recorder:
    """aiosmtpd handler: keeps (Message-ID, To, Subject) of every message taken."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.received_at: dict[str, float] = {}
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content)
        with self._lock:
            self.messages.append({"Message-ID": parsed["Message-ID"], "To": parsed["To"], "Subject": parsed["Subject"]})
            self.received_at[parsed["Message-ID"]] = time.time()
        return "250 Message accepted for delivery"

    def message_ids(self) -> list[str]:
        with self._lock:
            return [m["Message-ID"] for m in self.messages]


class SmtpServer:
    """A real SMTP server on 127.0.0.1 that can be down (the port refuses) and up again on the same port."""

    kind = "smtp"

    def __init__(self) -> None:
        self.recorder = Recorder()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._controller: Controller | None = None
        self._refuser: socket.socket | None = None

    def up(self) -> None:
        self._release()
        # SMTPUTF8 as real servers offer it: an internationalised address (email-validator takes them) is sendable.
        self._controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=True)
        self._controller.start()

    def down(self) -> None:
        """Bound but not listening: every connect is refused."""
        self._release()
        refuser = socket.socket()
        refuser.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        refuser.bind(("127.0.0.1", self.port))
        self._refuser = refuser

    def _release(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._refuser is not None:
            self._refuser.close()
            self._refuser = None


class ProviderRecorder:
    """A fake provider's deliveries in the SMTP recorder's shape (Message-ID, To, Subject), so one test reads
    every backend. Resend's emails are named by their idempotency key, Postmark's by their Message-ID header."""

    def __init__(self, fake: FakeProvider) -> None:
        self._fake = fake

    def _deliveries(self) -> list[dict[str, Any]]:
        return self._fake.delivered()

    def _identify(self, delivery: dict[str, Any]) -> str:
        if self._fake.kind == "resend":
            return f"<{str(delivery['ref']).removeprefix(IDEMPOTENCY_PREFIX)}@brownout>"
        return str(delivery["ref"])

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"Message-ID": self._identify(d), "To": d["to"], "Subject": d["subject"]} for d in self._deliveries()]

    @property
    def received_at(self) -> dict[str, float]:
        return {self._identify(d): d["at"] for d in self._deliveries()}

    def message_ids(self) -> list[str]:
        return [m["Message-ID"] for m in self.messages]


class ProviderSink:
    """A fake provider behind the same face as SmtpServer (recorder, up, down)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.fake = FakeProvider("resend" if kind == "resend" else "postmark")
        self.recorder = ProviderRecorder(self.fake)

    def up(self) -> None:
        self.fake.up()

    def down(self) -> None:
        self.fake.down()

    def _release(self) -> None:
        self.fake.close()


Sink = SmtpServer | ProviderSink


class Processed(Middleware):
    """Counts send_email and apply_command messages processed (ok / failed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        with self._lock:
            counts = self.ok if exception is None else self.failed
            if message.actor_name == APPLY_BATCH_ACTOR:  # a batch of the command queue's deliveries
                (messages,) = message.args
                for each in messages:
                    counts[each.actor_name] = counts.get(each.actor_name, 0) + 1
            else:
                counts[message.actor_name] = counts.get(message.actor_name, 0) + 1

    def sent_ok(self) -> int:
        with self._lock:
            return self.ok.get(SEND_EMAIL_ACTOR, 0)


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


@pytest.fixture
def email_queue(queue_name: str) -> Iterator[str]:
    name = f"{queue_name}-email"
    yield name
    delete_queue_set(name)


@pytest.fixture(params=BACKENDS)
def sink(request: pytest.FixtureRequest) -> Iterator[Sink]:
    """Where the worker sends: an SMTP server or a fake provider, up; each test runs against each backend."""
    server: Sink = SmtpServer() if request.param == "smtp" else ProviderSink(request.param)
    server.up()
    yield server
    server._release()


def backend_for(sink: Sink, *, key: str | None = None) -> EmailBackend:
    """The backend the worker builds from EMAIL_URL (a provider's through the real URL parsing)."""
    if isinstance(sink, SmtpServer):
        return SmtpBackend(SmtpTarget("127.0.0.1", sink.port, "plain"), timeout=2)
    return email_backend(sink.fake.email_url(key), smtp_timeout=2, http_timeout=HTTP_DEADLINE)


@pytest.fixture
def processed() -> Processed:
    return Processed()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()  # a private registry: this test's counts only


def emails_counted(metrics: Metrics, backend: str, outcome: str) -> float:
    return metrics.registry.get_sample_value("brownout_emails_total", {"backend": backend, "outcome": outcome}) or 0.0


@pytest.fixture
def run_worker(
    make_database: Callable[..., Database],
    queue_name: str,
    email_queue: str,
    sink: Sink,
    processed: Processed,
    metrics: Metrics,
    make_worker_rig: Callable[..., WorkerRig],
) -> Iterator[Callable[..., None]]:
    """A real Dramatiq worker on both queues, with the outbox relay running (as brownout._worker.main wires it),
    sending to *sink* (or through the backend given to start)."""
    backends: list[EmailBackend] = []
    rigs: list[WorkerRig] = []

    def start(backend: EmailBackend | None = None) -> None:
        backend = backend or backend_for(sink)
        backends.append(backend)
        worker_db = make_database()  # the worker's own Database and breaker, as in its own dyno
        rig = make_worker_rig(max_length=1000)
        rigs.append(rig)
        broker = rig.broker
        broker.add_middleware(processed)
        declare_apply_actor(broker, ApplyRuntime(database=worker_db, registry=build_registry()), queue_name=queue_name)
        runtime = EmailRuntime(database=worker_db, backend=backend, sender=SENDER)
        runtime.on_outcome = lambda name, outcome: metrics.emails.labels(name, outcome).inc()
        declare_email_actor(broker, runtime, queue_name=email_queue, max_retries=100, min_backoff_ms=100, max_backoff_ms=400)

        def relay() -> tuple[Publisher, OutboxRelay]:
            publisher = Publisher(url=RABBITMQ_URL, queue_name=email_queue, max_length=1000)
            relay = OutboxRelay(database=worker_db, publisher=publisher, queue_name=email_queue, interval=0.2, resend_after=60)
            return publisher, relay

        broker.add_middleware(OutboxRelayMiddleware(relay))
        rig.start({queue_name, email_queue}, threads=4)

    yield start
    for rig in rigs:  # the workers first: none may still be sending through a backend being closed
        rig.stop_workers()
    for backend in backends:
        backend.close()


def direct(db: Database) -> Dispatcher:
    return Dispatcher(database=db, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=2.0)


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def outbox_rows(db: Database) -> list[Any]:
    with db.session() as s:
        return list(s.execute(select(outbox).order_by(outbox.c.created_at)).mappings().all())


def message_id(notification_id: uuid.UUID) -> str:
    return f"<{notification_id}@brownout>"


def test_a_creation_writes_one_outbox_row_in_its_own_transaction(db: Database) -> None:
    dispatcher = direct(db)
    first = dispatcher.submit(CREATE, NOTE, idempotency_key="k")
    again = dispatcher.submit(CREATE, NOTE, idempotency_key="k")
    assert isinstance(first, Applied) and isinstance(again, Applied) and again.duplicate
    (row,) = outbox_rows(db)
    assert row["notification_id"] == first.id and row["kind"] == "email" and row["published_at"] is None
    assert row["payload"] == {"notification_id": str(first.id), "to": NOTE["email"], "subject": "Welcome", "body": "Hello"}
    with db.session() as s:
        applied_at = s.execute(select(notifications.c.applied_at)).scalar_one()
    assert row["created_at"] == applied_at, "now() is the transaction's start: same value, same transaction"


def test_the_queued_path_writes_one_row_and_the_email_goes_once(
    db: Database,
    make_publisher: Callable[..., Publisher],
    queue_name: str,
    sink: Sink,
    processed: Processed,
    run_worker: Callable[..., None],
) -> None:
    publisher = make_publisher()
    dispatcher = Dispatcher(
        database=db, publisher=publisher, registry=build_registry(), queue_name=queue_name, request_deadline=0.3
    )
    db.breaker.force_open()
    envelope = dispatcher.accept(CREATE, NOTE, idempotency_key="q")
    assert isinstance(dispatcher.enqueue(envelope), Queued)
    publisher.publish(envelope.to_message(queue_name))  # the same write delivered twice
    run_worker()
    assert wait_until(lambda: sink.recorder.message_ids() == [message_id(envelope.entity_id)], timeout=20)
    assert wait_until(lambda: processed.ok.get("apply_command", 0) == 2, timeout=10)
    # The provider has the email before the worker records its send (it records the provider's answer).
    assert wait_until(lambda: count(db, email_sends) == 1, timeout=10)
    assert count(db, outbox) == 1
    assert not wait_until(lambda: len(sink.recorder.messages) > 1, timeout=1.0)
    assert count(db, email_sends) == 1


def test_each_email_is_sent_once_even_when_its_job_is_delivered_again(
    db: Database,
    make_publisher: Callable[..., Publisher],
    email_queue: str,
    sink: Sink,
    processed: Processed,
    run_worker: Callable[..., None],
) -> None:
    dispatcher = direct(db)
    created = [dispatcher.submit(CREATE, NOTE | {"email": f"u{i}@example.com"}, idempotency_key=f"k{i}") for i in range(3)]
    ids = {message_id(c.id) for c in created if isinstance(c, Applied)}
    run_worker()
    assert wait_until(lambda: set(sink.recorder.message_ids()) == ids, timeout=20)
    assert {m["To"] for m in sink.recorder.messages} == {f"u{i}@example.com" for i in range(3)}
    assert {m["Subject"] for m in sink.recorder.messages} == {"Welcome"}
    assert wait_until(lambda: all(r["published_at"] is not None for r in outbox_rows(db)), timeout=5)

    # redelivery: every job published twice more, at once, to a worker with 4 threads
    before = processed.sent_ok()
    again = make_publisher(queue_name=email_queue)
    for row in outbox_rows(db) * 2:
        again.publish(email_message(row, email_queue))
    assert wait_until(lambda: processed.sent_ok() >= before + 6, timeout=20)
    assert sorted(sink.recorder.message_ids()) == sorted(ids)
    assert count(db, email_sends) == 3


def test_the_backend_down_then_up_sends_later_once(
    db: Database, sink: Sink, processed: Processed, run_worker: Callable[..., None]
) -> None:
    sink.down()
    created = direct(db).submit(CREATE, NOTE, idempotency_key="down")
    assert isinstance(created, Applied)
    run_worker()
    assert wait_until(lambda: processed.failed.get(SEND_EMAIL_ACTOR, 0) >= 2, timeout=20), "attempts refused, retried"
    assert sink.recorder.messages == [] and count(db, email_sends) == 0
    sink.up()
    assert wait_until(lambda: sink.recorder.message_ids() == [message_id(created.id)], timeout=20)
    assert not wait_until(lambda: len(sink.recorder.messages) > 1, timeout=1.5)
    assert count(db, email_sends) == 1


class BusyMailbox(Recorder):
    """Refuses every recipient for now, naming it, as real servers do (a 4xx: retried)."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        return f"451 4.2.1 <{address}> mailbox busy, try later"


def test_a_failing_email_job_sends_sentry_neither_address_nor_subject_nor_body_nor_key(
    sentry_events: SentEvents, db: Database, sink: Sink, processed: Processed, run_worker: Callable[..., None]
) -> None:
    if isinstance(sink, SmtpServer):
        sink.recorder = BusyMailbox()
        sink.up()
        said = "mailbox busy"
    else:
        sink.fake.outage(100)
        said = "answered 500"
    note = NOTE | {"email": "grace.hopper@navy.example.com", "subject": "Your biopsy results", "body": "Dear Grace, ..."}
    created = direct(db).submit(CREATE, note, idempotency_key="sentry")
    assert isinstance(created, Applied)
    run_worker()
    assert wait_until(lambda: processed.failed.get(SEND_EMAIL_ACTOR, 0) >= 2, timeout=20), "attempts refused, retried"
    assert wait_until(lambda: len(sentry_events) >= 2, timeout=10), "the failed attempts reached Sentry"
    sent = sentry_events.text()
    assert "EmailNotSent" in sent and said in sent  # the event says what failed...
    for personal in ("grace.hopper", "biopsy", "Dear Grace"):
        at = sent.find(personal)
        assert at < 0, sent[max(0, at - 400) : at + 100]  # ...not to whom, nor what
    if isinstance(sink, SmtpServer):
        assert "***@navy.example.com" in sent  # the server named the address: masked
    else:
        assert sink.fake.key not in sent


@pytest.mark.parametrize("sink", ["smtp"], indirect=True)
def test_an_smtp_refusal_of_an_internationalised_address_sends_sentry_no_trace_of_it(
    sentry_events: SentEvents, db: Database, sink: SmtpServer, processed: Processed, run_worker: Callable[..., None]
) -> None:
    """The server names the address it refuses in its reply (bytes: `zo\\xc3\\xab` in the exception's text)."""
    sink.recorder = BusyMailbox()
    sink.up()
    note = NOTE | {"email": "zoë.temp@straße.de", "subject": "Your biopsy results", "body": "Dear Zoë, ..."}
    created = direct(db).submit(CREATE, note, idempotency_key="sentry-idn")
    assert isinstance(created, Applied)
    run_worker()
    assert wait_until(lambda: processed.failed.get(SEND_EMAIL_ACTOR, 0) >= 2, timeout=20), "attempts refused, retried"
    assert wait_until(lambda: len(sentry_events) >= 2, timeout=10), "the failed attempts reached Sentry"
    sent = sentry_events.text()  # JSON: `zoë` is `zo\\u00eb` there
    assert "SMTPRecipientsRefused" in sent and "mailbox busy" in sent
    for trace in ("zoë", "zo\\u00eb", "Zo\\u00eb", "zo\\\\xc3", "zo%C3", "temp@", "biopsy", "Dear"):
        at = sent.find(trace)
        assert at < 0, sent[max(0, at - 400) : at + 100]
    assert "***@stra\\u00dfe.de" in sent and "***@stra\\\\xc3\\\\x9fe.de" in sent  # the domain is kept, as for ASCII addresses


def test_rows_left_unpublished_by_a_dead_process_are_relayed_and_sent_once(
    db: Database,
    make_publisher: Callable[..., Publisher],
    email_queue: str,
    sink: Sink,
    processed: Processed,
    run_worker: Callable[..., None],
) -> None:
    dispatcher = direct(db)
    # The web process committed and died: nothing was published, the row is all there is.
    lost = dispatcher.submit(CREATE, NOTE, idempotency_key="lost")
    # A relay published this one and died before marking it: it will be published again.
    half = dispatcher.submit(CREATE, NOTE | {"email": "bo@example.com"}, idempotency_key="half")
    assert isinstance(lost, Applied) and isinstance(half, Applied)
    rows = {r["notification_id"]: r for r in outbox_rows(db)}
    assert all(r["published_at"] is None for r in rows.values())
    make_publisher(queue_name=email_queue).publish(email_message(rows[half.id], email_queue))

    run_worker()
    expected = sorted([message_id(lost.id), message_id(half.id)])
    assert wait_until(lambda: sorted(sink.recorder.message_ids()) == expected, timeout=20)
    # The relay publishes "half" again only if it claims the row before that job records its send (the job
    # marks its row published and sent); either way each email goes once.
    assert wait_until(lambda: processed.sent_ok() >= 2, timeout=20)
    assert not wait_until(lambda: len(sink.recorder.messages) > 2, timeout=1.0)
    assert sorted(sink.recorder.message_ids()) == expected
    assert all(r["published_at"] is not None and r["sent_at"] is not None for r in outbox_rows(db))
    assert count(db, email_sends) == 2


def test_the_relay_holds_no_row_lock_while_it_publishes_so_no_job_finds_its_row_busy(
    db: Database, sink: Sink, processed: Processed, run_worker: Callable[..., None]
) -> None:
    """The relay used to keep its FOR UPDATE locks until the whole pass was published and confirmed: a job
    consumed meanwhile found its row locked, raised SendInProgress and waited for a retry (5 s or more)."""
    created = [direct(db).submit(CREATE, NOTE | {"subject": f"n{n}"}) for n in range(60)]
    assert all(isinstance(outcome, Applied) for outcome in created)
    run_worker()
    assert wait_until(lambda: len(sink.recorder.messages) == 60, timeout=60)
    assert wait_until(lambda: processed.sent_ok() == 60, timeout=10)  # each job's count follows its send
    assert processed.failed.get(SEND_EMAIL_ACTOR, 0) == 0, "jobs found their outbox row locked by the relay"
    assert count(db, email_sends) == 60


def test_emails_leave_within_a_relay_interval_of_their_commit(
    db: Database, sink: Sink, processed: Processed, run_worker: Callable[..., None]
) -> None:
    """Printed, not asserted (a figure of this machine; speed targets live in bench/): COMMIT to the backend for 60
    notifications committed one every 50 ms while the worker runs, relay interval 0.2 s (1 s by default)."""
    run_worker()
    committed_at: dict[str, float] = {}
    for n in range(60):
        outcome = direct(db).submit(CREATE, NOTE | {"subject": f"n{n}"})
        assert isinstance(outcome, Applied)
        committed_at[message_id(outcome.id)] = time.time()
        time.sleep(0.05)
    assert wait_until(lambda: len(sink.recorder.messages) == 60, timeout=60)
    assert wait_until(lambda: processed.sent_ok() == 60, timeout=10)
    assert processed.failed.get(SEND_EMAIL_ACTOR, 0) == 0
    latencies = sorted(sink.recorder.received_at[key] - at for key, at in committed_at.items())
    median, worst = latencies[30] * 1000, latencies[-1] * 1000
    print(f"\nCOMMIT -> handed to {sink.kind}: median {median:.0f} ms, max {worst:.0f} ms (60 emails)")


def test_a_job_published_and_never_sent_is_published_again(db: Database, sink: Sink, run_worker: Callable[..., None]) -> None:
    """Its job lost after the relay marked it (a channel gone, RabbitMQ dropping it after its retries): the row
    said published for ever and the email never left. Rows dead-lettered for a permanent refusal stay as they are."""
    lost, refused = (direct(db).submit(CREATE, NOTE | {"subject": subject}) for subject in ("lost", "refused"))
    assert isinstance(lost, Applied) and isinstance(refused, Applied)
    with db.session() as s:
        s.execute(outbox.update().values(published_at=func.now() - text("interval '2 hours'")))
        refused_row = s.execute(select(outbox.c.id).where(outbox.c.notification_id == refused.id)).scalar_one()
        s.execute(
            dead_letters.insert().values(
                message_id=str(refused_row), queue_name="q", actor_name=SEND_EMAIL_ACTOR, message={}, reason="550 no such user"
            )
        )
        s.commit()
    run_worker()
    assert wait_until(lambda: sink.recorder.message_ids() == [message_id(lost.id)], timeout=20)
    assert not wait_until(lambda: len(sink.recorder.messages) > 1, timeout=1.0)
    with db.session() as s:
        sent_at = dict(s.execute(select(outbox.c.notification_id, outbox.c.sent_at)).all())
    assert sent_at[lost.id] is not None and sent_at[refused.id] is None


def test_an_email_that_cannot_be_built_is_dead_lettered_once_with_its_reason(
    db: Database, sink: Sink, processed: Processed, run_worker: Callable[..., None]
) -> None:
    """A subject with a line break (written before subjects were checked, or by another writer) can never be a
    header: one dead letter saying so, not a day of retries ending in Dramatiq's XQ."""
    entity = uuid.uuid4()
    with db.session() as s:
        s.execute(outbox.insert().values(email_row(entity, "ada@example.com", "Hi\r\nBcc: eve@example.com", "b")))
        s.commit()
    run_worker()
    assert wait_until(lambda: count(db, dead_letters) == 1, timeout=20)
    with db.session() as s:
        reason = s.execute(select(dead_letters.c.reason)).scalar_one()
    assert "cannot be built" in reason and message_id(entity) in reason
    assert processed.failed.get(SEND_EMAIL_ACTOR, 0) == 0, "not retried"
    assert sink.recorder.messages == [] and count(db, email_sends) == 0


class NoSuchUser(Recorder):
    """Refuses one recipient for good (a 5xx), takes the others."""

    def __init__(self, gone: str) -> None:
        super().__init__()
        self.gone = gone

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if address == self.gone:
            return f"550 5.1.1 <{address}> no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_a_permanent_rejection_is_dead_lettered_once_with_its_reason(
    db: Database, sink: Sink, processed: Processed, metrics: Metrics, run_worker: Callable[..., None]
) -> None:
    """A refused recipient is this email's own fault: one dead letter with the other side's words, never 30 retries;
    the next email goes."""
    gone = "gone@example.com"
    if isinstance(sink, SmtpServer):
        sink.recorder = NoSuchUser(gone)
        sink.up()
        said = "no such user"
    else:
        sink.fake.inactive.add(gone)
        said = "marked as inactive" if sink.kind == "postmark" else "Invalid `to` field"
    refused = direct(db).submit(CREATE, NOTE | {"email": gone}, idempotency_key="gone")
    kept = direct(db).submit(CREATE, NOTE, idempotency_key="kept")
    assert isinstance(refused, Applied) and isinstance(kept, Applied)
    run_worker()
    assert wait_until(lambda: count(db, dead_letters) == 1 and len(sink.recorder.messages) == 1, timeout=20)
    assert sink.recorder.message_ids() == [message_id(kept.id)]
    with db.session() as s:
        reason = s.execute(select(dead_letters.c.reason)).scalar_one()
    assert said in reason and message_id(refused.id) in reason and f"{sink.kind} refused" in reason, reason
    assert processed.failed.get(SEND_EMAIL_ACTOR, 0) == 0, "never retried"
    assert not wait_until(lambda: count(db, dead_letters) > 1 or len(sink.recorder.messages) > 1, timeout=1.0)
    assert emails_counted(metrics, sink.kind, "rejected") == 1 and emails_counted(metrics, sink.kind, "sent") == 1


@pytest.mark.parametrize(
    ("sink", "deliver", "deliveries"),
    [("resend", True, 1), ("resend", False, 1), ("postmark", False, 1), ("postmark", True, 2)],
    indirect=["sink"],
)
def test_a_stall_is_cut_by_the_deadline_and_retried(
    db: Database, sink: Sink, metrics: Metrics, run_worker: Callable[..., None], deliver: bool, deliveries: int
) -> None:
    """The provider takes the request and never answers: the deadline cuts it and the job is retried.

    Resend: the idempotency key makes the retry harmless whether the email went out (the replay gets the first
    email's id, nothing is sent again) or the stalled request never finished (replays get 409 while it is in
    progress, and are retried). Postmark: the send record keeps every answered send single, and an email that
    went out unanswered goes again, with the same Message-ID: the window the README names."""
    assert isinstance(sink, ProviderSink)
    sink.fake.stall_next(1, deliver=deliver)
    created = direct(db).submit(CREATE, NOTE, idempotency_key="stall")
    assert isinstance(created, Applied)
    run_worker()
    if sink.kind == "resend" and not deliver:
        assert wait_until(lambda: any(status == 409 for _, status in sink.fake.attempts), timeout=20)
        sink.fake.release()  # the stalled request ends unanswered, nothing sent: the next retry sends
    assert wait_until(lambda: count(db, email_sends) == 1, timeout=20)
    assert not wait_until(lambda: len(sink.recorder.messages) > deliveries, timeout=1.5)
    assert sink.recorder.message_ids() == [message_id(created.id)] * deliveries
    (stalled_at, first), (retried_at, _) = sink.fake.attempts[:2]
    assert first == "stall" and HTTP_DEADLINE * 0.9 <= retried_at - stalled_at < HTTP_DEADLINE + 5
    assert emails_counted(metrics, sink.kind, "failed_transient") >= 1 and emails_counted(metrics, sink.kind, "sent") == 1


@pytest.mark.parametrize("sink", PROVIDERS, indirect=True)
def test_a_provider_answering_5xx_is_retried_and_the_email_goes_once(
    db: Database, sink: Sink, metrics: Metrics, run_worker: Callable[..., None]
) -> None:
    assert isinstance(sink, ProviderSink)
    sink.fake.outage(3)
    created = direct(db).submit(CREATE, NOTE, idempotency_key="outage")
    assert isinstance(created, Applied)
    run_worker()
    assert wait_until(lambda: sink.recorder.message_ids() == [message_id(created.id)], timeout=20)
    assert not wait_until(lambda: len(sink.recorder.messages) > 1, timeout=1.0)
    assert [status for _, status in sink.fake.attempts] == [500, 500, 500, 200]
    assert emails_counted(metrics, sink.kind, "failed_transient") == 3 and emails_counted(metrics, sink.kind, "sent") == 1


@pytest.mark.parametrize("sink", PROVIDERS, indirect=True)
def test_a_rate_limited_email_waits_for_retry_after_and_goes_once(
    db: Database, sink: Sink, metrics: Metrics, run_worker: Callable[..., None]
) -> None:
    """Retried after the provider's Retry-After (2 s), not after the actor's backoff (100-400 ms here)."""
    assert isinstance(sink, ProviderSink)
    if sink.kind == "resend":
        body: dict[str, Any] = {"statusCode": 429, "name": "rate_limit_exceeded", "message": "Too many requests."}
    else:
        body = {"ErrorCode": 429, "Message": "Rate limit exceeded."}
    sink.fake.answer_next(1, 429, body, {"Retry-After": "2"})
    created = direct(db).submit(CREATE, NOTE, idempotency_key="slow down")
    assert isinstance(created, Applied)
    run_worker()
    assert wait_until(lambda: sink.recorder.message_ids() == [message_id(created.id)], timeout=20)
    (limited_at, status), (retried_at, _) = sink.fake.attempts[:2]
    assert status == 429 and retried_at - limited_at >= 1.9
    assert not wait_until(lambda: len(sink.recorder.messages) > 1, timeout=1.0)
    assert emails_counted(metrics, sink.kind, "rate_limited") == 1 and emails_counted(metrics, sink.kind, "sent") == 1


@pytest.mark.parametrize("sink", PROVIDERS, indirect=True)
def test_bad_credentials_are_counted_and_said_once_and_the_emails_wait(
    caplog: pytest.LogCaptureFixture,
    sentry_events: SentEvents,
    db: Database,
    sink: Sink,
    metrics: Metrics,
    run_worker: Callable[..., None],
) -> None:
    """A refused key fails every email alike: counted per attempt, one log line per process (and one when it is
    taken again), no dead letter: the emails wait and go once it is fixed. The key shows nowhere."""
    assert isinstance(sink, ProviderSink)
    caplog.set_level(logging.INFO, logger="brownout._worker.email")
    key = f"re_{uuid.uuid4().hex}" if sink.kind == "resend" else str(uuid.uuid4())
    created = [direct(db).submit(CREATE, NOTE | {"email": f"u{n}@example.com"}) for n in range(3)]
    run_worker(backend_for(sink, key=key))
    assert wait_until(lambda: emails_counted(metrics, sink.kind, "bad_credentials") >= 9, timeout=20)

    def said(words: str) -> list[logging.LogRecord]:
        return [record for record in caplog.records if words in record.getMessage()]

    assert len(said("refuses our credentials")) == 1 and said("refuses our credentials")[0].levelno == logging.ERROR
    assert count(db, dead_letters) == 0 and sink.recorder.messages == []

    sink.fake.key = key  # the operator fixes it (here the provider comes to take the worker's key)
    assert wait_until(lambda: len(sink.recorder.messages) == 3, timeout=30)
    assert sorted(sink.recorder.message_ids()) == sorted(message_id(c.id) for c in created if isinstance(c, Applied))
    assert not wait_until(lambda: len(sink.recorder.messages) > 3, timeout=1.0)
    assert len(said("refuses our credentials")) == 1 and len(said("takes our credentials again")) == 1
    assert count(db, dead_letters) == 0 and emails_counted(metrics, sink.kind, "sent") == 3
    exposition = generate_latest(metrics.registry).decode()
    assert 'outcome="bad_credentials"' in exposition
    for shown in (caplog.text, exposition, sentry_events.text()):
        assert key not in shown


def test_the_relay_reads_the_age_of_the_oldest_email_still_to_send(db: Database, email_queue: str) -> None:
    """Neither sent nor dead-lettered, of the last 7 days (the rows the relay still publishes)."""
    publisher = Publisher(url=RABBITMQ_URL, queue_name=email_queue, max_length=1000)  # never started: not used here
    relay = OutboxRelay(database=db, publisher=publisher, queue_name=email_queue)
    assert relay.oldest_unsent_age() == 0.0
    waiting, sent, refused, forgotten = (direct(db).submit(CREATE, NOTE | {"subject": s}) for s in ("w", "s", "r", "f"))
    assert isinstance(waiting, Applied) and isinstance(sent, Applied)
    assert isinstance(refused, Applied) and isinstance(forgotten, Applied)
    ages = [(waiting, "10 minutes"), (sent, "20 minutes"), (refused, "30 minutes"), (forgotten, "8 days")]
    with db.session() as s:
        for created, age in ages:
            s.execute(
                outbox.update()
                .where(outbox.c.notification_id == created.id)
                .values(created_at=func.now() - text(f"interval '{age}'"))
            )
        sent_now = {"published_at": func.now(), "sent_at": func.now()}  # as the email job records a send
        s.execute(outbox.update().where(outbox.c.notification_id == sent.id).values(**sent_now))
        refused_row = s.execute(select(outbox.c.id).where(outbox.c.notification_id == refused.id)).scalar_one()
        s.execute(
            dead_letters.insert().values(
                message_id=str(refused_row), queue_name="q", actor_name=SEND_EMAIL_ACTOR, message={}, reason="550 no such user"
            )
        )
        s.commit()
    assert 600 <= relay.oldest_unsent_age() < 660  # waiting for the relay
    with db.session() as s:
        s.execute(outbox.update().where(outbox.c.notification_id == waiting.id).values(published_at=func.now()))
        s.commit()
    assert 600 <= relay.oldest_unsent_age() < 660  # published, its job not done yet
    with db.session() as s:
        s.execute(outbox.update().where(outbox.c.notification_id == waiting.id).values(**sent_now))
        s.commit()
    assert relay.oldest_unsent_age() == 0.0
