"""Ids derived from keys, payload hashes and the Dramatiq message format."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import dramatiq

from brownout._dispatch.envelope import APPLY_ACTOR, Envelope, caller_scope, command_id_for, entity_id_for, payload_hash


def test_ids_are_stable_and_scoped() -> None:
    assert command_id_for("create", "user:1", "k") == command_id_for("create", "user:1", "k")
    assert command_id_for("create", "user:1", "k") != command_id_for("create", "user:2", "k")
    assert command_id_for("create", "user:1", "k") != command_id_for("other", "user:1", "k")
    assert entity_id_for("create", "user:1", "k") != command_id_for("create", "user:1", "k")
    # a release must never change them: pin one value
    assert command_id_for("create_notification", "user:42", "abc") == uuid.UUID("0113e0e4-12e3-5d76-bd28-021facafda7e")


def test_the_caller_is_part_of_the_scope_when_known() -> None:
    assert caller_scope("user:42", None) == "user:42"  # what the previous release derived ids in
    assert caller_scope("user:42", "billing") != caller_scope("user:42", "crm")
    assert caller_scope("notification:1", "user:ada") == "user:ada|notification:1"


def test_an_envelope_without_a_caller_still_validates() -> None:
    """Messages queued by the previous release carry no caller: a service's write, checked as before."""
    data = {
        "command_id": str(uuid.uuid4()),
        "name": "mark_notification_read",
        "version": 1,
        "scope": "notification:1",
        "idempotency_key": "k",
        "client_key": True,
        "payload": {},
        "payload_hash": payload_hash({}),
        "entity_key": "notification:1",
        "entity_id": str(uuid.uuid4()),
        "accepted_stamp": 1,
        "accepted_at": "2026-11-29T00:00:00+00:00",
    }
    old = Envelope.model_validate(data)
    assert old.caller is None and old.caller_user_id is None
    assert old.command_id_without_caller == command_id_for("mark_notification_read", "notification:1", "k")
    assert Envelope.model_validate(data | {"caller": "user:ada"}).caller_user_id == "ada"
    assert Envelope.model_validate(data | {"caller": "billing"}).caller_user_id is None


def test_payload_hash_ignores_key_order_but_not_values() -> None:
    assert payload_hash({"a": 1, "b": "x"}) == payload_hash({"b": "x", "a": 1})
    assert payload_hash({"a": 1}) != payload_hash({"a": 2})


def test_round_trip_through_a_dramatiq_message() -> None:
    envelope = Envelope(
        command_id=uuid.uuid4(),
        name="create_notification",
        version=1,
        scope="user:1",
        idempotency_key="k",
        client_key=True,
        payload={"user_id": 1},
        payload_hash=payload_hash({"user_id": 1}),
        entity_key="notification:x",
        entity_id=uuid.uuid4(),
        accepted_stamp=123456789,
        accepted_at=datetime(2026, 11, 29, tzinfo=UTC),
    )
    message = envelope.to_message("q")
    assert message.actor_name == APPLY_ACTOR and message.queue_name == "q"
    assert message.message_id == str(envelope.command_id)
    decoded = dramatiq.Message.decode(message.encode())
    assert Envelope.from_message(decoded) == envelope
