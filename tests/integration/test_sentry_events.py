"""What reaches Sentry from the web when a write fails: what failed, never to whom nor what was written."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import create_engine, text

from brownout._settings import Settings, normalise_database_url
from tests.conftest import database_url
from tests.support.api_server import serve_in_thread
from tests.support.sentry_capture import SentEvents

NOTE = {"user_id": 7, "email": "grace.hopper@navy.example.com", "subject": "Your biopsy results", "body": "Dear Grace, ..."}


def test_a_failing_write_sends_sentry_neither_address_nor_subject_nor_body(
    sentry_events: SentEvents, api_settings: Callable[..., Settings], pg_database: str
) -> None:
    settings = api_settings()
    engine = create_engine(normalise_database_url(database_url(pg_database)))
    with engine.begin() as connection:  # a constraint nobody planned for: PostgreSQL's DETAIL quotes the failing row
        connection.execute(text("ALTER TABLE notifications ADD CONSTRAINT closed_today CHECK (false) NOT VALID"))
    engine.dispose()
    with serve_in_thread(settings) as api:
        answer = api.client.post("/notifications", json=NOTE, headers={"Idempotency-Key": "sentry-1"})
    assert answer.status_code == 500, answer.text
    sent = sentry_events.text()
    assert sentry_events, f"nothing reached Sentry ({answer.status_code} {answer.text})"
    for personal in ("grace.hopper", "biopsy", "Dear Grace"):
        at = sent.find(personal)
        assert at < 0, sent[max(0, at - 400) : at + 100]
