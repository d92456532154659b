"""The HTTPS email backends against Resend's and Postmark's APIs served on 127.0.0.1 (tests/support/fake_email_provider.py):
each answer classified, deadlines, the key kept out of every reason; and a notification created through the API
reaching the provider exactly once across an outage, with the production worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import httpx
import pytest
from sqlalchemy import func, select

from app.dispatch.notifications import build_registry
from brownout._db import Database
from brownout._dispatch.outbox import EmailJob
from brownout._observability.metrics import Metrics
from brownout._schema import dead_letters, email_sends
from brownout._settings import Settings
from brownout._worker import outbox as outbox_module
from brownout._worker.assembly import build_worker_broker
from brownout._worker.email_delivery import Outcome
from brownout._worker.email_providers import IDEMPOTENCY_PREFIX, ProviderBackend
from brownout._worker.email_url import email_backend
from tests.support.api_server import serve_in_thread
from tests.support.fake_email_provider import FakeProvider, Kind
from tests.support.polling import wait_until
from tests.support.rabbit import delete_queue_set

SENDER = "Brownout <noreply@example.com>"
ADA = {"user_id": 42, "email": "ada@example.com", "subject": "Welcome", "body": "Hello"}


@pytest.fixture(params=["resend", "postmark"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeProvider]:
    provider = FakeProvider(request.param)
    provider.up()
    yield provider
    provider.close()


@pytest.fixture
def make_backend(fake: FakeProvider) -> Iterator[Callable[..., ProviderBackend]]:
    built: list[ProviderBackend] = []

    def build(key: str | None = None, timeout: float = 2.0) -> ProviderBackend:
        backend = email_backend(fake.email_url(key), smtp_timeout=1, http_timeout=timeout)
        assert isinstance(backend, ProviderBackend)
        built.append(backend)
        return backend

    yield build
    for backend in built:
        backend.close()


def a_job(to: str = "ada@example.com") -> EmailJob:
    return EmailJob(outbox_id=uuid.uuid4(), notification_id=uuid.uuid4(), to=to, subject="Welcome", body="Hello")


def test_an_email_goes_with_the_provider_s_request_shape(
    fake: FakeProvider, make_backend: Callable[..., ProviderBackend]
) -> None:
    job = a_job()
    delivery = make_backend().send(job, SENDER)
    assert delivery.outcome is Outcome.SENT, delivery
    (sent,) = fake.deliveries
    assert (sent["from"], sent["to"], sent["subject"], sent["text"]) == (SENDER, "ada@example.com", "Welcome", "Hello")
    if fake.kind == "resend":
        assert sent["ref"] == f"{IDEMPOTENCY_PREFIX}{job.entity_id}"  # the Idempotency-Key
    else:
        assert sent["ref"] == job.message_id and sent["stream"] == "outbound"  # the Message-ID header, the stream


def test_resend_answers_a_replayed_key_with_the_first_id_and_sends_nothing() -> None:
    """The fake keeps Resend's idempotency promise, which the backend's retries rely on."""
    fake = FakeProvider("resend")
    fake.up()
    headers = {"Authorization": f"Bearer {fake.key}", "Idempotency-Key": "brownout-email/1"}
    body = {"from": SENDER, "to": ["ada@example.com"], "subject": "Welcome", "text": "Hello"}
    try:
        with httpx.Client(base_url=fake.url, timeout=5) as client:
            first = client.post("/emails", json=body, headers=headers)
            again = client.post("/emails", json=body, headers=headers)
            other = client.post("/emails", json=body | {"subject": "Changed"}, headers=headers)
    finally:
        fake.close()
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    assert other.status_code == 409 and other.json()["name"] == "invalid_idempotent_request"
    assert len(fake.deliveries) == 1


@pytest.mark.parametrize("which", ["wrong", "missing"])
def test_a_wrong_or_missing_key_gets_the_provider_s_401_and_is_bad_credentials(
    fake: FakeProvider, make_backend: Callable[..., ProviderBackend], which: str
) -> None:
    wrong = f"re_{uuid.uuid4().hex}" if fake.kind == "resend" else str(uuid.uuid4())
    if which == "missing":  # what the provider says to a request without the header at all
        path = "/emails" if fake.kind == "resend" else "/email"
        answer = httpx.post(f"{fake.url}{path}", json={}, headers={"Accept": "application/json"}, timeout=5)
        assert answer.status_code == 401
        assert answer.json().get("name") == "missing_api_key" or answer.json().get("ErrorCode") == 10
        return
    delivery = make_backend(key=wrong).send(a_job(), SENDER)
    assert delivery.outcome is Outcome.BAD_CREDENTIALS and "401" in delivery.reason
    assert wrong not in delivery.reason and fake.deliveries == []


TRANSIENT, LIMITED, REJECTED, REFUSED = (Outcome.FAILED_TRANSIENT, Outcome.RATE_LIMITED, Outcome.REJECTED,
                                         Outcome.BAD_CREDENTIALS)  # fmt: skip
Case = tuple[int, dict[str, Any], dict[str, str], Outcome, float | None]


def resend(status: int, name: str, message: str) -> dict[str, Any]:
    return {"statusCode": status, "name": name, "message": message}


def postmark(code: int, message: str) -> dict[str, Any]:
    return {"ErrorCode": code, "Message": message}


RESEND_ANSWERS: list[Case] = [
    (500, resend(500, "application_error", "An unexpected error occurred."), {}, TRANSIENT, None),
    (503, {}, {}, TRANSIENT, None),
    (429, resend(429, "rate_limit_exceeded", "Too many requests."), {"Retry-After": "7"}, LIMITED, 7.0),
    (429, resend(429, "daily_quota_exceeded", "Daily quota reached."), {}, LIMITED, None),
    (422, resend(422, "validation_error", "Invalid `to` field."), {}, REJECTED, None),
    (400, resend(400, "validation_error", "Invalid body."), {}, REJECTED, None),
    (422, resend(422, "invalid_from_address", "Invalid `from` field."), {}, REFUSED, None),
    (403, resend(403, "validation_error", "The example.com domain is not verified."), {}, REFUSED, None),
    (409, resend(409, "concurrent_idempotent_requests", "Still in progress."), {}, TRANSIENT, None),
    (409, resend(409, "invalid_idempotent_request", "Different payload."), {}, REJECTED, None),
]
POSTMARK_ANSWERS: list[Case] = [
    (500, postmark(500, "Internal server error."), {}, TRANSIENT, None),
    (503, {}, {}, TRANSIENT, None),
    (429, postmark(429, "Rate limit exceeded."), {"Retry-After": "3"}, LIMITED, 3.0),
    (422, postmark(406, "You tried to send to recipient(s) that have been marked as inactive."), {}, REJECTED, None),
    (422, postmark(300, "Invalid email request."), {}, REJECTED, None),
    (422, postmark(400, "The 'From' address is not a Sender Signature."), {}, REFUSED, None),
    (422, postmark(412, "Your account is pending approval."), {}, REFUSED, None),
    (401, postmark(10, "The Server Token you provided was invalid."), {}, REFUSED, None),
]


@pytest.mark.parametrize(
    ("fake", "case"),
    [("resend", case) for case in RESEND_ANSWERS] + [("postmark", case) for case in POSTMARK_ANSWERS],
    indirect=["fake"],
)
def test_each_answer_is_classified(fake: FakeProvider, make_backend: Callable[..., ProviderBackend], case: Case) -> None:
    status, body, headers, outcome, retry_after = case
    fake.answer_next(1, status, body, headers)
    backend = make_backend()
    delivery = backend.send(a_job(), SENDER)
    assert (delivery.outcome, delivery.retry_after) == (outcome, retry_after), delivery
    assert str(status) in delivery.reason and backend.target.key not in delivery.reason
    assert fake.deliveries == []


def test_a_refused_connection_is_transient(fake: FakeProvider, make_backend: Callable[..., ProviderBackend]) -> None:
    fake.down()
    delivery = make_backend().send(a_job(), SENDER)
    assert delivery.outcome is Outcome.FAILED_TRANSIENT and "ConnectError" in delivery.reason


def test_a_stall_ends_at_the_deadline(fake: FakeProvider, make_backend: Callable[..., ProviderBackend]) -> None:
    fake.stall_next(1, deliver=False)
    backend = make_backend(timeout=0.5)
    started = time.monotonic()
    delivery = backend.send(a_job(), SENDER)
    took = time.monotonic() - started
    assert delivery.outcome is Outcome.FAILED_TRANSIENT and "deadline" in delivery.reason
    assert 0.45 <= took < 2.0


@pytest.mark.parametrize("kind", ["resend", "postmark"])
def test_a_notification_created_through_the_api_reaches_the_provider_once_across_an_outage(
    kind: Kind,
    api_settings: Callable[..., Settings],
    make_database: Callable[..., Database],
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The web's POST /notifications writes the email to the outbox; the production worker (its relay and
    send_email actor, built from EMAIL_URL) meets two 500s, backs off, and the provider gets the email once."""
    # The relay reads the oldest unsent email's age every 15 s; every second here, so the gauge's return to 0 after
    # the send (two backoffs, about 15 s) is seen within a second of it rather than at the next 15 s mark.
    monkeypatch.setattr(outbox_module, "OLDEST_REFRESH_SECONDS", 1.0)
    provider = FakeProvider(kind)
    provider.up()
    provider.outage(2)
    email_queue = f"{queue_name}-email"
    settings = api_settings(
        email_url=provider.email_url(),
        email_queue_name=email_queue,
        email_from=SENDER,
        email_timeout_seconds=2,
        outbox_relay_interval_seconds=0.2,
        queue_max_length=1000,
    )
    metrics = Metrics()
    broker = build_worker_broker(settings, make_database(), registry=build_registry(), metrics=metrics)
    worker = dramatiq.Worker(broker, queues={queue_name, email_queue}, worker_threads=2, worker_timeout=100)
    db = make_database()
    try:
        with serve_in_thread(settings) as api:
            response = api.client.post("/notifications", json=ADA, headers={"Idempotency-Key": "e2e"})
            assert response.status_code == 201, response.text
            notification = response.json()["id"]
            worker.start()

            def oldest_unsent() -> float:
                return metrics.registry.get_sample_value("brownout_outbox_oldest_unsent_age_seconds") or 0.0

            # The relay's first pass reads the age while the provider is still failing: the email is unsent.
            assert wait_until(lambda: oldest_unsent() > 0, timeout=10)
            assert wait_until(lambda: len(provider.deliveries) == 1, timeout=60)
            assert not wait_until(lambda: len(provider.deliveries) > 1, timeout=2.0)
        (sent,) = provider.deliveries
        assert (sent["to"], sent["subject"], sent["from"]) == ("ada@example.com", "Welcome", SENDER)
        expected_ref = f"{IDEMPOTENCY_PREFIX}{notification}" if kind == "resend" else f"<{notification}@brownout>"
        assert sent["ref"] == expected_ref
        assert [status for _, status in provider.attempts] == [500, 500, 200]
        with db.session() as s:
            assert s.execute(select(func.count()).select_from(email_sends)).scalar_one() == 1
            assert s.execute(select(func.count()).select_from(dead_letters)).scalar_one() == 0

        def counted(outcome: str) -> float:
            return metrics.registry.get_sample_value("brownout_emails_total", {"backend": kind, "outcome": outcome}) or 0.0

        assert wait_until(lambda: counted("sent") == 1, timeout=5) and counted("failed_transient") == 2
        assert wait_until(lambda: oldest_unsent() == 0, timeout=30)  # read again: nothing left to send
    finally:
        worker.stop(timeout=10_000)
        broker.close()
        provider.close()
        delete_queue_set(email_queue)
