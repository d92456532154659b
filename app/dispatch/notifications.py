"""The reference domain's writes: create a notification, mark it read, mark it unread.

Read and unread do not commute, so they are the writes whose order shows:
each carries its acceptance stamp, and an UPDATE only wins over a stamp lower
than its own (last writer wins, decided by PostgreSQL in the same statement).
Marking read a notification whose creation is not applied yet raises
DependencyPending: the write waits instead of failing. An end user's mark
(the envelope's caller `user:<id>`) takes effect only on their own
notification; another's raises NotPermitted, which is answered as a
notification that does not exist: 404 on the direct path, and in the worker
(a mark queued while the database could not tell) a wait for a creation that
never comes, then dropped in the same words, so its command's status tells
the caller nothing either.

Creating a notification also adds its email to the outbox in the same
transaction (src/brownout/_dispatch/outbox.py): committed together or not at all.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.networks import validate_email
from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from app.api.applied_elsewhere import tell_readers
from app.schema import notifications
from brownout import (
    Command,
    DependencyPending,
    Effect,
    Envelope,
    NotPermitted,
    Registry,
    SafeLine,
    SafeText,
    email_row,
    emails_of,
    recordset,
    rows_param,
)

CREATE = "create_notification"
MARK_READ = "mark_notification_read"
MARK_UNREAD = "mark_notification_unread"


@functools.lru_cache(maxsize=4096)
def normalized_email(value: str) -> str:
    """What pydantic's EmailStr makes of *value* (raises as it does), remembered per string.

    Why: email-validator's checks cost about 40 us per address in pure Python, the largest
    part of validating a queued creation, and a notification service writes to the same
    addresses again and again. The result is a pure function of the string, so acceptance
    and normalisation are EmailStr's exactly; a refusal is not cached (it raises)."""
    return validate_email(value)[1]


Email = Annotated[str, AfterValidator(normalized_email), WithJsonSchema({"type": "string", "format": "email"})]
"""EmailStr with `normalized_email`: same core schema (a str, then the check) and JSON schema."""


USER_ID_PATTERN = r"^[A-Za-z0-9._|@+-]{1,128}$"
"""A user id: 1 to 128 of these ASCII characters. UUIDs (Supabase Auth), numbers and Auth0's `auth0|abc` fit;
`/`, `:` (Redis keys' separator), whitespace and controls do not, so the id is one URL path segment and one
Redis key part as it is, with nothing to escape."""


def user_id_of(value: object) -> object:
    """An integer as its decimal string: what the previous release accepted (1 to 2**63-1, the bigint column)
    and still sits in queued messages; the same user, the same scope `user:42`. Anything else goes on to the
    string checks."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 < value < 2**63:
            raise ValueError("an integer user id must be 1 to 2**63-1")
        return str(value)
    return value


def not_a_dot_segment(value: str) -> str:
    if value in (".", ".."):  # URL clients resolve these path segments away
        raise ValueError("a user id cannot be '.' or '..'")
    return value


UserId = Annotated[
    str,
    BeforeValidator(user_id_of),
    Field(min_length=1, max_length=128, pattern=USER_ID_PATTERN),
    AfterValidator(not_a_dot_segment),
]


class CreateNotificationV1(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: UserId
    email: Email
    subject: SafeLine = Field(min_length=1, max_length=200)  # an email header: one line, no controls, no bidi tricks
    body: SafeText = Field(default="", max_length=10_000)


class SetReadV1(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    notification_id: uuid.UUID


def row_to_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    """The notification as the API shows it, plus `read_stamp` (internal: read-your-writes compares it)."""
    return {
        "id": str(row["id"]),
        "user_id": row["user_id"],
        "email": row["email"],
        "subject": row["subject"],
        "body": row["body"],
        "read": row["read"],
        "created_at": row["created_at"].isoformat(),
        "status": "applied",
        "read_stamp": row["read_stamp"],
    }


_CREATED = ("id", "user_id", "email", "subject", "body", "created_at")
_SELECT = select(notifications).where(notifications.c.id == bindparam("id"))
_SELECT_LOCKED = _SELECT.with_for_update()
# Creations and their emails in one statement (see _create_many); an email only for a row made now.
_INSERT_MANY = text(
    f"WITH r AS (SELECT * FROM {recordset(notifications, _CREATED, extra={'outbox_row': 'jsonb'})}), "  # noqa: S608 - names from our own schema and literals; the rows are one bound parameter
    f"made AS (INSERT INTO notifications ({', '.join(_CREATED)}) SELECT {', '.join(_CREATED)} FROM r "
    "ON CONFLICT (id) DO NOTHING RETURNING *), "
    f"mailed AS ({emails_of('made', 'r', 'outbox_row')}) "
    f"SELECT {', '.join(notifications.c.keys())} FROM made"
).columns(*notifications.c)  # typed columns: SQLAlchemy reuses the result's metadata instead of rebuilding it per call
_SELECT_MANY = select(notifications).where(notifications.c.id.in_(bindparam("ids", expanding=True)))
_SET_READ = (
    notifications.update()
    .where(notifications.c.id == bindparam("target"), notifications.c.read_stamp < bindparam("stamp"))
    .values(read=bindparam("value"), read_stamp=bindparam("stamp"))
    .returning(*notifications.c)
)
_SET_OWN_READ = (
    notifications.update()
    .where(
        notifications.c.id == bindparam("target"),
        notifications.c.read_stamp < bindparam("stamp"),
        notifications.c.user_id == bindparam("owner"),
    )
    .values(read=bindparam("value"), read_stamp=bindparam("stamp"))
    .returning(*notifications.c)
)
"""_SET_READ for an end user's mark: only their own notification."""


