"""The outbox: side effects of a write, committed with it, published later by the worker.

Committing a write and then publishing its email job loses the email when the
process dies in between. So `add_email` writes an outbox row in the write's own
transaction (the service's apply function), and the worker's relay
(src/brownout/_worker/outbox.py) publishes every row whose ``published_at`` is
NULL as a `send_email` job, then marks it. The row's id is derived from the id
of the entity the email belongs to, so a replayed write never makes a second
row (ON CONFLICT DO NOTHING) and a re-published job carries the same Dramatiq
message id.

The entity's id is stored in columns named ``notification_id`` (``outbox``,
``email_sends``) and travels as ``notification_id`` in the job, the names they
were given for the first service built on Brownout: renaming a column that the
running release writes would fail its writes during a rolling deploy, and
workers of both releases consume the same jobs.

Nothing here connects, publishes or commits: callers own the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import dramatiq
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import bindparam
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from brownout._schema import outbox

SEND_EMAIL_ACTOR = "send_email"
EMAIL = "email"

# Fixed forever: the outbox id of an entity's email must be the same in every release.
OUTBOX_NAMESPACE = uuid.UUID("3c2b1a09-8f7e-4d6c-9b5a-4e3d2c1b0a9f")


class EmailJob(BaseModel):
    """What a `send_email` job carries (the outbox row's payload plus its id)."""

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True, validate_by_name=True)

    outbox_id: uuid.UUID
    entity_id: uuid.UUID = Field(alias="notification_id")  # its name on the wire and in the outbox row's payload
    to: str
    subject: str
    body: str

    @property
    def message_id(self) -> str:
        return message_id_for(self.entity_id)


def outbox_id_for(kind: str, entity_id: uuid.UUID) -> uuid.UUID:
    """The outbox row of *kind* for an entity: one per entity and kind."""
    return uuid.uuid5(OUTBOX_NAMESPACE, f"{kind}\n{entity_id}")


def message_id_for(entity_id: uuid.UUID) -> str:
    """The email's ``Message-ID`` header: stable, so every resend of one entity's email carries the same."""
    return f"<{entity_id}@brownout>"


_ADD = (
    insert(outbox)
    .values(
        id=bindparam("id"),
        notification_id=bindparam("notification_id"),
        kind=bindparam("kind"),
        payload=bindparam("payload"),
    )
    .on_conflict_do_nothing(index_elements=["id"])
)


def add_email(session: Session, *, entity_id: uuid.UUID, to: str, subject: str, body: str) -> uuid.UUID:
    """Add the entity's email to the outbox in *session*'s transaction (no commit); return the row id."""
    session.execute(_ADD, email_row(entity_id, to, subject, body))
    return outbox_id_for(EMAIL, entity_id)


def email_row(entity_id: uuid.UUID, to: str, subject: str, body: str) -> dict[str, Any]:
    """The outbox row of an entity's email, keyed by its columns (id, notification_id, kind, payload)."""
    payload = {"notification_id": str(entity_id), "to": to, "subject": subject, "body": body}
    return {"id": outbox_id_for(EMAIL, entity_id), "notification_id": entity_id, "kind": EMAIL, "payload": payload}


def emails_of(created: str, source: str, column: str) -> str:
    """SQL for a data-modifying CTE: add the email of each entity of CTE *created*, its outbox
    row (an `email_row`, as jsonb) read from *source*.*column*, joined on `id`. Callers own the rest
    of the statement (the reference service's apply_many: the emails of a batch of creations)."""
    return (
        "INSERT INTO outbox (id, notification_id, kind, payload) "  # noqa: S608 - CTE and column names from the caller's code, never input; values stay bound
        "SELECT e.id, e.notification_id, e.kind, e.payload "
        f"FROM {created} JOIN {source} USING (id), "
        f"jsonb_to_record({source}.{column}) AS e(id uuid, notification_id uuid, kind text, payload jsonb) "
        "ON CONFLICT (id) DO NOTHING"
    )


def email_message(row: Mapping[Any, Any], queue_name: str) -> dramatiq.Message[Any]:
    """The `send_email` job for an outbox row (``id``, ``payload``); its message id is the row id."""
    job = EmailJob.model_validate({**row["payload"], "outbox_id": row["id"]})
    return dramatiq.Message(
        queue_name=queue_name,
        actor_name=SEND_EMAIL_ACTOR,
        args=(job.model_dump(mode="json"),),  # by alias: the field names workers of every release read
        kwargs={},
        options={},
        message_id=str(job.outbox_id),
    )
