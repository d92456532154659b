"""The email job's wire format does not change with the library's names: workers of the previous release and of
this one consume the same jobs during a rolling deploy, and outbox rows written before stay readable."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from brownout import email_row
from brownout._dispatch.outbox import EmailJob, email_message, message_id_for

ENTITY = uuid.UUID("0b7c3b52-7d40-4c49-9bd3-3a8f5e0a1c2d")


def test_a_job_carries_the_entity_as_notification_id_as_it_always_did() -> None:
    row = email_row(ENTITY, "ada@example.com", "Welcome", "Hello")
    message = email_message({"id": row["id"], "payload": row["payload"]}, "q-email")
    (job,) = message.args
    assert set(job) == {"outbox_id", "notification_id", "to", "subject", "body"}
    assert job["notification_id"] == str(ENTITY) and message.message_id == str(row["id"])


def test_a_job_of_the_previous_release_is_read() -> None:
    previous = {"outbox_id": str(uuid.uuid4()), "notification_id": str(ENTITY), "to": "a@x.org", "subject": "s", "body": "b"}
    job = EmailJob.model_validate(previous)
    assert job.entity_id == ENTITY and job.message_id == message_id_for(ENTITY) == f"<{ENTITY}@brownout>"
    with pytest.raises(ValidationError):
        EmailJob.model_validate(previous | {"unexpected": 1})