def _create(session: Session, envelope: Envelope, payload: BaseModel) -> Effect:
    """The notification and its email in one statement (`_create_many` of one): on the direct path each
    statement is a round trip the request waits for."""
    return _create_many(session, [(envelope, payload)])[0]


def _create_many(session: Session, items: Sequence[tuple[Envelope, BaseModel]]) -> list[Effect]:
    """`_create` for several envelopes in one statement (plus a SELECT for replays only).

    Why: the worker applies a backlog in batches, and each statement costs a round trip and its
    overhead under the GIL; the rows travel as one JSON parameter (src/brownout/_dispatch/bulk.py)."""
    values: dict[str, dict[str, Any]] = {}
    for envelope, payload in items:
        assert isinstance(payload, CreateNotificationV1)  # noqa: S101 - narrows the type for mypy: the registry hands each handler its own payload model
        row = payload.model_dump(mode="json") | {"id": envelope.entity_id, "created_at": envelope.accepted_at}
        row["outbox_row"] = email_row(envelope.entity_id, row["email"], row["subject"], row["body"])
        values.setdefault(str(envelope.entity_id), row)
    made = session.execute(_INSERT_MANY, rows_param(list(values.values()))).mappings()
    rows = {str(row["id"]): row for row in made}
    missing = [entity_id for entity_id in values if entity_id not in rows]
    if missing:  # already there: only a replay of the same command can have made it (and its email)
        rows |= {str(row["id"]): row for row in session.execute(_SELECT_MANY, {"ids": missing}).mappings()}
    return [Effect(row_to_json(rows[str(envelope.entity_id)])) for envelope, _ in items]


def _set_read(value: bool) -> Any:
    def apply(session: Session, envelope: Envelope, payload: BaseModel) -> Effect:
        assert isinstance(payload, SetReadV1)  # noqa: S101 - narrows the type for mypy: the registry hands each handler its own payload model
        params: dict[str, Any] = {"target": payload.notification_id, "stamp": envelope.accepted_stamp, "value": value}
        owner = envelope.caller_user_id  # None: a service (or a message from before callers were kept)
        statement = _SET_READ if owner is None else _SET_OWN_READ
        if owner is not None:
            params["owner"] = owner
        updated = session.execute(statement, params).mappings().one_or_none()
        if updated is not None:
            return Effect(row_to_json(updated))
        # The UPDATE matched nothing: a later write won, the row did not exist in the
        # UPDATE's snapshot, or it is not the caller's. Under READ COMMITTED the creation
        # may have committed since, so look again with the row locked before deciding.
        current = session.execute(_SELECT_LOCKED, {"id": payload.notification_id}).mappings().one_or_none()
        if current is None:
            raise DependencyPending(f"notification {payload.notification_id} not found")
        if owner is not None and current["user_id"] != owner:  # told apart from the above by nobody
            raise NotPermitted(envelope.entity_key)
        if current["read_stamp"] < envelope.accepted_stamp:  # created after the UPDATE's snapshot
            return Effect(row_to_json(session.execute(statement, params).mappings().one()))
        return Effect(row_to_json(current), superseded=True)

    return apply


def _user_scope(payload: BaseModel) -> str:
    assert isinstance(payload, CreateNotificationV1)  # noqa: S101 - narrows the type for mypy: the registry hands each handler its own payload model
    return f"user:{payload.user_id}"


def _notification_scope(payload: BaseModel) -> str:
    assert isinstance(payload, SetReadV1)  # noqa: S101 - narrows the type for mypy: the registry hands each handler its own payload model
    return f"notification:{payload.notification_id}"


def register(registry: Registry) -> Registry:
    registry.register(
        Command(
            name=CREATE,
            versions={1: CreateNotificationV1},
            scope=_user_scope,
            entity=lambda payload, derived: derived,
            apply=_create,
            entity_kind="notification",
            apply_many=_create_many,
        )
    )
    for name, value in ((MARK_READ, True), (MARK_UNREAD, False)):
        registry.register(
            Command(
                name=name,
                versions={1: SetReadV1},
                scope=_notification_scope,
                entity=lambda payload, derived: payload.notification_id,  # type: ignore[attr-defined]
                apply=_set_read(value),
                entity_kind="notification",
            )
        )
    return registry


def build_registry() -> Registry:
    """The notification commands, with the read side's after-apply hook (queued writes reach its cache)."""
    return register(Registry(after_apply=tell_readers))
